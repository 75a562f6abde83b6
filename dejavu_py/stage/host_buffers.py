"""Pinned host buffers reused across steps.

Fault tolerance copies every step's MoE routing and new K/V to the host. Taking a fresh pinned tensor
for each copy costs the stage's thread the caching host allocator's bookkeeping, and a new page-locked
allocation whenever its free blocks still wait on an event, three times a step. Here a buffer goes back to a free list once its user is done with its
bytes and is handed out again for any shape and dtype that fits.

A new page-locked buffer is dear in another way too: cudaHostAlloc takes milliseconds for a few MB, and holds the driver's lock meanwhile, so every CUDA call of the process (the
stage's kernel launches) waits for it. The sizes a stage will need (a decode step's K/V, a prompt's
routing, a replica piece) are therefore ``reserve``d when the stage is built, not met first while serving.
"""
from __future__ import annotations

import math
import threading

import torch


class HostBuffers:
    """A free list of pinned byte buffers. ``take`` a tensor of a shape and dtype (a view of a buffer at least
    that large), ``give`` it (or any view of it, of any dtype) back when the copy into it is finished and
    its bytes are consumed: the whole buffer under it goes back (a small step's FT record is one buffer,
    its K/V and routing views of it)."""

    def __init__(self, reuse: bool, pin: bool | None = None, keep: int = 16) -> None:
        self.reuse = reuse
        """Off (a CPU stage: its host copies are the tensors themselves): ``take`` allocates, ``give`` forgets."""
        self.pin = reuse if pin is None else pin
        self.keep = keep
        """Buffers kept; more given back are freed."""
        self._free: list[tuple[int, torch.Tensor]] = []
        """(bytes, buffer)."""
        self._lock = threading.Lock()
        self.allocated = 0
        """Buffers ``take`` had to allocate (none fitted): each a page-locked allocation while serving."""
        self.reserved = 0
        """Buffers ``reserve`` allocated up front (when the stage was built)."""

    SMALL_BYTES = 1 << 20
    """A request under this size is not given a free buffer more than ``SPARE_RATIO`` times larger (a
    small pinned allocation is cheap; a reserved large buffer taken for it would be missed by the
    large request it was reserved for)."""
    SPARE_RATIO = 8

    def reserve(self, sizes: list[int]) -> None:
        """Allocate buffers of these sizes (bytes) now, onto the free list (which keeps them all)."""
        if not self.reuse:
            return
        bufs = [torch.empty(n, dtype=torch.uint8, pin_memory=self.pin) for n in sizes if n > 0]
        with self._lock:
            self._free.extend((b.numel(), b) for b in bufs)
            self.keep = max(self.keep, len(self._free) + 8)
        self.reserved += len(bufs)

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape)
        if not self.reuse:
            return torch.empty(shape, dtype=dtype)
        nbytes = n * dtype.itemsize
        limit = None if nbytes >= self.SMALL_BYTES else self.SPARE_RATIO * max(nbytes, 1)
        with self._lock:  # sizes as ints: this runs in a step's launch, a few times a step
            best = -1
            for i, (size, _) in enumerate(self._free):
                if nbytes <= size and (limit is None or size <= limit) and (best < 0 or size < self._free[best][0]):
                    best = i
            buf = self._free.pop(best)[1] if best >= 0 else None
        if buf is None:
            buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)
            self.allocated += 1
        if dtype == torch.uint8 and len(shape) == 1 and buf.numel() == nbytes:
            return buf  # a step's whole record, as a rule: no views to make
        return buf[:nbytes].view(dtype).view(shape)

    def give(self, t: torch.Tensor) -> None:
        """``t`` is free again, the whole buffer under it (from ``take``, or any pinned tensor nobody uses now)."""
        if not self.reuse:
            return
        storage = t.untyped_storage()
        buf = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (storage.nbytes(),))
        with self._lock:
            if len(self._free) < self.keep:
                self._free.append((buf.numel(), buf))

    def copy_of(self, t: torch.Tensor) -> torch.Tensor:
        """A host copy of device tensor ``t`` queued behind the kernels that compute it."""
        return self.take(tuple(t.shape), t.dtype).copy_(t, non_blocking=True)
