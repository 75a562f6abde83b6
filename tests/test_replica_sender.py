"""The replica sender's bulk jobs: a prompt's KV (hundreds of MB on a GPU) goes in pieces, and the
decode steps' chunks that arrive meanwhile are written and acknowledged between two pieces instead of
waiting behind it; the holder reads what it holds off the slots' tags, whatever the order."""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import torch

from dejavu_py.protocol.replica import ReplicaChunk
from dejavu_py.stage import replica_shm
from dejavu_py.stage.replica_sender import ReplicaSender, _token_range, pieces
from dejavu_py.stage.replica_store import ReplicaStore, covered_by_tags

L, K, D, N = 2, 1, 4, 64
PIECE = 2 * K * D * 4 * 4  # four tokens of one layer (float32), a decode step's chunk of two sequences


def _replica() -> replica_shm.Replica:
    return replica_shm.Replica(torch.zeros(2, L, N, K, D), torch.zeros(L, N, dtype=torch.int64))


TABLES = {1: [1], 2: [2]}
"""Block size 8: slot = 8 * id + position (``_prompt``)."""


def _sender(sent: list, shm: replica_shm.Replica | None, piece_bytes: int = PIECE) -> ReplicaSender:
    kv = SimpleNamespace(layers=[0, 1], device=torch.device("cpu"))
    s = ReplicaSender("s0", kv, lag=2, send=lambda m, t: sent.append((m, t)), piece_bytes=piece_bytes)
    s.attach(shm, None)
    return s


def _prompt(seqs: dict[int, int]) -> tuple[ReplicaChunk, torch.Tensor]:
    """A prefill step (microbatch 0, step 0) of these sequences (id: length), slot = 8 * id + position."""
    sids = sorted(seqs)
    slots = [8 * s + p for s in sids for p in range(seqs[s])]
    kv = torch.arange(2 * L * len(slots) * K * D, dtype=torch.float32).view(2, L, len(slots), K, D)
    return ReplicaChunk("s0", 0, 0, [0, 1], sids, [0] * len(sids), [seqs[s] for s in sids], slots), kv


def test_pieces_cover_each_layer_in_token_ranges_and_know_their_sequences():
    msg, kv = _prompt({1: 4, 2: 3})
    assert pieces(kv, PIECE) == [(0, 0, 4), (0, 4, 7), (1, 0, 4), (1, 4, 7)]
    assert _token_range(msg, 3, 6) == {"seq_ids": [1, 2], "start_pos": [3, 0], "num_tokens": [1, 2]}
    assert _token_range(msg, 6, 7) == {"seq_ids": [2], "start_pos": [2], "num_tokens": [1]}


def test_steps_chunks_are_written_between_a_bulk_job_s_pieces_and_nothing_is_sent(monkeypatch):
    writes: list[int] = []
    real = replica_shm.write_chunk

    def slow(target, index, layers, slots, kv, tags):
        writes.append(len(layers))  # 1: a bulk piece, 2: a step's chunk
        if len(layers) == 1:
            time.sleep(0.02)
        real(target, index, layers, slots, kv, tags)

    monkeypatch.setattr(replica_shm, "write_chunk", slow)
    sent: list = []
    replica = _replica()
    shm = replica.kv_2LNKD
    sender = _sender(sent, replica)
    msg, kv = _prompt({1: 4, 2: 3})
    sender.forward(msg, kv)
    for step in (1, 2, 3):  # decode steps of both sequences, lag 2: each must be acknowledged to go on
        assert sender.wait_for(0, timeout_s=10)
        sender.chunk(0, step, [1, 2], [3 + step, 2 + step], [1, 1], [8 + 3 + step, 16 + 2 + step],
                     written=torch.full((2, L, 2, K, D), -float(step)))
    assert sender.wait_for(0, timeout_s=10)
    sender.flush()
    assert writes.index(2) < len(writes) - 1 - writes[::-1].index(1)  # a step's chunk before the last piece
    assert sent == []  # the holder's file says it all
    assert torch.equal(shm[:, :, msg.slots], kv) and torch.all(shm[:, :, 14] == -3.0)
    assert covered_by_tags(replica.tags_LN.numpy(), TABLES, 8) == {1: 7, 2: 6}  # prompts and the 3 steps
    assert sender.unacked[0] == [] and sender.stats()["replica_bulk_jobs"] == 1


def test_across_hosts_a_bulk_job_s_pieces_rebuild_the_replica_and_the_last_is_acknowledged(tmp_path):
    sent: list = []
    sender = _sender(sent, None)
    msg, kv = _prompt({1: 4, 2: 3})
    sender.forward(msg, kv)
    sender.flush()
    assert len(sent) == 4 and [m.acks() for m, _ in sent] == [[]] * 3 + [[(0, 0)]]
    store = ReplicaStore("s0", range(L), N, K, D, torch.float32, False)
    for m, t in sent:
        store.apply(m, t)
    assert store.coverage(TABLES, 8) == {1: 4, 2: 3}
    assert torch.equal(store.read(msg.slots), kv)


