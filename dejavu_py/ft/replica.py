"""KV replication (DejaVu): each decode stage streams its new K/V to the host memory of the next stage
of the ring, off the critical path, so a replacement can get its KV back from there.

Source side (``ReplicaSender``): after every step it takes the K/V the step wrote (all its layers, at
the step's slots: recorded by a graph step, else read back from its cache) and sends them
asynchronously over the replica edge, the chunks of a few consecutive steps as one (``coalesce``);
the holder acknowledges the (microbatch, step) pairs a chunk covers (a chunk the source wrote into
the holder's file itself is acknowledged by that write), and a stage waits before running ahead of
its replica by more than ``--replica-lag`` steps of a microbatch.

Holder side (``ReplicaStore``): a host copy of the source's cache (same block layout) plus, per
sequence, how many leading positions it holds in every layer. At recovery it ships the blocks of the
sequences in flight to the replacement and says how far each sequence is covered; what is missing is
replayed. When the copy is a shared-memory file (replica_shm.py) a source and a replacement on the
holder's host write and read it directly; only the bookkeeping crosses the replica edge.

Legend: L = the source stage's layers, T = tokens of a chunk, K = KV heads, D = head dim, N = slots.
"""
from __future__ import annotations

import dataclasses
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import log
from ..engine.attn_meta import slot_of
from ..engine.host_buffers import HostBuffers
from ..engine.kv_cache import KVCache
from . import replica_shm

_log = log.get(__name__)

BULK_BYTES = 64 << 20
"""Chunks larger than this (re-replicating a whole cache) leave the device one layer at a time."""


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


def step_slots(tables: list[list[int]], start_pos: list[int], num_tokens: list[int], block_size: int) -> list[int]:
    out: list[int] = []
    for table, start, n in zip(tables, start_pos, num_tokens):
        out.extend(slot_of(table, p, block_size) for p in range(start, start + n))
    return out


def covered_slots(tables: dict[int, list[int]], covered: dict[int, int], block_size: int) -> list[int]:
    """Slots of the covered leading positions of these sequences, sequence by sequence."""
    return [slot_of(tables[s], p, block_size) for s in sorted(tables) for p in range(covered.get(s, 0))]


