"""The messages of KV replication between a stage and its replica holder, and the holder's answer to the
coordinator at recovery. Legend: L = the source stage's layers, T = tokens of a chunk, K = KV heads, D = head dim."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ReplicaChunk:
    """K/V of some positions of some sequences, all layers of the source stage; travels with a tensor
    [2, L, T, K, D]. ``mb``/``step`` identify a decode-pipeline step (-1: bulk, e.g. prompt KV)."""

    source: str
    mb: int
    step: int
    layers: list[int]
    seq_ids: list[int]
    start_pos: list[int]
    num_tokens: list[int]
    slots: list[int]
    shm_path: str | None = None
    """Restore on the holder's host: the replacement reads its K/V from this replica file."""
    steps: list[tuple[int, int]] = field(default_factory=list)
    """Coalesced decode steps: the (microbatch, step) pairs this chunk covers (``mb``/``step``: the last)."""

    def acks(self) -> list[tuple[int, int]]:
        """The (microbatch, step) pairs the holder acknowledges once it holds this chunk."""
        return self.steps or ([(self.mb, self.step)] if self.mb >= 0 else [])

    def tags(self) -> np.ndarray:
        """The tag of each of its slots (``position_tags``)."""
        return position_tags(self.seq_ids, self.start_pos, self.num_tokens)


def position_tags(seq_ids: list[int], start_pos: list[int], num_tokens: list[int]) -> np.ndarray:
    """int64 tags of positions ``start_pos[i] .. + num_tokens[i] - 1`` of each sequence, in order:
    ``seq_id << 32 | (position + 1)``, never 0 (an unwritten slot)."""
    if all(n == 1 for n in num_tokens):
        return (np.asarray(seq_ids, dtype=np.int64) << 32) | (np.asarray(start_pos, dtype=np.int64) + 1)
    parts = [(sid << 32) + np.arange(start + 1, start + n + 1, dtype=np.int64)
             for sid, start, n in zip(seq_ids, start_pos, num_tokens)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


@dataclass
class ReplicaAck:
    """Holder -> source: these (microbatch, step) pairs are in the replica."""

    source: str
    steps: list[tuple[int, int]]


@dataclass
class ReplicaCoverage:
    """Holder -> coordinator at recovery: leading positions of each sequence the replica holds."""

    source: str
    covered: dict[int, int] = field(default_factory=dict)
    bytes: int = 0
