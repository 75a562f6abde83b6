"""KV replication, the source side: a stage streams the K/V its steps write to its replica holder.

The step's thread only queues work on the device (a copy into pinned host memory, an event); the
sender thread waits for it and delivers. A decode step's chunk is a few MB: when the holder's file is
mapped here (same host) it is written there at once, its slots' tags behind it, and counts as
acknowledged by that write (its bytes are in the holder's memory, which outlives this process); no
message goes. Across hosts the bytes travel with a message, a few steps' chunks as one, and the holder
acknowledges.

A large chunk (a prompt's KV: hundreds of MB for a batch of prompts) goes as a *bulk* job, in pieces
of one layer's token range (``PIECE_BYTES``), copied off the device two pieces ahead, with the stage's
next steps (``defer_copy``) where it has them. With the holder's file mapped, the steps' chunks that arrive
meanwhile are written between two pieces, so no decode step waits for a prompt's replica (the tags
make a sequence's coverage a prefix whatever the order). Across hosts the pieces go in order, each its
own message.

Legend: L = the source stage's layers, T = tokens of a chunk, K = KV heads, D = head dim.
"""
from __future__ import annotations

import collections
import dataclasses
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from dejavu_py import log
from dejavu_py.models.kv_cache import KVCache
from dejavu_py.protocol.replica import ReplicaAck, ReplicaChunk
from dejavu_py.stage import replica_shm
from dejavu_py.stage.host_buffers import HostBuffers
from dejavu_py.stage.replica_store import coalesce

_log = log.get(__name__)


class Waitable(Protocol):
    """A CUDA event, or a copy another thread queues later (``stage.host_copies.DeferredCopy``)."""

    def synchronize(self) -> object: ...

    def query(self) -> bool: ...


PIECE_BYTES = 16 << 20
"""A chunk larger than this is a bulk job, sent in pieces of about this size (one layer, a token range)."""
WRITE_NOW_BYTES = 256 << 10
"""A step's chunk up to this size (a few tokens' worth) whose bytes are on the host is written into the
holder's file by the stage's thread itself (``ReplicaSender._write_now``). A larger one goes to the sender
thread: written by the stage's thread it would take longer than the lock the thread takes from it costs."""


@dataclass
class _Bulk:
    """A large chunk on its way, piece by piece."""

    msg: ReplicaChunk
    kv_2LTKD: torch.Tensor
    """Device or host; owned by the job (nobody writes it any more)."""
    ready: torch.cuda.Event | None
    """Recorded behind the kernels that computed ``kv_2LTKD`` (device)."""
    shm: replica_shm.Replica | None
    """The holder's file as mapped when the job began (None: the pieces travel over the edge)."""
    epoch: int
    pieces: collections.deque = field(default_factory=collections.deque)
    """(layer index, first token, end token) still to copy off the device."""
    copying: collections.deque = field(default_factory=collections.deque)
    """(piece, host tensor [2, 1, T, K, D], event) copied or being copied."""
    tags: np.ndarray | None = None
    """The tag of each of its tokens (written into the holder's file with the pieces)."""


