"""What crosses between an online front-end (the HTTP server's process, the Python API) and the
coordinator: requests and cancellations one way; tokens, ends and the engine's state the other.

The front-end tokenizes, checks a request against ``ServerInfo``'s limits, detokenizes and matches stop
strings; the coordinator schedules and samples. Messages are small picklable records over one local
connection. Token messages carry the index of their first token, so that a front-end that hears a
token twice (after a coordinator takeover, say) keeps exactly one copy of each.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ServerInfo:
    """Coordinator -> front-end, once on connecting: what the model and the pipeline accept."""

    model: str
    """The name clients use for the model (the checkpoint directory's name unless given)."""
    vocab_size: int
    max_model_len: int
    """Longest prompt plus output, in tokens."""
    max_prompt_tokens: int
    """Longest prompt the KV cache can take (one sequence alone)."""
    eos_token_ids: tuple[int, ...]
    default_max_tokens: int
    """max_tokens of a request that gives none."""
    run_seed: int
    """A sampled request without a seed gets one derived from this and its id."""


@dataclass(frozen=True)
class Submit:
    """Front-end -> coordinator: a new request, already tokenized and checked."""

    request_id: str
    """Unique among the requests of this front-end; keys every message about it."""
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    """Generation ends after one of these (the model's end-of-sequence ids are added unless ignore_eos)."""
    ignore_eos: bool = False


@dataclass(frozen=True)
class Cancel:
    """Front-end -> coordinator: the client went away or a stop string matched: end the request now,
    freeing its KV blocks and its place in the batch."""

    request_id: str
    reason: str = "abort"


@dataclass(frozen=True)
class Tokens:
    """Coordinator -> front-end: new output tokens of some requests, as step results bring them."""

    items: list[tuple[str, int, list[int]]]
    """(request id, index of its first token in the request's output, the tokens)."""
    time: float
    """Unix time the coordinator had them (inter-token latency is measured from it)."""


@dataclass(frozen=True)
class Finished:
    """Coordinator -> front-end: a request ended; ``record`` is its output record (coordinator/output.py:
    output_ids, finish_reason, num_prompt_tokens, timings), or {"id", "error"}."""

    request_id: str
    record: dict[str, Any]


@dataclass(frozen=True)
class EngineState:
    """Coordinator -> front-end, a few times a second and on every change of ``serving``: health,
    load, and the fault-tolerance counters the metrics export."""

    serving: bool
    """A pipeline can serve (false while starting, and after an unrecoverable failure). A recovery in
    progress that will succeed keeps it true: the streams pause, they do not fail."""
    recovering: bool = False
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    """Fraction of the KV cache's blocks in use."""
    counters: dict[str, Any] = field(default_factory=dict)
    """Cumulative figures (recoveries by cause and kind, recovery seconds and phases, tokens recomputed,
    replica bytes, workers by state, standbys ready): names as the metrics have them."""
