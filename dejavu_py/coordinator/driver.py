"""What the coordinator's drivers (colocated, disaggregated) share: the interface the coordinator and a
recovery call, and what a driver decided after a failure."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from dejavu_py.coordinator.scheduler import Scheduler
from dejavu_py.coordinator.sequence import Sequence
from dejavu_py.protocol.layout import Member
from dejavu_py.protocol.plan import SeqState


@dataclass
class RecoverInfo:
    """What a driver decided after a failure: states each replacement must learn, and the
    sequences whose KV is recomputed."""

    states: dict[str, dict[int, SeqState]]
    redo: list[Sequence]
    notes: dict[str, Any] = field(default_factory=dict)

    def states_for(self, name: str) -> dict[int, SeqState]:
        return self.states.get(name, {})


class Driver(Protocol):
    """Turns every message of the stages into the next plans. The coordinator only moves messages and
    a recovery only repairs members: neither needs to know whether one pipeline serves everything
    (ColocatedDriver) or a prompt pipeline feeds a token pipeline (DisaggDriver)."""

    @property
    def decode_scheduler(self) -> Scheduler:
        """The scheduler of the pipeline that decodes: its plans are the ones a recovery replays."""
        ...

    def add(self, seq: Sequence) -> None:
        """A request has arrived."""
        ...

    def fill(self) -> None:
        """Send the plans that fit now."""
        ...

    def abort(self, seq: Sequence) -> bool:
        """Its client cancelled it: end it now (out of the queue or its microbatch, blocks freed, the
        stages told to forget it; whatever is in flight for it is dropped when it comes). False when it
        is not being served (finished already)."""
        ...

    def counts(self) -> tuple[int, int]:
        """(sequences running, waiting), for the engine's state."""
        ...

    def busy(self) -> bool:
        """Anything waiting, in flight or not yet finished."""
        ...

    def on_message(self, source: str, msg: object) -> list[Sequence]:
        """A stage's message; returns the sequences it finished."""
        ...

    def on_member_lost(self, name: str, why: str) -> None:
        """A member was lost with fault tolerance off: carry on without it, or raise."""
        ...

    def recover(self, failed: set[str], keep_kv: bool = False) -> RecoverInfo:
        """The members ``failed`` are being replaced: drop or roll back what they held."""
        ...

    def live_pipelines(self) -> list[tuple[Member, ...]]:
        """The pipelines still serving (the stop marker travels down each)."""
        ...

    def notes(self) -> dict:
        """The driver's figures for summary.json."""
        ...
