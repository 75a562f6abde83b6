"""What the coordinator's drivers (colocated, disaggregated) share: what a driver decided after a failure."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dejavu_py.protocol.plan import SeqState


@dataclass
class RecoverInfo:
    """What a driver decided after a failure: states each replacement must learn, and the
    sequences whose KV is recomputed."""

    states: dict[str, dict[int, SeqState]]
    redo: list[Any]
    notes: dict[str, Any] = field(default_factory=dict)

    def states_for(self, name: str) -> dict[int, SeqState]:
        return self.states.get(name, {})
