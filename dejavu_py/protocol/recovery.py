"""Control messages of a recovery, between the coordinator and the workers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dejavu_py.protocol.plan import SeqState


@dataclass
class Recover:
    """Coordinator -> survivor: these members failed; drop plans up to ``drop_through`` (they were in
    flight and will be re-issued), abort your edges to the failed and rebuild them at ``generation``."""

    generation: int
    failed: list[str]
    drop_through: int


@dataclass
class Rebuilt:
    """Survivor -> coordinator: its edges to the replacements of ``generation`` are up."""

    member: str
    generation: int


@dataclass
class Restore:
    """Coordinator -> replacement: the sequences it must know about (block tables, sampling); their KV
    comes from ``replica_from`` (a bulk replica chunk, applied before any plan) and ``replay`` replayed
    steps follow."""

    seqs: dict[int, SeqState]
    drop_through: int
    replica_from: str | None = None
    replay: int = 0


@dataclass
class ReplicaQuery:
    """Coordinator -> replica holder: ship ``source``'s replica of these sequences to ``to`` (its
    replacement) and report how far each is covered."""

    source: str
    to: str
    tables: dict[int, list[int]]


@dataclass
class Rereplicate:
    """Coordinator -> stage whose replica holder was replaced: send your KV of these sequences again."""

    to: str
    tables: dict[int, list[int]]
    lengths: dict[int, int]


@dataclass
class ReplayQuery:
    """Coordinator -> predecessor of a replacement: which of these (mb, step) have kept activations?"""

    steps: list[tuple[int, int]]


@dataclass
class ReplayHave:
    member: str
    steps: list[tuple[int, int]]


@dataclass
class ReplaySteps:
    """Coordinator -> predecessor: send these plans, with your checkpointed outputs, to ``until``."""

    plans: list[Any]
    until: str


@dataclass
class Replayed:
    """Replacement -> coordinator: replayed ``steps`` steps; ``mismatches`` MoE layers routed
    differently from the record."""

    member: str
    steps: int
    mismatches: int
