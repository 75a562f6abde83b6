"""Disaggregated serving (DejaVu): prompts are prefilled on the prompt pipeline, their KV streams layer
by layer to the token pipeline, and a request joins a decode microbatch once every token stage has
acknowledged its KV. If the prompt pipeline is lost, its unfinished prefills are redone on the token
pipeline (which holds every layer) and nothing is lost.
"""
from __future__ import annotations

import time
from collections.abc import Callable

from dejavu_py import log
from dejavu_py.coordinator.colocated import recompute_notes
from dejavu_py.coordinator.driver import RecoverInfo
from dejavu_py.coordinator.prefill_scheduler import PrefillScheduler
from dejavu_py.coordinator.scheduler import Scheduler
from dejavu_py.coordinator.sequence import Sequence, Status
from dejavu_py.protocol.layout import Member
from dejavu_py.protocol.plan import KVAck, StepResult, StepRouting, Stop

_log = log.get(__name__)


class DisaggDriver:
    """A Driver (coordinator/driver.py) over two pipelines: prefills on the prompt pipeline, decoding
    on the token pipeline once its KV has arrived."""

    def __init__(self, prefill: PrefillScheduler, decode: Scheduler, prompt: tuple[Member, ...],
                 token: tuple[Member, ...], send: Callable[[str, object], None]) -> None:
        self.prefill, self.decode = prefill, decode
        self.prompt, self.token, self.send = prompt, token, send
        self.acks: dict[int, set[str]] = {}  # seq -> token stages holding its KV
        self.kv_bytes: dict[int, int] = {}
        self.prefilled: dict[int, Sequence] = {}  # first token known, KV maybe still arriving
        self.prompt_alive = True
        self.redone = 0

    @property
    def decode_scheduler(self) -> Scheduler:
        return self.decode

    def add(self, seq: Sequence) -> None:
        (self.prefill if self.prompt_alive else self.decode).add(seq)

    def fill(self) -> None:
        if self.prompt_alive:
            for mb in self.prefill.idle_slots():
                plan = self.prefill.schedule(mb)
                if plan is None:
                    break
                for sid in plan.seq_ids:
                    self.acks[sid] = set()
                self.send(self.prompt[0].name, plan)
        for plan in self.decode.schedule_all():
            self.send(self.token[0].name, plan)

    def abort(self, seq: Sequence) -> bool:
        """Its client cancelled it. Waiting for a prefill or in the token pipeline: it leaves now, its
        blocks are free. Its prefill in flight or its KV on the way: it ends now, and its token-side
        blocks are freed once every token stage holds its KV (none lands in another's blocks then)."""
        if seq.cancelled or (seq.status is Status.FINISHED and seq.seq_id not in self.prefilled):
            return False  # answered already (one that stopped at its first token is not, until its KV is in)
        if self.prefill.abort(seq) or self.decode.abort(seq):
            seq.cancel()
            return True
        if seq.seq_id in self.prefilled or self.prefill.in_flight(seq):
            seq.cancel()  # the rest when its KV is all there (_ready) or its prefill is redone (recover)
            return True
        return False

    def counts(self) -> tuple[int, int]:
        waiting = len(self.prefill.waiting) + len(self.decode.waiting)
        # copies first: another thread may ask (the engine's state) while the loop changes them
        prefilling = sum(len(seqs) for _, seqs in list(self.prefill.inflight.values())) + len(self.prefilled)
        return self.decode.num_active() - len(self.decode.waiting) + prefilling, waiting

    def busy(self) -> bool:
        return bool(self.prefill.waiting or self.prefill.inflight or self.prefilled) or self.decode.has_work()

    def on_message(self, source: str, msg: object) -> list[Sequence]:
        if isinstance(msg, StepResult) and source == self.prompt[-1].name:
            return self._prefilled(self.prefill.on_result(msg))
        if isinstance(msg, KVAck):
            return self._acked(msg)
        if isinstance(msg, StepResult) and source == self.token[-1].name:
            return self.decode.on_result(msg)
        if isinstance(msg, StepRouting):  # a token stage's large record (a prompt's), off the chain
            self.decode.on_routing(msg)
            return []
        raise RuntimeError(f"unexpected {type(msg).__name__} from {source}")

    def _prefilled(self, seqs: list[Sequence]) -> list[Sequence]:
        now = time.monotonic()
        for seq in seqs:
            seq.t_prefilled = now
            self.prefilled[seq.seq_id] = seq
        return self._ready([s.seq_id for s in seqs])

    def _acked(self, ack: KVAck) -> list[Sequence]:
        for sid, nbytes in zip(ack.seq_ids, ack.bytes):
            if sid in self.acks:  # else: a late ack for a prefill that was redone
                self.acks[sid].add(ack.stage)
                self.kv_bytes[sid] = self.kv_bytes.get(sid, 0) + nbytes
        return self._ready(ack.seq_ids)

    def _ready(self, seq_ids: list[int]) -> list[Sequence]:
        """Sequences with first token and all KV: join decode, or are done (finished at prefill)."""
        need = {t.name for t in self.token}
        finished = []
        for sid in seq_ids:
            seq = self.prefilled.get(sid)
            if seq is None or self.acks.get(sid) != need:
                continue
            del self.prefilled[sid], self.acks[sid]
            seq.t_kv_ready, seq.kv_bytes = time.monotonic(), self.kv_bytes.pop(sid, 0)
            if seq.finish_reason is not None or seq.cancelled:  # stopped at its first token, or
                self.decode.blocks.free(seq.block_table)  # cancelled: free its token-side blocks
                seq.block_table = []
                self.decode.forget(sid)
                if not seq.cancelled:  # a cancelled one was answered when it was cancelled
                    finished.append(seq)
            else:
                self.decode.add(seq)
        return finished

    def on_member_lost(self, name: str, why: str) -> None:
        if name not in {m.name for m in self.prompt}:
            raise RuntimeError(f"worker of {name} {why}")
        if self.prompt_alive:
            self._lose_prompt_pipeline(name, why)

    def _lose_prompt_pipeline(self, name: str, why: str) -> None:
        """Redo on the token pipeline every prefill whose KV is not all there; nothing is lost."""
        self.prompt_alive = False
        # Cancelled ones are dropped with their token-side blocks held: the token pipeline writes its
        # own prefills now, in no order with the prompt stages' late KV.
        redo = [s for s in self.prefill.drain() if not s.cancelled]
        for sid, seq in list(self.prefilled.items()):
            if seq.finish_reason is None and not seq.cancelled:  # finished ones keep their blocks: late
                redo.append(seq)  # KV may still land there
                del self.prefilled[sid]
        for seq in redo:
            self.acks.pop(seq.seq_id, None)
            self.kv_bytes.pop(seq.seq_id, None)
            seq.restart()
            self.decode.add(seq)
        self.redone = len(redo)
        _log.warning("prompt stage %s %s: %d prefills redone on the token pipeline", name, why, len(redo))
        for m in self.prompt:
            if m.name != name:
                self.send(m.name, Stop(f"prompt pipeline lost {name}", forward=False))

    def recover(self, failed: set[str], keep_kv: bool = False) -> RecoverInfo:
        """A failed token stage: running sequences recompute their KV on the token pipeline. Either
        kind: prefills in flight, and prefilled sequences whose KV did not all arrive, are prefilled
        again on the (repaired) prompt pipeline."""
        dropped, redo = 0, []
        token_failed = failed & {m.name for m in self.token}
        if token_failed:
            dropped, redo = (self.decode.drop_inflight(), []) if keep_kv else self.decode.rollback()
        need = {t.name for t in self.token}
        incomplete = [s for sid, s in self.prefilled.items() if self.acks.get(sid) != need or token_failed]
        for seq in incomplete:
            del self.prefilled[seq.seq_id]
            self.acks.pop(seq.seq_id, None)
            self.kv_bytes.pop(seq.seq_id, None)
        for seq in incomplete + [s for _, seqs in self.prefill.inflight.values() for s in seqs]:
            if seq.cancelled:  # not prefilled again (rollback frees its blocks): the token stages forget
                self.decode.forget(seq.seq_id)  # the KV that reached them
        dropped += self.prefill.rollback(incomplete)
        states = {name: (self.decode.states() if name in token_failed else {}) for name in failed}
        notes = recompute_notes(dropped, redo)
        notes["prefills_redone"] = sum(not s.cancelled for s in incomplete)
        return RecoverInfo(states, redo, notes)

    def live_pipelines(self) -> list[tuple[Member, ...]]:
        return ([self.prompt] if self.prompt_alive else []) + [self.token]

    def notes(self) -> dict:
        return {"prompt_pipeline_lost": not self.prompt_alive, "prefills_redone": self.redone,
                "max_running": self.decode.max_running}
