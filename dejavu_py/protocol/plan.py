"""What crosses between the scheduler and the stages: a step plan (a list of sequences) and its result.

nano-vllm shape: the scheduler only decides, the stage runners only compute, and only these small
records travel. A plan goes coordinator -> stage 0 -> ... -> last stage together with the activations;
the last stage answers the coordinator with the sampled token of every sequence that wanted one, and,
with asynchronous scheduling, hands the sampled ids (on the device) straight to the first stage.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class StepCounter:
    """Step numbers shared by every scheduler of a run: increasing, so that after a failure a stage
    can drop exactly the plans that were in flight (those up to a given number)."""

    def __init__(self) -> None:
        self.current = 0

    def next(self) -> int:
        self.current += 1
        return self.current


@dataclass
class SeqState:
    """Compact state a stage needs to (re)build one sequence: block table and sampling parameters."""

    block_table: list[int]
    """KV blocks reserved for the whole sequence (prompt + max new tokens)."""
    temperature: float
    top_p: float
    top_k: int
    seed: int
    kv_table: list[int] | None = None
    """Disaggregated prefill: the token pipeline's block table, where this sequence's KV goes."""


@dataclass
class StepPlan:
    """One microbatch step: which sequences run, from which position, with which new tokens."""

    mb: int
    """Microbatch slot."""
    step: int
    """Coordinator-wide step number of this plan (increasing)."""
    seq_ids: list[int]
    """Sequences in the order their tokens are packed."""
    start_pos: list[int]
    """Tokens of each sequence already in the KV cache."""
    num_tokens: list[int]
    """New tokens per sequence this step."""
    input_ids: list[int]
    """The new tokens, packed (stage 0 embeds them; later stages ignore them). With ``follows``, a
    negative entry ``-(row + 1)`` stands for the token that step samples at ``row`` of its result."""
    wants_token: list[bool]
    """Whether the last stage samples a next token for each sequence."""
    new_seqs: dict[int, SeqState] = field(default_factory=dict)
    """State of sequences the stages have not seen yet (or must refresh)."""
    release: list[int] = field(default_factory=list)
    """Sequences that finished: stages forget their state."""
    routing: dict[str, Any] = field(default_factory=dict)
    """Fault tolerance, in the coordinator's history: each stage's MoE routing of this step (a
    ft.checkpoints.RoutingRecord), so a completed step's record outlives its stages."""
    replay_until: str | None = None
    """Recovery: this stage recomputes the step for its KV and stops it there (no output)."""
    forced: Any = None
    """Recovery: the routing ``replay_until`` recorded for this step; the replay routes exactly so."""
    follows: int | None = None
    """Asynchronous scheduling: the step (of this microbatch, still in flight when this plan was made)
    whose sampled tokens fill this plan's placeholders; the stage that embeds reads them on its device."""
    scratch_seqs: list[int] = field(default_factory=list)
    """Recovery: sequences of a replayed step that have finished since. They keep their rows (the step's
    numerics stay identical) but their K/V goes to the scratch block: their blocks may be another's now."""
    relayed: list[StepRouting] = field(default_factory=list)
    """Fault tolerance: the stages before this one's routing of earlier steps, riding with the plan down
    the pipeline to the last stage, whose result takes them to the coordinator (no message of their own)."""

    @property
    def total_tokens(self) -> int:
        return len(self.input_ids)


@dataclass
class StepResult:
    """The last stage's answer to a plan."""

    mb: int
    step: int
    seq_ids: list[int]
    """Sequences that sampled, in plan order."""
    token_ids: list[int]
    """The sampled next token of each."""
    relayed: list[StepRouting] = field(default_factory=list)
    """Routing records of earlier steps: the other stages' (``StepPlan.relayed``) and the last stage's own
    (kept off the chain, in its idle time, so they go with its next result)."""


@dataclass
class StepRouting:
    """Fault tolerance: a stage's MoE routing of a step, for the coordinator's history: a replay of the
    step routes as recorded and checks against it. It travels down the pipeline with a later plan
    (``StepPlan.relayed``) and reaches the coordinator with the last stage's result; a large one (a
    prompt's) goes to the coordinator as a message of its own (``ft.stage_ft.RELAY_BYTES``)."""

    mb: int
    step: int
    stage: str
    routing: Any


@dataclass
class Sampled:
    """Asynchronous scheduling over several stages: the last stage tells the first that step ``step``'s
    sampled ids are on their way (a tensor [S], read on the device), so that it can launch the plan
    that follows that step without waiting for the coordinator."""

    mb: int
    step: int


@dataclass
class Stop:
    """Ends the pipeline: each stage forwards it and exits (``forward`` False: only the receiver
    stops, e.g. the survivors of a pipeline that lost a stage)."""

    reason: str = "done"
    forward: bool = True


@dataclass
class KVChunk:
    """One layer's K/V of a prefill step, from the prompt stage that computed it to the token stage
    that owns the layer; travels with a tensor [2, T, K, Dh] (K then V, tokens packed as in the plan)."""

    layer: int
    seq_ids: list[int]
    start_pos: list[int]
    num_tokens: list[int]
    tables: list[list[int]]
    """Token-pipeline block table of each sequence."""


@dataclass
class KVAck:
    """A token stage holds every layer of these sequences' prompt KV."""

    stage: str
    seq_ids: list[int]
    bytes: list[int]
    """KV bytes this stage received per sequence."""
