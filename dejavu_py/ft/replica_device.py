"""A source stage's device writing each decode step's K/V straight into its holder's replica file.

When the holder's replica file is on this host (replica_shm.py) and the stage runs on CUDA, the file's
mapping is page-locked (``cudaHostRegister``) and seen by the device at the same address (unified
addressing), so a step's K/V need no trip through the host's CPUs: the step's record [2, L, B, K, D]
is copied once on the device (the graph overwrites it on its next replay), and on a side stream one
scatter kernel writes it at the step's slots into the file, over PCIe (~48 GB/s on an H100: 90 us for
a batch-64 step of 8 OLMoE layers), while the next step computes. The stage's thread only queues the
two; the replica sender waits for the scatter's event and tells the holder what is now in its file.
No pinned staging buffer, no CPU copy, no copy threads holding the interpreter's lock.

Registering a file of a few GB takes a few hundred ms: it runs on a thread of its own, and steps use
the host path (replica.py) until it is done. Env DEJAVU_REPLICA_DEVICE_WRITE=0 keeps the host path.

Legend: L = the source stage's layers, N = replica slots, B = a step's rows, K = KV heads, D = head dim.
"""
from __future__ import annotations

import os
import threading

import torch

from .. import log

_log = log.get(__name__)


def wanted(device: torch.device) -> bool:
    return device.type == "cuda" and os.environ.get("DEJAVU_REPLICA_DEVICE_WRITE", "1").strip() != "0"


class DeviceWritten:
    """A step's K/V queued into the holder's file by ``target``: there once ``synchronize`` returns."""

    __slots__ = ("event", "target", "nbytes")

    def __init__(self, event: torch.cuda.Event, target: DeviceTarget, nbytes: int) -> None:
        self.event, self.target, self.nbytes = event, target, nbytes

    def synchronize(self) -> None:
        self.event.synchronize()


class _CudaArray:
    """Raw device memory as torch sees it through ``__cuda_array_interface__`` (no ownership)."""

    def __init__(self, ptr: int, shape: tuple[int, ...]) -> None:
        self.__cuda_array_interface__ = {"data": (ptr, False), "shape": shape, "typestr": "|u1", "version": 3,
                                         "strides": None}


class DeviceTarget:
    """The holder's replica mapping [2, L, N, K, D], registered and viewed from ``device``."""

    def __init__(self, mapped_2LNKD: torch.Tensor, device: torch.device) -> None:
        self.mapped = mapped_2LNKD  # keeps the mapping alive as long as the device writes into it
        self.device = device
        nbytes = mapped_2LNKD.numel() * mapped_2LNKD.element_size()
        with torch.cuda.device(device):
            err = torch.cuda.cudart().cudaHostRegister(mapped_2LNKD.data_ptr(), nbytes, 1)  # portable
            if int(err) != 0:
                raise RuntimeError(f"cudaHostRegister of the replica mapping failed (error {int(err)})")
            self.registered = True
            two, L, N, K, D = mapped_2LNKD.shape
            raw = torch.as_tensor(_CudaArray(mapped_2LNKD.data_ptr(), (two, L, N, K * D * mapped_2LNKD.element_size())),
                                  device=device)
            self.view_2LNX = raw.view(mapped_2LNKD.dtype)  # [2, L, N, K * D]
            self.side = torch.cuda.Stream(device)
        self.writes = 0

    @classmethod
    def register_async(cls, mapped_2LNKD: torch.Tensor, device: torch.device, ready) -> threading.Thread:
        """Register on a thread; ``ready(target)`` gets the target (None when registering failed)."""

        def run() -> None:
            torch.cuda.set_device(device)
            try:
                target = cls(mapped_2LNKD, device)
            except Exception as e:  # the host path goes on
                _log.warning("replica writes stay on the host: %s", str(e).splitlines()[0][:200])
                target = None
            ready(target)

        thread = threading.Thread(target=run, name="replica-register", daemon=True)
        thread.start()
        return thread

    def write(self, kv_2LBKD: torch.Tensor, slots_B: torch.Tensor) -> DeviceWritten:
        """Queue the step's K/V (its layers in the replica's order) into the file at ``slots_B`` (device
        integers); both inputs may be overwritten once the current stream moves on."""
        L = kv_2LBKD.shape[1]
        if L != self.view_2LNX.shape[1]:
            raise ValueError(f"a step of {L} layers for a replica of {self.view_2LNX.shape[1]}")
        kv_2LBX = kv_2LBKD.flatten(3).clone()  # on the step's stream: before the next replay overwrites it
        idx_B = slots_B.to(torch.long).clone()
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.side):
            self.view_2LNX.index_copy_(2, idx_B, kv_2LBX.to(self.view_2LNX.dtype))
            kv_2LBX.record_stream(self.side)
            idx_B.record_stream(self.side)
            done = torch.cuda.Event()
            done.record(self.side)
        self.writes += 1
        return DeviceWritten(done, self, kv_2LBX.numel() * kv_2LBX.element_size())

    def close(self) -> None:
        """Unregister the mapping once the queued writes are done (the mapping itself stays valid)."""
        if self.registered:
            self.side.synchronize()
            torch.cuda.cudart().cudaHostUnregister(self.mapped.data_ptr())
            self.registered = False
