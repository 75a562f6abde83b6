"""The scheduler on its own (no processes): asynchronous scheduling (two plans in flight per microbatch)
gives every sequence exactly the tokens of one plan at a time, whatever stops it.

A stand-in stage answers plans in order the way a stage does: it resolves a plan's placeholders from
the tokens it sampled for the step the plan follows (as a GPU stage reads them on its device), and its
"model" is a pure function of a sequence's tokens so far, so the outputs do not depend on how steps
were batched. Requests stop by length, on a model stop id, on their own stop ids, or on the first token.
"""
from __future__ import annotations

import random

import pytest

from dejavu_py.config import SchedulerConfig
from dejavu_py.coordinator.block_manager import BlockManager
from dejavu_py.coordinator.request import Request
from dejavu_py.coordinator.scheduler import Scheduler
from dejavu_py.coordinator.sequence import Sequence
from dejavu_py.protocol.plan import StepPlan, StepResult, StepRouting
from dejavu_py.protocol.sampling import SamplingParams

STOP = 2  # the model's stop id
VOCAB = 50


def _next_token(tokens: list[int]) -> int:
    return (sum(t * (i + 7) for i, t in enumerate(tokens)) * 2654435761) % VOCAB


class _Stage:
    """Answers plans in order; keeps each sequence's tokens as the KV cache would hold them."""

    def __init__(self) -> None:
        self.sampled: dict[int, list[int]] = {}
        self.context: dict[int, list[int]] = {}
        self.rows = 0

    def run(self, plan: StepPlan) -> StepResult:
        ids = list(plan.input_ids)
        if plan.follows is not None:
            prev = self.sampled[plan.follows]
            ids = [prev[-t - 1] if t < 0 else t for t in ids]
        assert all(t >= 0 for t in ids), f"plan {plan.step}: unresolved placeholder {ids}"
        out, at = [], 0
        for sid, start, n in zip(plan.seq_ids, plan.start_pos, plan.num_tokens):
            ctx = self.context.setdefault(sid, [])
            assert len(ctx) == start, f"sequence {sid}: plan {plan.step} starts at {start}, cache holds {len(ctx)}"
            ctx.extend(ids[at:at + n])
            at += n
            out.append(_next_token(ctx))
        self.rows += len(plan.seq_ids)
        self.sampled[plan.step] = out
        return StepResult(plan.mb, plan.step, list(plan.seq_ids), out)


def _requests(n: int, seed: int) -> list[Request]:
    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        prompt = [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 12))]
        stop = (_next_token(prompt),) if i % 5 == 0 else tuple(rng.sample(range(3, VOCAB), 2))
        reqs.append(Request(line=i + 1, id=f"r{i}", input_ids=prompt, max_new_tokens=rng.randint(1, 20),
                            sampling=SamplingParams(), stop_token_ids=stop))
    return reqs


def _serve(depth: int, microbatches: int, reqs: list[Request]) -> tuple[dict, Scheduler, _Stage]:
    sched = Scheduler(SchedulerConfig(max_batch_size=4, max_batch_tokens=64), BlockManager(400, 4),
                      microbatches, frozenset({STOP}), depth=depth)
    seqs = [Sequence(i, r) for i, r in enumerate(reqs)]
    for s in seqs:
        sched.add(s)
    stage, queue, steps = _Stage(), [], 0
    while sched.has_work():
        queue += sched.schedule_all()
        assert queue, "work left but nothing in flight"
        assert all(len(q) <= depth for q in sched.inflight.values())
        sched.deepest = max(getattr(sched, "deepest", 0), *map(len, sched.inflight.values()))
        plan = queue.pop(0)
        sched.on_result(stage.run(plan))
        steps += 1
        assert steps < 10_000
    return {s.request.id: (s.output_ids, s.finish_reason) for s in seqs}, sched, stage


@pytest.mark.parametrize("microbatches", [1, 2])
def test_two_plans_in_flight_give_the_same_tokens(microbatches):
    reqs = _requests(23, seed=microbatches)
    sync, _, _ = _serve(1, microbatches, reqs)
    async_, sched, stage = _serve(2, microbatches, reqs)
    assert async_ == sync
    assert sched.deepest == 2  # the next plans were made while the last were in flight
    for r in reqs:  # each ends as the reference loop says: its length, or right after a stop id
        out, reason = sync[r.id]
        want = [STOP] + list(r.stop_token_ids)
        assert (reason == "stop" and out[-1] in want) or (reason == "length" and len(out) == r.max_new_tokens)
    assert any(len(out) == 1 and reason == "stop" for out, reason in sync.values())  # stopped on its first token
    for hist in sched.history.values():  # completed plans hold real tokens: what a replay re-runs
        assert all(p.follows is None and min(p.input_ids) >= 0 for p in hist)
    # A sequence that stops on a stop id ran one step more than it needed, and no other did.
    extra = sum(1 for out, reason in sync.values() if reason == "stop")
    needed = sum(len(out) for out, _ in sync.values())
    assert stage.rows <= needed + extra


