"""KV replication (DejaVu): each decode stage streams its new K/V to the host memory of the next stage
of the ring, off the critical path, so a replacement can get its KV back from there.

Source side (replica_sender.py): after every step it takes the K/V the step wrote (all its layers,
at the step's slots) and sends them asynchronously over the replica edge, the chunks of a few
consecutive steps as one (``coalesce``); the holder acknowledges the (microbatch, step) pairs a chunk
covers, and a stage waits before running ahead of its replica by more than ``--replica-lag`` steps of
a microbatch.

Holder side (``ReplicaStore``): a host copy of the source's cache (same block layout) plus, per layer and
slot, a tag naming the sequence and position whose K/V the slot holds (``position_tags``). At recovery it
reads off the tags how many leading positions of each sequence in flight it holds in every layer
(``covered_by_tags``), ships those to the replacement, and what is missing is replayed. When the copy is
a shared-memory file (replica_shm.py) a source and a replacement on the holder's host write and read it
directly, tags included: nothing crosses the replica edge while the pipeline runs.

Legend: L = the source stage's layers, T = tokens of a chunk, K = KV heads, D = head dim, N = slots.
"""
from __future__ import annotations

import dataclasses
import socket
import threading
from pathlib import Path

import numpy as np
import torch

from dejavu_py.models.attn_meta import step_slots
from dejavu_py.protocol.replica import ReplicaChunk
from dejavu_py.stage import replica_shm


def covered_by_tags(tags_LN: np.ndarray, tables: dict[int, list[int]], block_size: int) -> dict[int, int]:
    """Leading positions of each sequence (its block table in ``tables``) whose K/V every layer holds."""
    out = {}
    for sid, table in tables.items():
        slots = (np.asarray(table, dtype=np.int64)[:, None] * block_size + np.arange(block_size)).reshape(-1)
        want = (sid << 32) + np.arange(1, len(slots) + 1, dtype=np.int64)
        held = (tags_LN[:, slots] == want).all(axis=0)
        out[sid] = len(held) if held.all() else int(held.argmin())
    return out


def coalesce(chunks: list[ReplicaChunk], kv: list[torch.Tensor]) -> tuple[ReplicaChunk, torch.Tensor]:
    """One chunk for consecutive decode steps' chunks (same layers), in order: a sequence in several
    of them covers its positions in turn. ``kv``: their K/V [2, L, T, K, D], concatenated."""
    merged = dataclasses.replace(
        chunks[-1], seq_ids=[s for c in chunks for s in c.seq_ids], start_pos=[p for c in chunks for p in c.start_pos],
        num_tokens=[n for c in chunks for n in c.num_tokens], slots=[s for c in chunks for s in c.slots],
        steps=[st for c in chunks for st in c.acks()])
    return merged, torch.cat(kv, dim=2) if len(kv) > 1 else kv[0]


def covered_slots(tables: dict[int, list[int]], covered: dict[int, int], block_size: int) -> list[int]:
    """Slots of the covered leading positions of these sequences, sequence by sequence."""
    sids = sorted(tables)
    return step_slots([tables[s] for s in sids], [0] * len(sids), [covered.get(s, 0) for s in sids], block_size)


class ReplicaStore:
    """The replica of one source stage's cache, in host memory: one buffer [2, L, N, K, D], a shared
    file when ``path`` is given (replica_shm.py), else pinned memory."""

    def __init__(self, source: str, layers: range, spec_slots: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, pin: bool, path: Path | None = None) -> None:
        self.source, self.layers, self.path = source, list(layers), path
        shape = (2, len(self.layers), spec_slots, kv_heads, head_dim)
        # The K/V uninitialised on purpose: the tags say what is valid, and zero-filling GBs of pinned
        # memory would lengthen every replacement's start.
        self.replica = replica_shm.create(path, shape, dtype) if path else replica_shm.Replica(
            torch.empty(shape, dtype=dtype, pin_memory=pin), torch.zeros(shape[1:3], dtype=torch.int64))
        self.kv_2LNKD = self.replica.kv_2LNKD
        self.index = {l: i for i, l in enumerate(self.layers)}
        self.lock = threading.Lock()

    def describe(self, holder: str) -> replica_shm.ReplicaShm | None:
        """What the source needs to write into this replica itself (None: not a shared file)."""
        if self.path is None:
            return None
        return replica_shm.ReplicaShm(holder, socket.gethostname(), str(self.path), tuple(self.kv_2LNKD.shape),
                                      str(self.kv_2LNKD.dtype).removeprefix("torch."))

    def apply(self, c: ReplicaChunk, kv: torch.Tensor) -> None:
        """A chunk whose K/V came over the replica edge (a source on another host)."""
        with self.lock:
            replica_shm.write_chunk(self.replica, self.index, c.layers, c.slots, kv.to("cpu"), c.tags())

    @property
    def bytes(self) -> int:
        """Bytes of K/V held (slots tagged, layer by layer)."""
        return self.nbytes(int(self.replica.tags_LN.count_nonzero()), 1)

    def nbytes(self, slots: int, layers: int) -> int:
        """Bytes of K and V of ``slots`` slots in ``layers`` layers."""
        return slots * layers * self.kv_2LNKD[:, 0, 0].numel() * self.kv_2LNKD.element_size()

    def coverage(self, tables: dict[int, list[int]], block_size: int) -> dict[int, int]:
        """Leading positions of each of these sequences held in every layer (``covered_by_tags``)."""
        with self.lock:
            return covered_by_tags(self.replica.tags_LN.numpy(), tables, block_size)

    def read(self, slots: list[int]) -> torch.Tensor:
        """[2, L, T, K, D]: the replica at these slots (a copy)."""
        idx = torch.tensor(slots, dtype=torch.long)
        with self.lock:
            return self.kv_2LNKD.index_select(2, idx)
