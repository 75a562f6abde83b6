"""The scheduler decides; it never computes. Continuous batching over microbatch slots.

Each of the M microbatch slots holds a set of running sequences. When a slot's step comes back, its
finished sequences leave, waiting requests join (FIFO, if their whole KV reservation fits and the
step's token budget allows), and the slot's next plan is built. Slots are filled evenly so that every
pipeline stage has work: a slot takes at most ceil(active sequences / M).

Asynchronous scheduling (``depth`` 2): a slot's next plan is built while its last one is still in
flight, so that the stage can launch it before the last step's tokens reach the host. Each sequence of
the plan in flight goes on with a placeholder for the token that step will sample (``-(row + 1)``: the
row of that step's result, ``StepPlan.follows``), unless that token will end it by length. A sequence
that stops early (a stop token) runs one step more, whose token is dropped. Placeholders are filled in
when the step they wait for comes back, so that the completed plans (replayed after a failure) hold
the real tokens.
"""
from __future__ import annotations

import collections
import math
import time

from dejavu_py.config import SchedulerConfig
from dejavu_py.coordinator.block_manager import BlockManager
from dejavu_py.coordinator.sequence import Sequence, Status
from dejavu_py.protocol.plan import (
    SeqState,
    StepCounter,
    StepPlan,
    StepResult,
    StepRouting,
)


