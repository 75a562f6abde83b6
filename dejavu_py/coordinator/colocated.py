"""Colocated serving: one pipeline prefills and decodes (continuous batching over its microbatches)."""
from __future__ import annotations

from collections.abc import Callable

from dejavu_py.coordinator.driver import RecoverInfo
from dejavu_py.coordinator.scheduler import Scheduler
from dejavu_py.coordinator.sequence import Sequence
from dejavu_py.protocol.layout import Member
from dejavu_py.protocol.plan import StepResult, StepRouting


def recompute_notes(dropped: int, redo: list[Sequence]) -> dict:
    return {"plans_dropped": dropped, "sequences_recomputed": len(redo),
            "tokens_recomputed": sum(s.prompt_len + len(s.output_ids) for s in redo)}


class ColocatedDriver:
    """A Driver (coordinator/driver.py): turns results of the stage pipeline into the next plans; the
    coordinator moves messages."""

    def __init__(self, sched: Scheduler, pipeline: tuple[Member, ...], send: Callable[[str, object], None]) -> None:
        self.sched, self.pipeline, self.send = sched, pipeline, send

    @property
    def decode_scheduler(self) -> Scheduler:
        return self.sched

    def add(self, seq: Sequence) -> None:
        self.sched.add(seq)

    def fill(self) -> None:
        for plan in self.sched.schedule_all():
            self.send(self.pipeline[0].name, plan)

    def abort(self, seq: Sequence) -> bool:
        if not self.sched.abort(seq):
            return False
        seq.cancel()
        return True

    def counts(self) -> tuple[int, int]:
        return self.sched.num_active() - len(self.sched.waiting), len(self.sched.waiting)

    def busy(self) -> bool:
        return self.sched.has_work()

    def on_message(self, source: str, msg: object) -> list[Sequence]:
        if isinstance(msg, StepResult) and source == self.pipeline[-1].name:
            return self.sched.on_result(msg)
        if isinstance(msg, StepRouting):  # a large record (a prompt's), sent off the pipeline's chain
            self.sched.on_routing(msg)
            return []
        raise RuntimeError(f"unexpected {type(msg).__name__} from {source}")

    def on_member_lost(self, name: str, why: str) -> None:
        raise RuntimeError(f"worker of {name} {why}")

    def recover(self, failed: set[str], keep_kv: bool = False) -> RecoverInfo:
        """Plans in flight are dropped. With ``keep_kv`` the failed stages get their KV back (replica
        and replay); otherwise every running sequence recomputes its KV from its tokens."""
        if keep_kv:
            dropped, redo = self.sched.drop_inflight(), []
        else:
            dropped, redo = self.sched.rollback()
        states = self.sched.states()
        return RecoverInfo({n: states for n in failed}, redo, recompute_notes(dropped, redo))

    def live_pipelines(self) -> list[tuple[Member, ...]]:
        return [self.pipeline]

    def notes(self) -> dict:
        return {"max_running": self.sched.max_running}
