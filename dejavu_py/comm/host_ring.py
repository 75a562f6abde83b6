"""One direction of an edge between two stages on the same GPU: a ring of slots in shared host memory.

The sender's stream copies a tensor into the next slot and then writes the slot's sequence number into
the ring's ``sent`` word; the receiver's stream waits for that number, copies the slot out and writes
``taken``; before reusing a slot the sender's stream waits until ``taken`` shows its last tensor was
copied out. No host waits for a device: a stage sends its output as soon as its step is queued, and the
next stage queues its step behind it (see comm/stream_sync.py). Two processes on one GPU cannot share
an NCCL communicator, and the events of a process that dies leave waiting streams stuck forever; words
in host memory can be released by the survivor (``release``).

The receiver creates the ring (a file in a RAM-backed directory, unlinked once both ends mapped it).
Header: word 0 ``sent``, word 1 ``taken``, then the slot count and size; slots start at 4096.
"""
from __future__ import annotations

import mmap
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from dejavu_py.comm import stream_sync

HEADER = 4096
SLOTS = 4
"""Slots per ring: a shared GPU runs one microbatch two plans deep; a sender finding none free waits on its device."""
RELEASED = 1 << 30
"""What ``release`` writes into both words: above any sequence number of a run, so every wait passes."""
_retired: list[HostRing] = []
"""Rings of closed edges, unregistered (once the device is done with them) before the next ring maps."""


def shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


class HostRing:
    """A mapped ring; ``create`` (receiver) or ``open`` (sender)."""

    def __init__(self, path: str, mm: mmap.mmap) -> None:
        _reap_retired()
        self.path = path
        self.retired = False
        self._mm = mm
        self.bytes = torch.frombuffer(mm, dtype=torch.uint8)
        torch.cuda.init()  # torch sees registered memory as pinned (copies to and from it queue) once it is
        stream_sync.register(self.bytes)
        if not self.bytes[HEADER:HEADER + 1].is_pinned():  # a blocking copy would wait on a stream that waits on us
            raise RuntimeError(f"ring {path}: its registered memory is not seen as pinned")
        words = self.bytes[:16].view(torch.int32)
        self.slots, self.slot_bytes = int(words[2]), int(self.bytes[16:24].view(torch.int64)[0])
        base = self.bytes.data_ptr()
        self.sent_addr, self.taken_addr = base, base + 4
        self.words = self.bytes[:8].view(torch.int32)
        self.count = 0
        """Sequence number of the last tensor put (sender) or taken or skipped (receiver)."""
        self.reserved = 0
        """Sender: the last sequence number handed out; each is put, in order."""

    @classmethod
    def create(cls, tag: str, slot_bytes: int, slots: int = SLOTS) -> HostRing:
        slot_bytes = -(-slot_bytes // 4096) * 4096
        fd, path = tempfile.mkstemp(prefix=f"dejavu-ring-{tag}-", dir=shm_dir())
        try:
            os.ftruncate(fd, HEADER + slots * slot_bytes)
            mm = mmap.mmap(fd, HEADER + slots * slot_bytes)
        finally:
            os.close(fd)
        header = torch.frombuffer(mm, dtype=torch.uint8, count=24)
        header[8:12].view(torch.int32)[0] = slots
        header[16:24].view(torch.int64)[0] = slot_bytes
        return cls(path, mm)

    @classmethod
    def open(cls, path: str) -> HostRing:
        fd = os.open(path, os.O_RDWR)
        try:
            mm = mmap.mmap(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        return cls(path, mm)

    def unlink(self) -> None:
        Path(self.path).unlink(missing_ok=True)

    def _slot(self, seq: int, nbytes: int) -> torch.Tensor:
        start = HEADER + ((seq - 1) % self.slots) * self.slot_bytes
        return self.bytes[start:start + nbytes]

    # -- sender ------------------------------------------------------------------------------------
    def reserve(self, nbytes: int) -> int | None:
        """The sequence number of a tensor of ``nbytes`` to be put later (its message may leave first:
        the receiver's stream waits for it), or None when it does not fit a slot (it goes the slow way)."""
        if nbytes > self.slot_bytes:
            return None
        self.reserved += 1
        return self.reserved

    def put(self, seq: int, t: torch.Tensor) -> None:
        """Queue ``t``'s copy into slot ``seq`` (reserved, put in order) and the ``sent`` write."""
        flat = t.detach().contiguous().view(-1).view(torch.uint8)
        if seq != self.count + 1 or flat.numel() > self.slot_bytes:
            raise RuntimeError(f"ring {self.path}: tensor {seq} ({flat.numel()} bytes) put after {self.count}")
        if seq > self.slots:  # the slot's last tensor must have been copied out
            stream_sync.wait_geq(self.taken_addr, seq - self.slots)
        self._slot(seq, flat.numel()).copy_(flat, non_blocking=True)
        stream_sync.write(self.sent_addr, seq)
        self.count = seq

    # -- receiver ----------------------------------------------------------------------------------
    def take(self, seq: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Queue the wait for tensor ``seq``, its copy onto ``device`` and the ``taken`` write (zeros from
        a retired ring: its plan is dropped anyway)."""
        out = torch.empty(shape, dtype=dtype, device=device)
        if self.retired:
            return out.zero_()
        self._in_order(seq)
        flat = out.view(-1).view(torch.uint8)
        stream_sync.wait_geq(self.sent_addr, seq)
        flat.copy_(self._slot(seq, flat.numel()), non_blocking=True)
        stream_sync.write(self.taken_addr, seq)
        return out

    def skip(self, seq: int) -> None:
        """Tensor ``seq`` is not wanted (its plan was dropped): free its slot all the same."""
        if self.retired:
            return
        self._in_order(seq)
        stream_sync.write(self.taken_addr, seq)

    def _in_order(self, seq: int) -> None:
        if seq != self.count + 1:
            raise RuntimeError(f"ring {self.path}: tensor {seq} taken after {self.count}")
        self.count = seq

    def release(self) -> None:
        """The other end died: let every wait on this ring pass (the host writes both words)."""
        if not self.retired:
            self.words.fill_(RELEASED)

    def retire(self) -> None:
        """Its edge is closed: released, and unregistered before the next ring is mapped."""
        self.release()
        if not self.retired:
            self.retired = True
            _retired.append(self)


def _reap_retired() -> None:
    if not _retired:
        return
    torch.cuda.synchronize()  # queued copies and waits on retired rings (released, on this thread's device) are done
    while _retired:
        stream_sync.unregister(_retired.pop().bytes)


@dataclass
class RingRead:
    """A received tensor still in the ring: the receiving loop takes it (or skips it) in order."""

    ring: HostRing
    seq: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    def take(self) -> torch.Tensor:
        return self.ring.take(self.seq, self.shape, self.dtype, self.device)

    def skip(self) -> None:
        self.ring.skip(self.seq)
