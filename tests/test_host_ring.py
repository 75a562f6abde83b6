"""Host rings between stages on one GPU (comm/host_ring.py), on two streams of one process standing for
the two stages' streams: a receiver that queues its read before the sender queues the tensor still gets
it, slots are reused only once read, and a release lets a wait for a tensor that never comes pass (what
a survivor does when its peer dies). CUDA only; the two-process path runs in the GPU pipeline checks."""
from __future__ import annotations

import time

import pytest
import torch

from dejavu_py.comm import host_ring, stream_sync
from dejavu_py.comm.host_ring import HostRing, RingRead

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and stream_sync.available()),
                                reason="host rings need a CUDA device")


def _pair(slot_bytes: int) -> tuple[HostRing, HostRing]:
    inbound = HostRing.create("test", slot_bytes)
    outbound = HostRing.open(inbound.path)
    inbound.unlink()
    return inbound, outbound


def _done(event: torch.cuda.Event, timeout_s: float = 5.0) -> bool:
    t0 = time.monotonic()
    while not event.query():
        if time.monotonic() - t0 > timeout_s:
            return False
        time.sleep(0.001)
    return True


def test_read_queued_before_the_tensor_still_gets_it():
    inbound, outbound = _pair(1 << 16)
    send, recv = torch.cuda.Stream(), torch.cuda.Stream()
    dev = torch.device("cuda")
    xs = [torch.randn(17, 33, device=dev, dtype=torch.bfloat16) for _ in range(3 * host_ring.SLOTS)]
    got = []
    for x in xs:  # the receiver's read is queued first: its stream waits for the sender's copy
        seq = outbound.reserve(x.numel() * x.element_size())
        with torch.cuda.stream(recv):
            got.append(RingRead(inbound, seq, tuple(x.shape), x.dtype, dev).take())
        with torch.cuda.stream(send):
            torch.cuda._sleep(100_000)  # the sender is late
            outbound.put(seq, x)
    recv.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(got, xs))


def test_sender_waits_for_a_slot_to_be_read():
    inbound, outbound = _pair(4096)
    send, recv = torch.cuda.Stream(), torch.cuda.Stream()
    dev = torch.device("cuda")
    xs = [torch.full((8,), i, device=dev, dtype=torch.long) for i in range(host_ring.SLOTS + 2)]
    with torch.cuda.stream(send):
        for x in xs:  # more than the ring holds: the last two wait for the first reads
            outbound.put(outbound.reserve(64), x)
        sent = torch.cuda.Event()
        sent.record()
    time.sleep(0.2)
    assert not sent.query()
    with torch.cuda.stream(recv):
        got = [inbound.take(i + 1, (8,), torch.long, dev) for i in range(len(xs))]
    assert _done(sent)
    recv.synchronize()
    assert [int(g[0]) for g in got] == list(range(len(xs)))


def test_release_lets_a_wait_for_a_dead_sender_pass():
    inbound, outbound = _pair(4096)
    recv = torch.cuda.Stream()
    with torch.cuda.stream(recv):
        inbound.take(1, (4,), torch.long, torch.device("cuda"))  # its sender will never put it
        after = torch.cuda.Event()
        after.record()
    time.sleep(0.2)
    assert not after.query()
    inbound.release()
    assert _done(after)
    assert outbound.reserve(4097) is None  # larger than a slot: it goes the slow way
