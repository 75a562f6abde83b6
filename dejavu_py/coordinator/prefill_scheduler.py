"""Disaggregated prefill: the prompt pipeline's scheduler. It decides; it never computes.

A waiting request is admitted to a prefill microbatch only when both its prompt fits the prompt
stages' cache and its whole reservation (prompt + max new tokens) fits the token stages' cache: the
token-side blocks are reserved here, where its KV will land, and kept through decode.
"""
from __future__ import annotations

import collections
import time

from dejavu_py.config import SchedulerConfig
from dejavu_py.coordinator.block_manager import BlockManager
from dejavu_py.coordinator.sequence import Sequence, Status
from dejavu_py.protocol.plan import StepCounter, StepPlan, StepResult


class PrefillScheduler:
    def __init__(self, cfg: SchedulerConfig, prompt_blocks: BlockManager, token_blocks: BlockManager,
                 num_microbatches: int, stop_ids: frozenset[int], steps: StepCounter | None = None) -> None:
        self.cfg = cfg
        self.prompt_blocks, self.token_blocks = prompt_blocks, token_blocks
        self.num_microbatches = num_microbatches
        self.stop_ids = stop_ids
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.inflight: dict[int, tuple[StepPlan, list[Sequence]]] = {}
        self._release: list[int] = []
        self.steps = steps or StepCounter()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def abort(self, seq: Sequence) -> bool:
        """Its client cancelled it while it waits here: it leaves the queue, and the token-side blocks a
        redo kept for it are free (a prefill's late KV reaches them before any later prefill's, on the
        same edges). False when it is not waiting (a prefill in flight ends on its own)."""
        for i, s in enumerate(self.waiting):
            if s is seq:
                del self.waiting[i]
                self.token_blocks.free(seq.block_table)
                seq.block_table = []
                return True
        return False

    def in_flight(self, seq: Sequence) -> bool:
        return any(s is seq for _, seqs in self.inflight.values() for s in seqs)

    def idle_slots(self) -> list[int]:
        return [m for m in range(self.num_microbatches) if m not in self.inflight]

    def schedule(self, mb: int) -> StepPlan | None:
        """A prefill plan for slot ``mb``, or None when nothing can be admitted."""
        seqs: list[Sequence] = []
        budget = self.cfg.max_batch_tokens
        while self.waiting and len(seqs) < self.cfg.max_batch_size:
            seq = self.waiting[0]
            if seqs and seq.prompt_len > budget:
                break
            if seq.block_table:  # a redo keeps its token-side reservation (and so its partition)
                part = seq.mb if self.token_blocks.partitions > 1 else 0
            else:
                part = self._partition_for(seq)
            if part is None or not self.prompt_blocks.can_allocate(seq.prompt_len):
                break
            self.waiting.popleft()
            seq.prompt_table = self.prompt_blocks.allocate(seq.prompt_len)
            if not seq.block_table:
                seq.block_table = self.token_blocks.allocate(seq.max_len, part)
                seq.mb = part if self.token_blocks.partitions > 1 else None
            seq.status, seq.t_admitted = Status.RUNNING, time.monotonic()
            seqs.append(seq)
            budget -= seq.prompt_len
        if not seqs:
            return None
        plan = StepPlan(mb=mb, step=self.steps.next(), seq_ids=[s.seq_id for s in seqs], start_pos=[0] * len(seqs),
                        num_tokens=[s.prompt_len for s in seqs],
                        input_ids=[t for s in seqs for t in s.request.input_ids], wants_token=[True] * len(seqs))
        plan.new_seqs = {s.seq_id: s.state(table=s.prompt_table, kv_table=s.block_table) for s in seqs}
        plan.release, self._release = self._release, []
        self.inflight[mb] = (plan, seqs)
        return plan

    def _partition_for(self, seq: Sequence) -> int | None:
        """The token-side partition (decode microbatch) with the most room that holds it, if any."""
        bm = self.token_blocks
        fits = [p for p in range(bm.partitions) if bm.can_allocate(seq.max_len, p)]
        return max(fits, key=lambda p: (bm.num_free(p), -p)) if fits else None

    def on_result(self, result: StepResult) -> list[Sequence]:
        """First tokens of a prefill step; returns its sequences (their prompt blocks are free again)."""
        plan, seqs = self.inflight.get(result.mb, (None, []))
        if plan is None or plan.step != result.step:  # dropped by a recovery
            return []
        del self.inflight[result.mb]
        tokens = dict(zip(result.seq_ids, result.token_ids))
        for seq in seqs:
            seq.num_cached = seq.prompt_len  # once its KV has landed on the token stages
            if not seq.cancelled:
                seq.append(tokens[seq.seq_id], self.stop_ids)
            self.prompt_blocks.free(seq.prompt_table)
            seq.prompt_table = []
            self._release.append(seq.seq_id)
        return seqs

    def rollback(self, redo: list[Sequence]) -> int:
        """Prefills in flight go back to the front of the queue, with ``redo`` (whose KV did not all
        arrive); their token-side reservations stay. Returns the plans dropped."""
        dropped = len(self.inflight)
        back = [s for s in self._release_inflight() + redo if not self._drop_cancelled(s)]
        for seq in redo:
            if not seq.cancelled:
                seq.restart()
        for seq in reversed(back):
            self.waiting.appendleft(seq)
        return dropped

    def _drop_cancelled(self, seq: Sequence) -> bool:
        """A cancelled sequence is not prefilled again: its token-side blocks are free, the prompt
        stages forget it."""
        if not seq.cancelled:
            return False
        self.token_blocks.free(seq.block_table)
        seq.block_table = []
        self._release.append(seq.seq_id)
        return True

    def drain(self) -> list[Sequence]:
        """Everything waiting or in flight (the prompt pipeline is gone): their prefills must be redone."""
        out = list(self.waiting)
        self.waiting.clear()
        return out + self._release_inflight()

    def _release_inflight(self) -> list[Sequence]:
        """The sequences of the prefills in flight, their prompt-side blocks freed; none stays in flight."""
        out = []
        for _, seqs in self.inflight.values():
            for seq in seqs:
                self.prompt_blocks.free(seq.prompt_table)
                seq.prompt_table = []
                out.append(seq)
        self.inflight.clear()
        return out
