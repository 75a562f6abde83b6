"""KV replication (DejaVu): each decode stage streams its new K/V to the host memory of the next stage
of the ring, off the critical path, so a replacement can get its KV back from there.

Source side (replica_sender.py): after every step it takes the K/V the step wrote (all its layers,
at the step's slots) and sends them asynchronously over the replica edge, the chunks of a few
consecutive steps as one (``coalesce``); the holder acknowledges the (microbatch, step) pairs a chunk
covers, and a stage waits before running ahead of its replica by more than ``--replica-lag`` steps of
a microbatch.

Holder side (``ReplicaStore``): a host copy of the source's cache (same block layout) plus, per
sequence, how many leading positions it holds in every layer. At recovery it ships the blocks of the
sequences in flight to the replacement and says how far each sequence is covered; what is missing is
replayed. When the copy is a shared-memory file (replica_shm.py) a source and a replacement on the
holder's host write and read it directly; only the bookkeeping crosses the replica edge.

Legend: L = the source stage's layers, T = tokens of a chunk, K = KV heads, D = head dim, N = slots.
"""
from __future__ import annotations

import dataclasses
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..engine.attn_meta import slot_of
from . import replica_shm

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
    inline: bool = True
    """The K/V travels with the message; False: the source already wrote it into the holder's file."""
    shm_path: str | None = None
    """Restore on the holder's host: the replacement reads its K/V from this replica file."""
    steps: list[tuple[int, int]] = field(default_factory=list)
    """Coalesced decode steps: the (microbatch, step) pairs this chunk covers (``mb``/``step``: the last)."""

    def acks(self) -> list[tuple[int, int]]:
        """The (microbatch, step) pairs the holder acknowledges once it holds this chunk."""
        return self.steps or ([(self.mb, self.step)] if self.mb >= 0 else [])


def coalesce(chunks: list[ReplicaChunk], kv: list[torch.Tensor] | None) -> tuple[ReplicaChunk, torch.Tensor | None]:
    """One chunk for consecutive decode steps' chunks (same layers), in order: a sequence in several
    of them covers its positions in turn. ``kv``: their K/V [2, L, T, K, D] to concatenate (None: in
    the holder's file already)."""
    merged = dataclasses.replace(
        chunks[-1], seq_ids=[s for c in chunks for s in c.seq_ids], start_pos=[p for c in chunks for p in c.start_pos],
        num_tokens=[n for c in chunks for n in c.num_tokens], slots=[s for c in chunks for s in c.slots],
        inline=kv is not None, steps=[st for c in chunks for st in c.acks()])
    return merged, (torch.cat(kv, dim=2) if kv is not None and len(kv) > 1 else kv[0] if kv else None)


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


def covered_slots(tables: dict[int, list[int]], covered: dict[int, int], block_size: int) -> list[int]:
    """Slots of the covered leading positions of these sequences, sequence by sequence."""
    return [slot_of(tables[s], p, block_size) for s in sorted(tables) for p in range(covered.get(s, 0))]


class Coverage:
    """Leading positions of each sequence a replica holds, per layer: one number while every layer holds
    the same (a decode step's chunk covers them all: O(1) per sequence), a list by layer index while
    they differ (prompt KV arrives layer by layer)."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.seqs: dict[int, int | list[int]] = {}

    def add(self, sid: int, start: int, n: int, which: list[int] | None = None) -> None:
        """Positions ``start .. start + n - 1`` arrived in the layers ``which`` (None: all); they extend
        a layer's prefix only where it reaches ``start``."""
        cur = self.seqs.get(sid, 0)
        if isinstance(cur, int) and which is None:
            if start <= cur:
                self.seqs[sid] = max(cur, start + n)
            return
        per_layer = [cur] * self.num_layers if isinstance(cur, int) else cur
        for i in range(self.num_layers) if which is None else which:
            if start <= per_layer[i]:
                per_layer[i] = max(per_layer[i], start + n)
        self.seqs[sid] = per_layer[0] if min(per_layer) == max(per_layer) else per_layer

    def forget(self, sid: int) -> None:
        self.seqs.pop(sid, None)

    def of(self, sid: int) -> int:
        """Leading positions held in every layer."""
        cur = self.seqs.get(sid, 0)
        return cur if isinstance(cur, int) else min(cur)


class ReplicaStore:
    """The replica of one source stage's cache, in host memory: one buffer [2, L, N, K, D], a shared
    file when ``path`` is given (replica_shm.py), else pinned memory."""

    def __init__(self, source: str, layers: range, spec_slots: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, pin: bool, path: Path | None = None) -> None:
        self.source, self.layers, self.path = source, list(layers), path
        shape = (2, len(self.layers), spec_slots, kv_heads, head_dim)
        # Uninitialised on purpose: ``covered`` says what is valid, and zero-filling GBs of pinned memory
        # would lengthen every replacement's start.
        self.kv_2LNKD = replica_shm.create(path, shape, dtype) if path else torch.empty(shape, dtype=dtype, pin_memory=pin)
        self.index = {l: i for i, l in enumerate(self.layers)}
        self.covered = Coverage(len(self.layers))
        self.lock = threading.Lock()
        self.bytes = 0

    def describe(self, holder: str) -> replica_shm.ReplicaShm | None:
        """What the source needs to write into this replica itself (None: not a shared file)."""
        if self.path is None:
            return None
        return replica_shm.ReplicaShm(holder, socket.gethostname(), str(self.path), tuple(self.kv_2LNKD.shape),
                                      str(self.kv_2LNKD.dtype).removeprefix("torch."))

    def apply(self, c: ReplicaChunk, kv: torch.Tensor | None) -> None:
        """A chunk from the source: its K/V (unless the source wrote it into our file) and coverage."""
        with self.lock:
            if c.inline:
                replica_shm.write_chunk(self.kv_2LNKD, self.index, c.layers, c.slots, kv.to("cpu"))
            which = None if len(c.layers) == len(self.layers) else [self.index[layer] for layer in c.layers]
            for sid, start, n in zip(c.seq_ids, c.start_pos, c.num_tokens):
                self.covered.add(sid, start, n, which)
            self.bytes += self.nbytes(len(c.slots), len(c.layers))

    def nbytes(self, slots: int, layers: int) -> int:
        """Bytes of K and V of ``slots`` slots in ``layers`` layers."""
        return slots * layers * self.kv_2LNKD[:, 0, 0].numel() * self.kv_2LNKD.element_size()

    def coverage(self, seq_ids: list[int]) -> dict[int, int]:
        with self.lock:
            return {s: self.covered.of(s) for s in seq_ids}

    def forget(self, seq_ids: list[int]) -> None:
        with self.lock:
            for s in seq_ids:
                self.covered.forget(s)

    def read(self, slots: list[int]) -> torch.Tensor:
        """[2, L, T, K, D]: the replica at these slots (a copy)."""
        idx = torch.tensor(slots, dtype=torch.long)
        with self.lock:
            return self.kv_2LNKD.index_select(2, idx)
