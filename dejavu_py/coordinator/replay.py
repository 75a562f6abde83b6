"""Which steps a replacement must replay after its KV came back from the replica.

The replica holds, per sequence, a prefix of its positions (everything acknowledged); the coordinator
knows how many positions every stage should hold (``num_cached``). The gap is replayed from the
coordinator's ring of completed plans: per microbatch, every plan from the first one that wrote a
missing position onwards, in order (replaying a step also rewrites positions that were fine, with the
same values). A sequence whose gap reaches back before the ring is recomputed from its tokens instead.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from dejavu_py.protocol.plan import StepPlan


def _writes(plan: StepPlan) -> dict[int, tuple[int, int]]:
    return {sid: (start, start + n) for sid, start, n in zip(plan.seq_ids, plan.start_pos, plan.num_tokens)}


def replay_steps(history: Mapping[int, Iterable[StepPlan]], need: Mapping[int, int],
                 covered: Mapping[int, int]) -> tuple[list[StepPlan], set[int]]:
    """(plans to replay, microbatch by microbatch in step order; sequences to recompute instead)."""
    history = {mb: list(plans) for mb, plans in history.items()}
    recompute = {sid for sid in need if not _replayable(history, sid, covered.get(sid, 0), need[sid])}
    out: list[StepPlan] = []
    for mb in sorted(history):
        plans = history[mb]
        first = next((i for i, p in enumerate(plans) if any(
            sid in need and sid not in recompute and hi > covered.get(sid, 0) and lo < need[sid]
            for sid, (lo, hi) in _writes(p).items())), None)
        if first is not None:
            out += plans[first:]
    return out, recompute


def _replayable(history: Mapping[int, list[StepPlan]], sid: int, have: int, need: int) -> bool:
    """Whether the ring's plans rebuild positions ``have..need-1`` of the sequence, in order."""
    writes = sorted(_writes(p)[sid] for plans in history.values() for p in plans if sid in _writes(p))
    for lo, hi in writes:
        if lo <= have:
            have = max(have, hi)
    return have >= need


def for_replay(plan: StepPlan, until: str, live: set[int]) -> StepPlan:
    """A copy that stops at ``until``, routes its MoE layers there exactly as recorded, and sends the K/V
    of sequences no longer ``live`` to the scratch block. (Those rows attend to scratch data now; with
    the recorded routing the experts still group the rows as before, so the live rows' arithmetic and
    K/V come out bit for bit.)"""
    dead = [sid for sid in plan.seq_ids if sid not in live]
    return dataclasses.replace(plan, replay_until=until, forced=plan.routing.get(until), routing={},
                               new_seqs={}, release=[], scratch_seqs=dead)