class ReplicaSender:
    """Streams a stage's new K/V to its replica holder. The step's thread only queues the work on the
    device (gather, copy into pinned host memory, an event); a sender thread waits for the event and
    sends, so no step waits for the copy or the wire."""

    COALESCE_WINDOW_S = 0.05
    """A step's chunk waits at most this long for the next ones to go with it."""

    def __init__(self, me: str, kv: KVCache, lag: int, send) -> None:
        self.me, self.kv, self.lag, self._send = me, kv, lag, send
        self.batch = max(1, lag // 2)
        """Steps' chunks sent as one: fewer messages, acknowledgements and holder updates per step, while
        the other half of the lag keeps the steps after them from waiting for their acknowledgement."""
        self.unacked: dict[int, list[int]] = {}
        self.cv = threading.Condition()
        self.enabled = True
        self.bytes = 0
        self.chunks = 0
        self.wait_s = 0.0
        self.shm_chunks = 0
        self.shm: torch.Tensor | None = None
        """The holder's replica file, mapped, when it is on this host: chunks are written there."""
        self.shm_path: str | None = None
        self.buffers = HostBuffers(reuse=kv.device.type == "cuda")
        """Pinned buffers for a step's K/V on the host, given back once written into ``shm`` (a stage's
        sender shares its runner's)."""
        self._index = {l: i for i, l in enumerate(kv.layers)}
        self._stream: torch.cuda.Stream | None = None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, name=f"replica-send-{me}", daemon=True).start()

    def chunk(self, mb: int, step: int, seq_ids, start_pos, num_tokens, slots: list[int],
              read_slots: list[int] | None = None, written: torch.Tensor | None = None) -> None:
        """Send what a step wrote: ``written`` [2, L, T, K, D] when the step handed it over (a graph's
        record), else read back from the cache at ``read_slots`` (device slots; default ``slots``, the
        sequence-table ones the holder mirrors)."""
        if not self.enabled or not slots:
            return
        layers = list(self.kv.layers)
        if written is None:
            idx = torch.tensor(read_slots or slots, dtype=torch.long).to(self.kv.device, non_blocking=True)
            k = torch.stack([self.kv.k_NKD[l][idx] for l in layers])
            v = torch.stack([self.kv.v_NKD[l][idx] for l in layers])
            written = torch.stack((k, v))
        elif written.numel() * written.element_size() > BULK_BYTES:  # it outlives the next step: copy it
            written = written.clone()
        self.forward(ReplicaChunk(self.me, mb, step, layers, list(seq_ids), list(start_pos), list(num_tokens), slots),
                     written)

    def forward(self, msg: ReplicaChunk, kv_2LTKD: torch.Tensor) -> None:
        """Send a chunk whose K/V is already in hand (e.g. prompt KV that just arrived)."""
        if not self.enabled:
            return
        if msg.mb >= 0:
            with self.cv:
                self.unacked.setdefault(msg.mb, []).append(msg.step)
        nbytes = kv_2LTKD.numel() * kv_2LTKD.element_size()
        self.bytes += nbytes
        self.chunks += 1
        ready = None
        if kv_2LTKD.device.type == "cuda" and nbytes > BULK_BYTES and len(msg.layers) > 1:
            ready = torch.cuda.Event()  # a bulk chunk (re-replication): the sender thread copies it layer by layer
            ready.record()
        elif kv_2LTKD.device.type == "cuda":  # on the device's queue now, in step order; waited for by the sender thread
            kv_2LTKD = self.buffers.copy_of(kv_2LTKD)
            ready = torch.cuda.Event()
            ready.record()
        self._queue.put((msg, kv_2LTKD, ready))

    def flush(self) -> None:
        """Until everything queued so far has been handed to the wire."""
        done = threading.Event()
        self._queue.put((None, None, done))
        done.wait()

    def _run(self) -> None:
        held: list[tuple[ReplicaChunk, torch.Tensor]] = []  # decode steps' chunks waiting to go as one
        deadline = 0.0
        while True:
            try:
                msg, kv, ready = self._queue.get(timeout=max(deadline - time.monotonic(), 0) if held else None)
            except queue.Empty:  # no more steps for now: what is held goes
                msg = kv = ready = None
            if ready is not None and not isinstance(ready, threading.Event):
                ready.synchronize()
            if msg is not None and msg.mb >= 0 and kv.device.type != "cuda":
                held.append((msg, kv))
                deadline = deadline if len(held) > 1 else time.monotonic() + self.COALESCE_WINDOW_S
                if len(held) >= self.batch:
                    self._deliver_held(held)
                continue
            self._deliver_held(held)  # in order: before a bulk chunk, a flush, a nudge or the window's end
            if msg is None:
                if ready is not None:
                    ready.set()
                continue
            if kv.device.type != "cuda":
                self._deliver_held([(msg, kv)])
                continue
            for i, layer in enumerate(msg.layers):  # one layer at a time: no GB of pinned memory at once
                with torch.cuda.stream(self._side()):
                    host = torch.empty(kv[:, i:i + 1].shape, dtype=kv.dtype, pin_memory=True)
                    host.copy_(kv[:, i:i + 1], non_blocking=True)
                    torch.cuda.current_stream().synchronize()
                self._deliver_held([(dataclasses.replace(msg, layers=[layer]), host)])

    def _side(self) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.kv.device)
        return self._stream

    def _deliver_held(self, held: list[tuple[ReplicaChunk, torch.Tensor]]) -> None:
        """The held chunks (consecutive steps', or one) as one: each written into the holder's file when it
        is on this host (then only the bookkeeping travels, and the steps count as acknowledged at once:
        their K/V are in the holder's memory, which outlives this process), else their K/V over the edge,
        acknowledged by the holder."""
        if not held:
            return
        shm = self.shm
        if shm is not None:
            for msg, kv in held:
                replica_shm.write_chunk(shm, self._index, msg.layers, msg.slots, kv)
                if msg.mb >= 0:  # a decode step's: from the buffers
                    self.buffers.give(kv)
            self.shm_chunks += len(held)
        msg, kv = coalesce([m for m, _ in held], None if shm is not None else [k for _, k in held])
        held.clear()
        self._send_chunk(msg, kv)
        if shm is not None:
            self.acked(ReplicaAck(self.me, msg.acks()))

    def _send_chunk(self, msg: ReplicaChunk, kv: torch.Tensor | None) -> None:
        try:
            self._send(msg, kv)
        except Exception as e:  # the holder is gone: the coordinator's recovery re-replicates
            _log.warning("replica chunk for step %d of microbatch %d not sent: %s", msg.step, msg.mb, e)

    def acked(self, ack: ReplicaAck) -> None:
        with self.cv:
            for mb, step in ack.steps:
                pending = self.unacked.get(mb, [])
                while pending and pending[0] <= step:
                    pending.pop(0)
            self.cv.notify_all()

    def wait_for(self, mb: int, timeout_s: float) -> bool:
        """Back-pressure: block while ``mb`` has ``lag`` or more unacknowledged steps (the chunks held
        to go with the next ones leave now)."""
        t0 = time.monotonic()
        with self.cv:
            full = lambda: len(self.unacked.get(mb, [])) >= self.lag and self.enabled  # noqa: E731
            if full():
                self._queue.put((None, None, None))  # a nudge: send what is held
            ok = self.cv.wait_for(lambda: not full(), timeout_s)
        self.wait_s += time.monotonic() - t0
        return ok

    def reset(self) -> None:
        """The holder changed (replaced): nothing in flight will be acknowledged, its file is gone."""
        self.shm = None
        with self.cv:
            self.unacked.clear()
            self.cv.notify_all()

    def stats(self) -> dict:
        return {"replica_chunks": self.chunks, "replica_bytes": self.bytes, "replica_wait_s": round(self.wait_s, 4),
                "replica_shm_chunks": self.shm_chunks}


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
