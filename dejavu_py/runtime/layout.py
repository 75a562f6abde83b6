"""Who runs what: pipeline members (stages) placed on rank processes, and their neighbours.

Members have short names that also key their store entries and edges: ``coord`` (the coordinator,
inside rank 0's supervisor) and ``s0..sN-1`` for the stages of the pipeline, in order.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import RunConfig
from ..engine.split import StageSpec, split_stages
from ..errors import UserError

COORD = "coord"


@dataclass(frozen=True)
class Member:
    """One stage worker's place in the job."""

    name: str
    """Key of the member in the store and in edge names (``s1``)."""
    role: str
    """'stage' for a colocated pipeline stage (prefill and decode)."""
    rank: int
    """Rank process whose supervisor runs this member's worker."""
    stage: StageSpec
    """Layers it owns."""
    prev: str
    """Member it receives plans from."""
    next: str
    """Member it sends its output to."""


@dataclass(frozen=True)
class Layout:
    members: tuple[Member, ...]

    @property
    def stages(self) -> tuple[Member, ...]:
        return self.members

    @property
    def first(self) -> Member:
        return self.members[0]

    @property
    def last(self) -> Member:
        return self.members[-1]

    def on_rank(self, rank: int) -> list[Member]:
        return [m for m in self.members if m.rank == rank]

    def by_name(self, name: str) -> Member:
        for m in self.members:
            if m.name == name:
                return m
        raise KeyError(name)


def build_layout(cfg: RunConfig, num_layers: int, world_size: int) -> Layout:
    """One stage per rank process; the stage count must match the process count."""
    stages = cfg.pipeline.stages if cfg.pipeline.stages is not None else world_size
    if stages != world_size:
        raise UserError(
            f"--stages {stages}: the launcher started {world_size} processes; start one process per stage "
            f"(torchrun --nproc-per-node {stages}) or leave --stages unset"
        )
    specs = split_stages(num_layers, stages, cfg.pipeline.layers_per_stage)
    names = [f"s{i}" for i in range(stages)]
    members = []
    for i, spec in enumerate(specs):
        prev = names[i - 1] if i > 0 else COORD
        nxt = names[i + 1] if i + 1 < stages else COORD
        members.append(Member(names[i], "stage", i, spec, prev, nxt))
    return Layout(tuple(members))