def test_plans_follow_the_one_in_flight():
    reqs = [Request(line=1, id="a", input_ids=[5, 6, 7], max_new_tokens=3, sampling=SamplingParams())]
    sched = Scheduler(SchedulerConfig(max_batch_size=4, max_batch_tokens=64), BlockManager(40, 4), 1,
                      frozenset(), depth=2)
    sched.add(Sequence(0, reqs[0]))
    first, second = sched.schedule(0), sched.schedule(0)
    assert first.input_ids == [5, 6, 7] and first.follows is None
    assert second.follows == first.step and second.input_ids == [-1] and second.start_pos == [3]
    assert sched.idle_slots() == []
    sched.on_result(StepResult(0, first.step, [0], [11]))
    assert second.input_ids == [11] and second.follows is None  # filled in for the history
    third = sched.schedule(0)
    assert third.follows == second.step and third.start_pos == [4]
    sched.on_result(StepResult(0, second.step, [0], [12]))
    assert sched.schedule(0) is None  # the token of the step in flight is its last (length 3)


def test_stage_routing_joins_its_step_in_either_order():
    """A stage's routing record (``StepRouting``), before the step's result comes back or after it, ends
    in that step's plan in the history; a record of a plan that is no longer in flight (dropped at a
    failure) is not kept."""
    reqs = [Request(line=1, id="a", input_ids=[5, 6], max_new_tokens=4, sampling=SamplingParams())]
    sched = Scheduler(SchedulerConfig(max_batch_size=4, max_batch_tokens=64), BlockManager(40, 4), 1,
                      frozenset(), depth=2)
    sched.add(Sequence(0, reqs[0]))
    first, second = sched.schedule(0), sched.schedule(0)
    sched.on_routing(StepRouting(0, first.step, "s0", ["early"]))
    sched.on_result(StepResult(0, first.step, [0], [11]))
    sched.on_result(StepResult(0, second.step, [0], [12]))
    sched.on_routing(StepRouting(0, second.step, "s0", ["late"]))
    done = {p.step: p.routing for p in sched.history[0]}
    assert done[first.step] == {"s0": ["early"]}
    assert done[second.step] == {"s0": ["late"]}
    third = sched.schedule(0)
    sched.drop_inflight()
    sched.on_routing(StepRouting(0, third.step, "s0", ["stale"]))
    assert not sched._routing and all(p.step != third.step for p in sched.history[0])


def test_routing_relayed_with_a_later_result_joins_its_step_even_if_that_result_is_dropped():
    """Every stage's record of a step reaches the coordinator with a later result: the stages before
    the last send theirs down the pipeline with later plans (``StepPlan.relayed``), the last stage keeps
    its own for its next result. A result the scheduler drops (its plan was in flight at a failure)
    still delivers the records of the earlier steps it carries."""
    reqs = [Request(line=1, id="a", input_ids=[5, 6], max_new_tokens=8, sampling=SamplingParams())]
    sched = Scheduler(SchedulerConfig(max_batch_size=4, max_batch_tokens=64), BlockManager(40, 4), 1,
                      frozenset(), depth=2)
    sched.add(Sequence(0, reqs[0]))
    first, second = sched.schedule(0), sched.schedule(0)
    sched.on_result(StepResult(0, first.step, [0], [11]))
    sched.on_result(StepResult(0, second.step, [0], [12], relayed=[
        StepRouting(0, first.step, "s0", ["a0"]), StepRouting(0, first.step, "s1", ["a1"]),
        StepRouting(0, first.step, "s2", ["a2"])]))
    third = sched.schedule(0)
    sched.drop_inflight()
    sched.on_result(StepResult(0, third.step, [0], [13], relayed=[StepRouting(0, second.step, "s0", ["b0"]),
                                                                  StepRouting(0, second.step, "s2", ["b2"])]))
    done = {p.step: p.routing for p in sched.history[0]}
    assert done == {first.step: {"s0": ["a0"], "s1": ["a1"], "s2": ["a2"]}, second.step: {"s0": ["b0"], "s2": ["b2"]}}


def test_a_large_routing_record_sent_on_its_own_joins_its_step():
    """A batch of prompts' record goes to the coordinator as a message of its own (off the pipeline's
    chain); the driver files it with its step as if it had come with a result."""
    from dejavu_py.coordinator.colocated import ColocatedDriver
    from dejavu_py.protocol.layout import Member

    reqs = [Request(line=1, id="a", input_ids=[5, 6], max_new_tokens=8, sampling=SamplingParams())]
    sched = Scheduler(SchedulerConfig(max_batch_size=4, max_batch_tokens=64), BlockManager(40, 4), 1,
                      frozenset(), depth=2)
    sched.add(Sequence(0, reqs[0]))
    driver = ColocatedDriver(sched, (Member("s0", "stage", 0, None, "coordinator", "coordinator"),), lambda to, msg: None)
    first = sched.schedule(0)
    assert driver.on_message("s0", StepRouting(0, first.step, "s0", ["prompt"])) == []
    assert driver.on_message("s0", StepResult(0, first.step, [0], [11])) == []
    assert sched.history[0][-1].routing == {"s0": ["prompt"]}