def test_a_bulk_job_for_a_holder_that_was_replaced_is_dropped(monkeypatch):
    gate = threading.Event()
    real = replica_shm.write_chunk
    monkeypatch.setattr(replica_shm, "write_chunk", lambda *a: (gate.wait(10), real(*a)))
    sent: list = []
    replica = _replica()
    sender = _sender(sent, replica)
    msg, kv = _prompt({1: 4, 2: 3})
    sender.forward(msg, kv)
    time.sleep(0.05)  # the first piece is being written
    sender.reset()  # the holder died: its file and what we wrote there are gone
    gate.set()
    sender.flush()
    assert sent == [] and sender.unacked.get(0, []) == []
    assert covered_by_tags(replica.tags_LN.numpy(), TABLES, 8) == {1: 0, 2: 0}  # the rest was dropped


class _LateBytes:
    """Stands for the event of a host chunk's copy still in flight: its bytes land when it is waited for."""

    def __init__(self, kv: torch.Tensor, value: float) -> None:
        self.kv, self.value = kv, value

    def synchronize(self) -> None:
        time.sleep(0.02)
        self.kv.fill_(self.value)


def test_a_large_host_chunk_is_written_only_once_its_bytes_are_in():
    sent: list = []
    replica = _replica()
    shm = replica.kv_2LNKD
    sender = _sender(sent, replica)
    msg, kv = _prompt({1: 4, 2: 3})  # larger than a piece: a bulk job
    sender.forward(msg, kv.zero_(), ready=_LateBytes(kv, 7.0))
    sender.flush()
    assert torch.all(shm[:, :, msg.slots] == 7.0)


def test_a_holder_replaced_during_a_bulk_job_across_hosts_leaves_the_sender_working():
    gate = threading.Event()
    sent: list = []

    def send(m, t):
        gate.wait(10)
        sent.append(m)

    kv_ = SimpleNamespace(layers=[0, 1], device=torch.device("cpu"))
    sender = ReplicaSender("s0", kv_, lag=2, send=send, piece_bytes=PIECE)
    msg, kv = _prompt({1: 4, 2: 3})
    sender.forward(msg, kv)
    time.sleep(0.05)  # the first piece is on its way
    sender.reset()
    gate.set()
    flushed = threading.Thread(target=sender.flush, daemon=True)
    flushed.start()
    flushed.join(10)
    assert not flushed.is_alive() and len(sent) < 4  # the rest of the job was dropped, the thread lives on


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pieces are copied off a device")
@pytest.mark.parametrize("shared", [True, False], ids=["holder-file", "over-the-edge"])
def test_a_piece_s_host_buffer_goes_back_only_once_nothing_reads_it(shared):
    """Written into the holder's file, a piece's pinned buffer is free at once; sent over the edge it is
    not (the send is asynchronous: the next piece's copy would overwrite bytes still on the wire)."""
    from dejavu_py.stage.host_buffers import HostBuffers

    sent: list = []
    sender = _sender(sent, _replica() if shared else None)
    sender.kv = SimpleNamespace(layers=[0, 1], device=torch.device("cuda"))
    sender.buffers = HostBuffers(reuse=True)
    msg, kv = _prompt({1: 4, 2: 3})
    sender.forward(msg, kv.cuda())
    sender.flush()
    returned = len(sender.buffers._free)
    assert (returned > 0) == shared and len(sent) == (0 if shared else 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pieces are copied off a device")
def test_a_stage_waiting_on_back_pressure_queues_the_copies_a_bulk_job_asks_for():
    """Across hosts a bulk job's pieces go before the steps' chunks, and each piece's copy off the device
    waits for the stage's thread to queue it (with its next launch). A stage blocked on back-pressure
    launches nothing: unless it queues them while it waits, nothing moves until the wait times out."""
    from dejavu_py.protocol.replica import ReplicaAck
    from dejavu_py.stage.host_buffers import HostBuffers
    from dejavu_py.stage.host_copies import DeferredCopy, queue_copies

    asked: list[DeferredCopy] = []
    lock = threading.Lock()

    def defer_copy(src, dst, after):  # StageRunner.defer_copy: queued by the stage's thread later
        copy = DeferredCopy(src, dst, after=after)
        with lock:
            asked.append(copy)
        return copy

    def flush_deferred_copies():  # StageRunner.flush_deferred_copies
        with lock:
            deferred = asked[:]
            asked.clear()
        for copy in deferred:
            if copy.after is not None:
                torch.cuda.current_stream().wait_event(copy.after)
            copy.event = queue_copies([(copy.src, copy.dst)], blocking=True)
            copy.queued.set()

    sent: list = []

    def holder(m, t):  # across hosts: the holder acknowledges what it got
        sent.append(m)
        if m.acks():
            sender.acked(ReplicaAck("s0", m.acks()))

    sender = ReplicaSender("s0", SimpleNamespace(layers=[0, 1], device=torch.device("cuda")), lag=2, send=holder,
                           piece_bytes=PIECE)
    sender.buffers, sender.defer_copy, sender.flush_deferred = HostBuffers(reuse=True), defer_copy, flush_deferred_copies
    msg, kv = _prompt({1: 4, 2: 3})
    sender.forward(msg, kv.cuda())  # step 0 of microbatch 0: a bulk job of 4 pieces
    sender.chunk(0, 1, [1, 2], [4, 3], [1, 1], [12, 19], written=torch.ones(2, L, 2, K, D))
    t0 = time.monotonic()
    assert sender.wait_for(0, timeout_s=5)  # 2 steps unacknowledged: full until the job is through
    assert time.monotonic() - t0 < 2.5
    sender.flush()
    assert [m.acks() for m in sent] == [[]] * 3 + [[(0, 0)], [(0, 1)]]
