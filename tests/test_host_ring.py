"""Host rings between stages on one GPU (comm/host_ring.py), between two processes as the stages use
them: a receiver that queues its reads before the sender queues the tensors still gets them, in order,
through more tensors than the ring has slots (the sender waits for slots to be read), and a release
lets a wait for a tensor that never comes pass (what a survivor does when its peer dies). CUDA only."""
from __future__ import annotations

import time

import pytest
import torch
import torch.multiprocessing as mp

from dejavu_py.comm import host_ring, stream_sync
from dejavu_py.comm.host_ring import HostRing

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and stream_sync.available()),
                                reason="host rings need a CUDA device")


def _sender(path: str, n: int, go) -> None:
    """The other stage: puts tensors i = 1..n (each full of i) once told to."""
    ring = HostRing.open(path)
    go.wait()
    for i in range(1, n + 1):
        torch.cuda._sleep(50_000)  # the sender is late
        ring.put(ring.reserve(64), torch.full((8,), i, device="cuda", dtype=torch.long))
    torch.cuda.synchronize()


def _done(event: torch.cuda.Event, timeout_s: float = 10.0) -> bool:
    t0 = time.monotonic()
    while not event.query():
        if time.monotonic() - t0 > timeout_s:
            return False
        time.sleep(0.001)
    return True


def test_reads_queued_before_the_tensors_get_them_in_order():
    torch.cuda.init()
    ring = HostRing.create("test", 4096)
    n = 3 * host_ring.SLOTS
    ctx = mp.get_context("spawn")
    go = ctx.Event()
    child = ctx.Process(target=_sender, args=(ring.path, n, go))
    child.start()
    got = [ring.take(i, (8,), torch.long, torch.device("cuda")) for i in range(1, n + 1)]  # queued first
    after = torch.cuda.Event()
    after.record()
    time.sleep(0.2)
    assert not after.query()  # nothing sent yet: the stream waits
    go.set()
    assert _done(after)
    child.join(30)
    ring.unlink()
    ring.retire()  # unregistered before the next ring maps (perhaps at the same address)
    assert child.exitcode == 0
    assert [int(g[0]) for g in got] == list(range(1, n + 1))


def test_release_lets_a_wait_for_a_dead_sender_pass():
    torch.cuda.init()
    ring = HostRing.create("test", 4096)
    ring.unlink()
    ring.take(1, (4,), torch.long, torch.device("cuda"))  # its sender will never put it
    after = torch.cuda.Event()
    after.record()
    time.sleep(0.2)
    assert not after.query()
    ring.release()
    assert _done(after)
    assert ring.reserve(4097) is None  # larger than a slot: it goes the slow way
    ring.retire()