def pieces(kv_2LTKD: torch.Tensor, piece_bytes: int) -> list[tuple[int, int, int]]:
    """(layer index, first token, end token) of the pieces of a chunk, layer by layer."""
    _, L, T = kv_2LTKD.shape[:3]
    per_token = max(1, kv_2LTKD[:, 0, 0].numel() * kv_2LTKD.element_size())
    step = max(1, piece_bytes // per_token)
    return [(i, a, min(a + step, T)) for i in range(L) for a in range(0, T, step)]


class ReplicaSender:
    """Streams a stage's new K/V to its replica holder (see the module's docstring)."""

    COALESCE_WINDOW_S = 0.05
    """A step's chunk waits at most this long for the next ones to go with it."""
    AHEAD = 2
    """A bulk job's pieces copied off the device ahead of the one being written (each goes with one of
    the stage's next launches). One ahead spreads the prompt's replica over twice the steps, and cost
    more throughput."""

    def __init__(self, me: str, kv: KVCache, lag: int, send, piece_bytes: int = PIECE_BYTES) -> None:
        self.me, self.kv, self.lag, self._send = me, kv, lag, send
        self.piece_bytes = piece_bytes
        self.batch = max(1, lag // 2)
        """Steps' chunks sent as one: fewer messages, acknowledgements and holder updates per step, while
        the other half of the lag keeps the steps after them from waiting for their acknowledgement."""
        self.unacked: dict[int, list[int]] = {}
        self.cv = threading.Condition()
        self.enabled = True
        self.bytes = self.chunks = self.shm_chunks = self.bulk_jobs = 0
        self.wait_s = 0.0
        self.shm: replica_shm.Replica | None = None
        """The holder's replica file, mapped, when it is on this host: chunks are written there."""
        self.shm_path: str | None = None
        self.epoch = 0
        """Bumped whenever the holder changes: what was written for an older one is never announced."""
        self.buffers = HostBuffers(reuse=kv.device.type == "cuda")
        """Pinned buffers for K/V on the host, given back once written (a stage's sender shares its runner's)."""
        self.defer_copy: Callable[[torch.Tensor, torch.Tensor, torch.cuda.Event | None], Waitable] | None = None
        """``StageRunner.defer_copy`` (CUDA): a bulk piece's copy off the device goes with the stage's next
        step; None: right away, on a side stream of the sender's."""
        self.flush_deferred: Callable[[], None] | None = None
        """``StageRunner.flush_deferred_copies``, with ``defer_copy``: what the stage's thread calls while it
        waits on back-pressure (no step is launched then, and the copies asked for meanwhile must still go)."""
        self._flush_wanted = False
        self._index = {l: i for i, l in enumerate(kv.layers)}
        self._stream: torch.cuda.Stream | None = None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._held: list[tuple[ReplicaChunk, torch.Tensor, int]] = []
        """Steps' chunks waiting to go as one message (across hosts)."""
        self._deadline = 0.0
        self._bulk: collections.deque[_Bulk] = collections.deque()
        threading.Thread(target=self._run, name=f"replica-send-{me}", daemon=True).start()

    # -- the step's thread -------------------------------------------------------------------------
    def attach(self, shm: replica_shm.Replica | None, path: str | None) -> None:
        """The holder's file, mapped (None: the holder is on another host)."""
        self.epoch += 1
        self.shm, self.shm_path = shm, path

    def chunk(self, mb: int, step: int, seq_ids, start_pos, num_tokens, slots: list[int],
              read_slots: list[int] | None = None, written: torch.Tensor | None = None,
              ready: Waitable | None = None) -> None:
        """Send what a step wrote: ``written`` [2, L, T, K, D] when the step handed it over (a graph's
        record, on the host once ``ready`` is done), else read back from the cache at ``read_slots``
        (device slots; default ``slots``, the sequence-table ones the holder mirrors)."""
        if not self.enabled or not slots:
            return
        layers = list(self.kv.layers)
        if written is None:
            idx = torch.tensor(read_slots or slots, dtype=torch.long).to(self.kv.device, non_blocking=True)
            k = torch.stack([self.kv.k_NKD[l][idx] for l in layers])
            v = torch.stack([self.kv.v_NKD[l][idx] for l in layers])
            written = torch.stack((k, v))
        elif written.is_cuda and written.numel() * written.element_size() > self.piece_bytes:
            written = written.clone()  # a device buffer the next step overwrites, copied out later by the bulk job
        msg = ReplicaChunk(self.me, mb, step, layers, list(seq_ids), list(start_pos), list(num_tokens), slots)
        if not self._write_now(msg, written, ready):
            self.forward(msg, written, ready)

    def _write_now(self, msg: ReplicaChunk, kv: torch.Tensor, ready: Waitable | None) -> bool:
        """Write a small step's chunk into the holder's file from the calling thread (the stage's, in its
        idle time), acknowledged at once, when the file is mapped here and the bytes are on the host already.
        Handed to the sender thread instead, the write would take the interpreter's lock from the stage's
        thread while it launches its next step: at batch 1 that lengthened each launch by several
        times what the write itself costs (tools/bench_ft_step.py shows it)."""
        shm = self.shm
        if not self.enabled or shm is None or kv.is_cuda or kv.numel() * kv.element_size() > WRITE_NOW_BYTES:
            return False
        if ready is not None and not ready.query():
            return False
        self._write(shm, msg, kv)
        self.buffers.give(kv)
        self.bytes += kv.numel() * kv.element_size()
        self.chunks += 1
        return True

    def _write(self, shm: replica_shm.Replica, msg: ReplicaChunk, kv: torch.Tensor) -> None:
        """A chunk into the holder's file, tags and all: nothing to tell the holder."""
        replica_shm.write_chunk(shm, self._index, msg.layers, msg.slots, kv, msg.tags())
        self.shm_chunks += 1

    def forward(self, msg: ReplicaChunk, kv_2LTKD: torch.Tensor, ready: Waitable | None = None) -> None:
        """Send a chunk whose K/V is already in hand (e.g. prompt KV that just arrived), or on the host once
        ``ready`` is done; a device tensor larger than a piece must not be written afterwards (the bulk job
        copies it later)."""
        if not self.enabled:
            return
        if msg.mb >= 0:
            with self.cv:
                self.unacked.setdefault(msg.mb, []).append(msg.step)
        nbytes = kv_2LTKD.numel() * kv_2LTKD.element_size()
        self.bytes += nbytes
        self.chunks += 1
        if kv_2LTKD.device.type == "cuda":
            if nbytes <= self.piece_bytes:  # on the device's queue now, in step order
                kv_2LTKD = self.buffers.copy_of(kv_2LTKD)
            ready = torch.cuda.Event()
            ready.record()
        self._queue.put((msg, kv_2LTKD, ready))

    def flush(self) -> None:
        """Until everything queued so far has been handed to the wire (bulk jobs finished)."""
        done = threading.Event()
        self._queue.put((None, None, done))
        done.wait()

    def wait_for(self, mb: int, timeout_s: float) -> bool:
        """Back-pressure: block while ``mb`` has ``lag`` or more unacknowledged steps (the chunks held
        to go with the next ones leave now). Meanwhile the copies off the device this thread owes the
        sender are queued (``flush_deferred``) as the sender asks for them: a bulk job's pieces, which no
        step launched behind them would queue while this thread waits."""
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        with self.cv:
            if self.full(mb):
                self._queue.put((None, None, None))  # a nudge: send what is held
                self._flush_wanted = True  # the last step's K/V copy may still be waiting for the next launch
            flush = self.flush_deferred
            while self.full(mb) and time.monotonic() < deadline:
                if self._flush_wanted and flush is not None:
                    self._flush_wanted = False
                    self.cv.release()
                    try:
                        flush()
                    finally:
                        self.cv.acquire()
                    continue
                self.cv.wait_for(lambda: not self.full(mb) or (self._flush_wanted and flush is not None),
                                 deadline - time.monotonic())
            ok = not self.full(mb)
        self.wait_s += time.monotonic() - t0
        return ok

    def full(self, mb: int) -> bool:
        """Whether ``mb`` has ``lag`` or more unacknowledged steps (``wait_for`` would block)."""
        return len(self.unacked.get(mb, [])) >= self.lag and self.enabled

    def acked(self, ack: ReplicaAck) -> None:
        """These steps are in the replica (exactly these: a later step's chunk may be written before an
        earlier one still on its way)."""
        with self.cv:
            for mb, step in ack.steps:
                pending = self.unacked.get(mb, [])
                if step in pending:
                    pending.remove(step)
            self.cv.notify_all()

    def reset(self) -> None:
        """The holder changed (replaced): nothing in flight will be acknowledged, its file is gone."""
        self.attach(None, None)
        with self.cv:
            self.unacked.clear()
            self.cv.notify_all()

    def stats(self) -> dict:
        return {"replica_chunks": self.chunks, "replica_bytes": self.bytes, "replica_wait_s": round(self.wait_s, 4),
                "replica_shm_chunks": self.shm_chunks, "replica_bulk_jobs": self.bulk_jobs}

    # -- the sender thread -----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            if self._bulk:
                timeout = 0.0  # a piece of the bulk job goes unless a step's chunk is waiting
            else:
                timeout = max(self._deadline - time.monotonic(), 0) if self._held else None
            try:
                item = self._queue.get(timeout=timeout) if timeout != 0.0 else self._queue.get_nowait()
            except queue.Empty:
                if self._bulk:
                    self._bulk_piece()
                else:
                    self._deliver()  # the coalescing window ended
                continue
            self._take(*item)

    def _take(self, msg: ReplicaChunk | None, kv: torch.Tensor | None, ready) -> None:
        if msg is None:  # a flush (everything goes) or a nudge (what is held goes)
            if isinstance(ready, threading.Event):
                while self._bulk:
                    self._bulk_piece()
                self._deliver()
                ready.set()
            elif not self._bulk:
                self._deliver()
            return
        if ready is not None and kv.device.type != "cuda":  # host bytes still being copied in: wait for them
            ready.synchronize()
        if kv.numel() * kv.element_size() > self.piece_bytes:
            self._start_bulk(msg, kv, ready if kv.device.type == "cuda" else None)
            return
        shm = self.shm
        if shm is not None:  # written now: acknowledged now
            self._write(shm, msg, kv)
            if ready is not None or msg.mb >= 0:  # copied into the buffers here, or a step's from the runner's
                self.buffers.give(kv)
            self.acked(ReplicaAck(self.me, msg.acks()))
            return
        self._held.append((msg, kv, self.epoch))
        if len(self._held) == 1:
            self._deadline = time.monotonic() + self.COALESCE_WINDOW_S
        if msg.mb < 0 or len(self._held) >= self.batch:  # prompt KV (mb -1) is not held back
            self._deliver()

    def _deliver(self) -> None:
        """The held chunks as one message (in order; those of an older holder are dropped)."""
        held = [(m, k) for m, k, epoch in self._held if epoch == self.epoch]
        self._held.clear()
        runs: list[list[tuple[ReplicaChunk, torch.Tensor]]] = []
        for m, k in held:  # one message per run of chunks of the same layers
            if runs and runs[-1][0][0].layers == m.layers:
                runs[-1].append((m, k))
            else:
                runs.append([(m, k)])
        for run in runs:
            self._send_chunk(*coalesce([m for m, _ in run], [k for _, k in run]))

    def _send_chunk(self, msg: ReplicaChunk, kv: torch.Tensor) -> None:
        try:
            self._send(msg, kv)
        except Exception as e:  # the holder is gone: the coordinator's recovery re-replicates
            _log.warning("replica chunk for step %d of microbatch %d not sent: %s", msg.step, msg.mb, e)

    def _side(self) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.kv.device)
        return self._stream

    # -- bulk jobs -------------------------------------------------------------------------------
    def _start_bulk(self, msg: ReplicaChunk, kv: torch.Tensor, ready) -> None:
        self._deliver()  # what came before goes before
        job = _Bulk(msg, kv, ready, self.shm, self.epoch, collections.deque(pieces(kv, self.piece_bytes)),
                    tags=msg.tags() if self.shm is not None else None)
        self.bulk_jobs += 1
        if job.shm is not None:
            self._bulk.append(job)  # piece by piece, between the steps' chunks
            return
        while job.pieces or job.copying:  # across hosts: the pieces go in order, before anything after
            self._bulk_piece(job)

    def _bulk_piece(self, job: _Bulk | None = None) -> None:
        """Copy off, write or send one piece of the oldest bulk job (keeping ``AHEAD`` copies ahead); the last
        one announces the job to the holder, then the steps' chunks written meanwhile."""
        job = job or self._bulk[0]
        if job.epoch != self.epoch:  # the holder changed: its replacement is re-replicated from scratch
            if self._bulk and self._bulk[0] is job:
                self._bulk.popleft()
            job.pieces.clear()
            job.copying.clear()
            return
        while job.pieces and len(job.copying) < self.AHEAD:
            job.copying.append(self._copy_off(job, job.pieces.popleft()))
        (i, a, b), host, done = job.copying.popleft()
        if done is not None:
            done.synchronize()
        layer, slots = job.msg.layers[i], job.msg.slots[a:b]
        if job.shm is not None:
            replica_shm.write_chunk(job.shm, self._index, [layer], slots, host, job.tags[a:b])
        else:
            last = not job.pieces and not job.copying  # acknowledged with the last piece
            part = dataclasses.replace(job.msg, layers=[layer], slots=slots, **_token_range(job.msg, a, b),
                                       **({} if last else {"mb": -1, "step": -1, "steps": []}))
            self._send_chunk(part, host)
        if done is not None and job.shm is not None:  # a piece sent over the edge may still be on the wire:
            self.buffers.give(host)  # the send holds it until delivered, then the allocator takes it back
        if job.pieces or job.copying or job.shm is None:
            return
        self._bulk.popleft()
        self.acked(ReplicaAck(self.me, job.msg.acks()))

    def _copy_off(self, job: _Bulk, piece: tuple[int, int, int]) -> tuple:
        """(piece, its K/V on the host, event when copied): a device piece copied on the side stream."""
        i, a, b = piece
        src = job.kv_2LTKD[:, i:i + 1, a:b]
        if src.device.type != "cuda":
            return piece, src, None
        if self.defer_copy is not None:
            host = self.buffers.take(tuple(src.shape), src.dtype)
            ready, job.ready = job.ready, None
            deferred = self.defer_copy(src, host, ready)
            with self.cv:  # the stage's thread may be waiting on back-pressure: it queues the copy then
                self._flush_wanted = True
                self.cv.notify_all()
            return piece, host, deferred
        side = self._side()
        if job.ready is not None:
            side.wait_event(job.ready)
            job.ready = None
        with torch.cuda.stream(side):
            host = self.buffers.take(tuple(src.shape), src.dtype)
            host.copy_(src, non_blocking=True)
            done = torch.cuda.Event(blocking=True)  # this thread sleeps on it: spinning would slow the stage's launches
            done.record()
        return piece, host, done


def _token_range(msg: ReplicaChunk, a: int, b: int) -> dict:
    """The sequences' positions among tokens ``a .. b - 1`` of a chunk (its sequences' tokens in order)."""
    seq_ids, start_pos, num_tokens, at = [], [], [], 0
    for sid, start, n in zip(msg.seq_ids, msg.start_pos, msg.num_tokens):
        lo, hi = max(a, at), min(b, at + n)
        if lo < hi:
            seq_ids.append(sid)
            start_pos.append(start + lo - at)
            num_tokens.append(hi - lo)
        at += n
    return {"seq_ids": seq_ids, "start_pos": start_pos, "num_tokens": num_tokens}
