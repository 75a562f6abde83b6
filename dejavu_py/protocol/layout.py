"""Who runs what: pipeline members placed on rank processes, their neighbours and their edges.

Members have short names that key their store entries and edges: ``coord`` (the coordinator, inside
rank 0's supervisor), ``s0..`` for the stages of a colocated pipeline (prefill and decode together),
or, disaggregated, ``p0..`` for the prompt pipeline (prefill) and ``t0..`` for the token pipeline
(decode). The KV of layer l goes from the prompt stage holding l to the token stage holding l.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from dejavu_py.errors import UserError
from dejavu_py.protocol.split import StageSpec, split_stages

if TYPE_CHECKING:
    from dejavu_py.config import RunConfig

COORD = "coord"


@dataclass(frozen=True)
class Member:
    """One stage worker's place in the job."""

    name: str
    """Key of the member in the store and in edge names (``t1``)."""
    role: str
    """'stage' (colocated: prefill and decode), 'prompt' (prefill only) or 'token' (decode)."""
    rank: int
    """Rank process whose supervisor runs this member's worker."""
    stage: StageSpec
    """Layers it owns, within its own pipeline."""
    prev: str
    """Member it receives plans from."""
    next: str
    """Member it sends its output to."""


@dataclass(frozen=True)
class Layout:
    members: tuple[Member, ...]

    def pipeline(self, role: str) -> tuple[Member, ...]:
        return tuple(m for m in self.members if m.role == role)

    @property
    def disaggregated(self) -> bool:
        return any(m.role == "prompt" for m in self.members)

    @property
    def decode_pipeline(self) -> tuple[Member, ...]:
        """The pipeline that decodes: the token stages, or the colocated stages."""
        return self.pipeline("token") or self.pipeline("stage")

    @property
    def prefill_pipeline(self) -> tuple[Member, ...]:
        return self.pipeline("prompt") or self.pipeline("stage")

    def on_rank(self, rank: int) -> list[Member]:
        return [m for m in self.members if m.rank == rank]

    def by_name(self, name: str) -> Member:
        for m in self.members:
            if m.name == name:
                return m
        raise KeyError(name)

    def kv_targets(self, member: Member) -> list[Member]:
        """Token stages that receive KV from a prompt stage (those whose layers overlap its own)."""
        if member.role != "prompt":
            return []
        return [t for t in self.pipeline("token") if set(t.stage.layers) & set(member.stage.layers)]

    def kv_sources(self, member: Member) -> list[Member]:
        """Prompt stages that send KV to a token stage."""
        if member.role != "token":
            return []
        return [p for p in self.pipeline("prompt") if set(p.stage.layers) & set(member.stage.layers)]

    def owner_of_layer(self, role: str, layer: int) -> Member:
        return next(m for m in self.pipeline(role) if layer in m.stage.layers)

    def edges(self) -> list[tuple[str, str]]:
        """Every pair that talks, in one global order. Each member builds its own edges in this order:
        a group forms when both ends join, so a shared order means nobody waits on a cycle."""
        pairs: set[tuple[str, str]] = set()
        for m in self.members:
            pairs.add(_pair(m.prev, m.name))
            pairs.add(_pair(m.name, m.next))
            pairs.add(_pair(COORD, m.name))  # control: acks, results, recovery
            for t in self.kv_targets(m):
                pairs.add(_pair(m.name, t.name))
        pipe = self.decode_pipeline
        if len(pipe) > 2:  # the last stage hands its sampled ids to the first (asynchronous scheduling)
            pairs.add(_pair(pipe[0].name, pipe[-1].name))
        order = {name: i for i, name in enumerate([COORD, *[m.name for m in self.members]])}
        return sorted(pairs, key=lambda p: (order[p[0]], order[p[1]]))

    def replica_holder(self, name: str) -> str | None:
        """The stage that keeps ``name``'s KV replica: the next stage of the decode pipeline, in a ring
        (none with a single decode stage)."""
        ring = [m.name for m in self.decode_pipeline]
        if name not in ring or len(ring) < 2:
            return None
        return ring[(ring.index(name) + 1) % len(ring)]

    def replica_source(self, name: str) -> str | None:
        """The stage whose KV replica ``name`` keeps."""
        ring = [m.name for m in self.decode_pipeline]
        if name not in ring or len(ring) < 2:
            return None
        return ring[ring.index(name) - 1]

    def replica_pairs(self) -> list[tuple[str, str]]:
        """Pairs with a replica channel, in one global order (built after every main edge)."""
        pairs = {_pair(m.name, h) for m in self.decode_pipeline if (h := self.replica_holder(m.name))}
        order = {name: i for i, name in enumerate([COORD, *[m.name for m in self.members]])}
        return sorted(pairs, key=lambda p: (order[p[0]], order[p[1]]))

    def replica_peers_of(self, name: str) -> list[str]:
        return [b if a == name else a for a, b in self.replica_pairs() if name in (a, b)]

    def peers_of(self, name: str) -> list[str]:
        """The members ``name`` has an edge with, in the global edge order."""
        return [b if a == name else a for a, b in self.edges() if name in (a, b)]


def _pair(a: str, b: str) -> tuple[str, str]:
    order = lambda n: (0, 0) if n == COORD else (1, n[0] != "p", int(n[1:]))  # noqa: E731
    return (a, b) if order(a) <= order(b) else (b, a)


def _chain(role: str, prefix: str, specs: list[StageSpec], first_rank: int) -> list[Member]:
    names = [f"{prefix}{i}" for i in range(len(specs))]
    out = []
    for i, spec in enumerate(specs):
        prev = names[i - 1] if i > 0 else COORD
        nxt = names[i + 1] if i + 1 < len(specs) else COORD
        out.append(Member(names[i], role, first_rank + i, spec, prev, nxt))
    return out


def build_layout(cfg: RunConfig, num_layers: int, world_size: int) -> Layout:
    """Colocated: one stage per process. Disaggregated: P prompt stages then T token stages."""
    pc = cfg.pipeline
    if pc.prompt_stages:
        token = pc.token_stages if pc.token_stages is not None else world_size - pc.prompt_stages
        if pc.prompt_stages + token != world_size or token < 1:
            raise UserError(
                f"--prompt-stages {pc.prompt_stages} --token-stages {token}: needs {pc.prompt_stages + token} "
                f"processes (one per stage), the launcher started {world_size}"
            )
        prompt_specs = split_stages(num_layers, pc.prompt_stages, pc.prompt_layers_per_stage, "--prompt-layers-per-stage")
        token_specs = split_stages(num_layers, token, pc.layers_per_stage, "--layers-per-stage")
        members = _chain("prompt", "p", prompt_specs, 0) + _chain("token", "t", token_specs, pc.prompt_stages)
        return Layout(tuple(members))
    stages = pc.stages if pc.stages is not None else world_size
    if stages != world_size:
        raise UserError(
            f"--stages {stages}: the launcher started {world_size} processes; start one process per stage "
            f"(torchrun --nproc-per-node {stages}) or leave --stages unset"
        )
    return Layout(tuple(_chain("stage", "s", split_stages(num_layers, stages, pc.layers_per_stage), 0)))
