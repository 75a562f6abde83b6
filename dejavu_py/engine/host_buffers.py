"""Pinned host buffers reused across steps.

Fault tolerance copies every step's MoE routing and new K/V to the host. Taking a fresh pinned tensor
for each copy costs the stage's thread 60-200 us (measured on an H100 host, batch 64: the caching host
allocator's bookkeeping, and a new page-locked allocation whenever its free blocks still wait on an
event), three times a step. Here a buffer goes back to a free list by dtype once its user is done with
its bytes and is handed out again for any shape that fits.
"""
from __future__ import annotations

import math
import threading

import torch


class HostBuffers:
    """Free lists of pinned buffers by dtype. ``take`` a tensor of a shape (a view of a buffer at least
    that large), ``give`` it back when the copy into it is finished and its bytes are consumed."""

    def __init__(self, reuse: bool, pin: bool | None = None, keep: int = 16) -> None:
        self.reuse = reuse
        """Off (a CPU stage: its host copies are the tensors themselves): ``take`` allocates, ``give`` forgets."""
        self.pin = reuse if pin is None else pin
        self.keep = keep
        """Buffers kept per dtype; more given back are freed."""
        self._free: dict[torch.dtype, list[torch.Tensor]] = {}
        self._lock = threading.Lock()
        self.allocated = 0

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape)
        if not self.reuse:
            return torch.empty(shape, dtype=dtype)
        with self._lock:
            free = self._free.get(dtype, [])
            fits = [i for i, b in enumerate(free) if b.numel() >= n]
            buf = free.pop(min(fits, key=lambda i: free[i].numel())) if fits else None
        if buf is None:
            buf = torch.empty(n, dtype=dtype, pin_memory=self.pin)
            self.allocated += 1
        return buf[:n].view(shape)

    def give(self, t: torch.Tensor) -> None:
        """``t`` is free again, the whole buffer under it (from ``take``, or any pinned tensor nobody uses now)."""
        if not self.reuse:
            return
        base = t._base if t._base is not None else t
        if not base.is_contiguous():
            return
        base = base.view(-1)
        with self._lock:
            free = self._free.setdefault(base.dtype, [])
            if len(free) < self.keep:
                free.append(base)

    def copy_of(self, t: torch.Tensor) -> torch.Tensor:
        """A host copy of device tensor ``t`` queued behind the kernels that compute it."""
        return self.take(tuple(t.shape), t.dtype).copy_(t, non_blocking=True)
