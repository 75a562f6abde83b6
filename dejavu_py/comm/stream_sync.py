"""Stream-ordered waits on, and writes of, a 32-bit word in host memory that two processes map.

Two stages sharing one GPU hand a step over without either host waiting: the sender's stream writes a
counter after its output is copied out, the receiver's stream waits until the counter reaches the
step's number before it copies the input in. Unlike an event shared between processes, a word in host
memory can be written by the survivor's own host when the other process dies, which releases any wait
on it (a stream waiting on a dead process's event waits forever).

The waits and writes are the driver's stream memory operations (``cuStreamWaitValue32``,
``cuStreamWriteValue32``), reached through ctypes: torch does not expose them.
"""
from __future__ import annotations

import ctypes
import functools

import torch

WAIT_GEQ = 0x0
"""Wait until ``(int32)(*addr - value) >= 0``."""


@functools.cache
def _driver() -> tuple:
    lib = ctypes.CDLL("libcuda.so.1")
    fns = []
    for name in ("cuStreamWaitValue32", "cuStreamWriteValue32"):
        fn = getattr(lib, name + "_v2", None) or getattr(lib, name)
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
        fns.append(fn)
    return tuple(fns)


def available() -> bool:
    """Whether this process can use stream memory operations (a CUDA driver is loaded)."""
    try:
        _driver()
    except (OSError, AttributeError):
        return False
    return torch.cuda.is_available()


def _check(code: int, what: str) -> None:
    if code != 0:
        raise RuntimeError(f"{what} failed with CUDA driver error {code}")


def wait_geq(addr: int, value: int, stream: torch.cuda.Stream | None = None) -> None:
    """The stream waits until the word at ``addr`` (host memory registered as mapped) reaches ``value``."""
    s = stream or torch.cuda.current_stream()
    _check(_driver()[0](s.cuda_stream, addr, value & 0xFFFFFFFF, WAIT_GEQ), "cuStreamWaitValue32")


def write(addr: int, value: int, stream: torch.cuda.Stream | None = None) -> None:
    """The stream writes ``value`` to the word at ``addr`` once the work queued before it is done."""
    s = stream or torch.cuda.current_stream()
    _check(_driver()[1](s.cuda_stream, addr, value & 0xFFFFFFFF, 0), "cuStreamWriteValue32")


def register(t: torch.Tensor) -> None:
    """Page-lock a host tensor's memory and map it for the devices (copies from it are asynchronous,
    and its words can be waited on); portable: whichever device this thread has current."""
    code = int(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 3))
    _check(code, "cudaHostRegister")


def unregister(t: torch.Tensor) -> None:
    """Undo ``register`` (before the memory is unmapped: a range left registered makes a later mapping
    at the same address fail to register)."""
    _check(int(torch.cuda.cudart().cudaHostUnregister(t.data_ptr())), "cudaHostUnregister")