class Scheduler:
    def __init__(
        self,
        cfg: SchedulerConfig,
        blocks: BlockManager,
        num_microbatches: int,
        stop_ids: frozenset[int],
        steps: StepCounter | None = None,
        history: int = 100,
        depth: int = 1,
    ) -> None:
        self.cfg = cfg
        self.blocks = blocks
        self.num_microbatches = num_microbatches
        self.stop_ids = stop_ids
        """The model's end-of-sequence ids (none with --ignore-eos); a request may ignore them."""
        self.seqs: dict[int, Sequence] = {}
        """Sequences waiting or running here (a finished or cancelled one leaves)."""
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: dict[int, list[Sequence]] = {m: [] for m in range(num_microbatches)}
        self.depth = depth
        """Plans in flight per microbatch: 1, or 2 with asynchronous scheduling."""
        self.inflight: dict[int, list[StepPlan]] = {}
        """Plans sent and not yet answered, oldest first, per microbatch."""
        self._release: list[int] = []
        self.steps = steps or StepCounter()
        self._announce: set[int] = set()  # sequences whose state the next plans repeat (after a rollback)
        self.history: dict[int, collections.deque[StepResult | StepPlan]] = {
            m: collections.deque(maxlen=history) for m in range(num_microbatches)}
        """Completed plans per microbatch, with every stage's routing: the coordinator's token-state
        checkpoints, what a replay re-runs."""
        self._routing: dict[int, dict[str, list]] = {}
        """Routing records of steps whose result has not come back yet (stages send them on their own)."""
        self.max_running = 0
        """Most sequences ever running at once (all microbatches together)."""

    # -- state ---------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if self.blocks.blocks_for(seq.max_len) > self.blocks.per_partition:
            raise ValueError(f"sequence {seq.seq_id} needs more KV blocks than the cache has")
        self.seqs[seq.seq_id] = seq
        self.waiting.append(seq)

    def abort(self, seq: Sequence) -> bool:
        """Its client cancelled it: it leaves the queue or its microbatch now, its blocks are free and
        the stages forget it with the next plan; the token of a plan in flight for it will be dropped.
        False when it is not here."""
        if self.seqs.pop(seq.seq_id, None) is None:
            return False
        _remove(self.waiting, seq)
        if seq.mb is not None:
            _remove(self.running[seq.mb], seq)
        self.blocks.free(seq.block_table)
        seq.block_table = []
        self._announce.discard(seq.seq_id)
        self._release.append(seq.seq_id)
        return True

    def forget(self, seq_id: int) -> None:
        """The stages forget a sequence that never ran here (its prefill's KV reached them)."""
        self._release.append(seq_id)

    def idle_slots(self) -> list[int]:
        return [m for m in range(self.num_microbatches) if len(self.inflight.get(m, ())) < self.depth]

    def has_work(self) -> bool:
        return bool(self.waiting) or bool(self.inflight) or any(self.running.values())

    def num_active(self) -> int:
        return len(self.waiting) + sum(len(r) for r in self.running.values())

    # -- deciding ------------------------------------------------------------------------------
    def schedule(self, mb: int) -> StepPlan | None:
        """The next step of slot ``mb`` (its running sequences plus admitted ones), or None if empty."""
        queue = self.inflight.setdefault(mb, [])
        assert len(queue) < self.depth, f"microbatch {mb} has {len(queue)} plans in flight"
        prev = queue[-1] if queue else None
        rows = {} if prev is None else {sid: (i, n) for i, (sid, n) in enumerate(zip(prev.seq_ids, prev.num_tokens))}
        admitted = self._admit(mb, len(self.running[mb]))
        seqs = [s for s in self.running[mb] if not (s.seq_id in rows and self._ends_by_length(s))]
        if not seqs:
            if not queue:
                del self.inflight[mb]
            return None
        plan = self._build(mb, seqs, admitted, prev, rows)
        queue.append(plan)
        return plan

    def schedule_all(self) -> list[StepPlan]:
        """Plans for every slot with room, as deep as ``depth`` allows (two rounds when asynchronous)."""
        plans: list[StepPlan] = []
        while True:
            new = [p for p in (self.schedule(mb) for mb in self.idle_slots()) if p is not None]
            if not new:
                return plans
            plans += new

    @staticmethod
    def _ends_by_length(seq: Sequence) -> bool:
        """Whether the token the step in flight samples for ``seq`` is its last by length."""
        return len(seq.output_ids) + 1 >= seq.request.max_new_tokens

    def _admit(self, mb: int, num_running: int) -> list[Sequence]:
        cap = min(self.cfg.max_batch_size, math.ceil(self.num_active() / self.num_microbatches))
        budget = self.cfg.max_batch_tokens - num_running
        admitted: list[Sequence] = []
        partition = mb if self.blocks.partitions > 1 else 0
        for seq in list(self.waiting):
            if num_running + len(admitted) >= cap:
                break
            if seq.block_table and self.blocks.partitions > 1 and seq.mb != mb:
                continue  # its KV lives in another microbatch's partition: it joins that one
            # A prompt longer than the budget still runs, as the only prefill of its step.
            if admitted and seq.prompt_len > budget:
                break
            if not seq.block_table:  # disaggregated: reserved when its prefill was admitted
                if not self.blocks.can_allocate(seq.max_len, partition):
                    break
                seq.block_table = self.blocks.allocate(seq.max_len, partition)
            self.waiting.remove(seq)
            seq.status, seq.mb = Status.RUNNING, mb
            seq.t_admitted = seq.t_admitted or time.monotonic()  # disaggregated: set at prefill admission
            admitted.append(seq)
            budget -= seq.prompt_len
        self.running[mb].extend(admitted)
        self.max_running = max(self.max_running, sum(len(r) for r in self.running.values()))
        return admitted

    def _build(self, mb: int, seqs: list[Sequence], admitted: list[Sequence], prev: StepPlan | None,
               rows: dict[int, tuple[int, int]]) -> StepPlan:
        """``rows``: each sequence of ``prev`` (the plan in flight), its row there and its tokens."""
        plan = StepPlan(mb=mb, step=self.steps.next(), seq_ids=[], start_pos=[], num_tokens=[], input_ids=[], wants_token=[])
        for seq in seqs:
            if seq.seq_id in rows:  # goes on from the step in flight: its input is that step's token
                row, n = rows[seq.seq_id]
                start, new = seq.num_cached + n, [-(row + 1)]
                plan.follows = prev.step
            else:
                start, new = seq.next_input()
            plan.seq_ids.append(seq.seq_id)
            plan.start_pos.append(start)
            plan.num_tokens.append(len(new))
            plan.input_ids.extend(new)
            plan.wants_token.append(True)
        announce = {s.seq_id for s in admitted} | {s.seq_id for s in seqs if s.seq_id in self._announce}
        self._announce -= announce
        plan.new_seqs = {s.seq_id: s.state() for s in seqs if s.seq_id in announce}
        plan.release, self._release = self._release, []
        return plan

    # -- results -------------------------------------------------------------------------------
    def on_result(self, result: StepResult) -> list[Sequence]:
        """Apply a step's sampled tokens; returns the sequences that finished with it. A result of a
        plan dropped by a recovery is ignored, but not the other stages' routing records it brings."""
        for rec in result.relayed:
            self.on_routing(rec)
        queue = self.inflight.get(result.mb)
        if not queue or queue[0].step != result.step:
            return []
        plan = queue.pop(0)
        if not queue:
            del self.inflight[result.mb]
        elif queue[0].follows == plan.step:
            _fill_placeholders(queue[0], result.token_ids)
        plan.routing = self._routing.pop(plan.step, {})
        self.history[result.mb].append(plan)
        finished = []
        seqs = self.seqs
        for sid, n in zip(plan.seq_ids, plan.num_tokens):
            if sid in seqs:
                seqs[sid].num_cached += n
        for sid, token in zip(result.seq_ids, result.token_ids):
            seq = seqs.get(sid)
            if seq is None or seq.status is Status.FINISHED:  # stopped the step before (this token comes
                continue  # from the step ahead), or cancelled
            if seq.append(token, self.stop_ids):
                finished.append(seq)
        for seq in finished:
            self._retire(seq)
        return finished

    def on_routing(self, rec: StepRouting) -> None:
        """A stage's routing of a step: kept until the step's result (the usual order: a few plans in
        flight to look through), or into its plan in the history."""
        if any(p.step == rec.step for p in self.inflight.get(rec.mb, ())):
            self._routing.setdefault(rec.step, {})[rec.stage] = rec.routing
            return
        for plan in reversed(self.history.get(rec.mb, ())):
            if plan.step == rec.step:
                plan.routing[rec.stage] = rec.routing
                return

    def drop_inflight(self) -> int:
        """After a failure whose KV can be restored: forget the plans in flight (their sequences'
        positions did not advance, so the next plans recompute those steps on every stage)."""
        dropped = sum(len(q) for q in self.inflight.values())
        self.inflight.clear()
        self._routing.clear()
        self._announce = {s.seq_id for r in self.running.values() for s in r}
        return dropped

    def rollback(self) -> tuple[int, list[Sequence]]:
        """After a stage lost its KV: drop the plans in flight (they will be re-planned) and make every
        running or admitted sequence recompute its KV from its tokens (prompt and output so far).
        Returns (plans dropped, sequences to recompute)."""
        dropped = sum(len(q) for q in self.inflight.values())
        self.inflight.clear()
        self._routing.clear()
        redo = [s for r in self.running.values() for s in r] + [s for s in self.waiting if s.num_cached]
        for seq in redo:
            seq.num_cached = 0
        # A dropped plan may have been the one that announced a sequence: announce them all again.
        self._announce = {s.seq_id for r in self.running.values() for s in r}
        return dropped, redo

    def states(self) -> dict[int, SeqState]:
        """What stages must know of every sequence holding blocks (for a replacement)."""
        held = [s for r in self.running.values() for s in r] + [s for s in self.waiting if s.block_table]
        return {s.seq_id: s.state() for s in held}

    def _retire(self, seq: Sequence) -> None:
        self.running[seq.mb].remove(seq)
        del self.seqs[seq.seq_id]
        self.blocks.free(seq.block_table)
        self._release.append(seq.seq_id)
        seq.block_table = []


def _remove(seqs: list[Sequence] | collections.deque[Sequence], seq: Sequence) -> None:
    """Take ``seq`` itself out of ``seqs`` if it is there (by identity: comparing sequences field by
    field would be slow)."""
    for i, s in enumerate(seqs):
        if s is seq:
            del seqs[i]
            return


def _fill_placeholders(plan: StepPlan, tokens: list[int]) -> None:
    """The tokens of the step ``plan`` follows, in place of its placeholders (``-(row + 1)``)."""
    plan.input_ids = [tokens[-t - 1] if t < 0 else t for t in plan.input_ids]
    plan.follows = None
