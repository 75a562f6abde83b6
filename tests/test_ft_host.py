"""Fault tolerance's per-step host work, kept small: stacked routing records, replica chunks of several
steps sent and acknowledged as one, per-sequence replica coverage read off the slots' tags."""
from __future__ import annotations

import dataclasses
import pickle
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dejavu_py.models.attn_meta import slot_of, step_slots
from dejavu_py.protocol.plan import StepPlan
from dejavu_py.protocol.replica import ReplicaAck, ReplicaChunk, position_tags
from dejavu_py.protocol.routing import EMPTY, RoutingRecord, compact
from dejavu_py.stage import replica_shm
from dejavu_py.stage.checkpoints import TokenStateRing, routing_mismatches
from dejavu_py.stage.replica_sender import ReplicaSender
from dejavu_py.stage.replica_store import ReplicaStore, coalesce, covered_by_tags


def _record(layers=(3, 4, 5), T=2, K=2, seed=0) -> RoutingRecord:
    g = torch.Generator().manual_seed(seed)
    ids, w = torch.randint(0, 8, (len(layers), T, K), generator=g), torch.rand(len(layers), T, K, generator=g)
    return compact((list(layers), torch.stack((ids.float(), w))))


def test_routing_record_is_stacked_iterates_by_layer_and_pickles_writable():
    rec = _record()
    assert rec.ids.dtype == np.int16 and rec.weights.dtype == np.float32 and rec.ids.shape == (3, 2, 2)
    back = pickle.loads(pickle.dumps(rec, protocol=5))
    assert back.layers == (3, 4, 5) and back.ids.flags.writeable and back.weights.flags.writeable
    for (l1, i1, w1), (l2, i2, w2), j in zip(rec, back, range(3)):
        assert l1 == l2 and np.array_equal(i1, i2) and np.array_equal(w1, w2) and np.array_equal(i1, rec.ids[j])
    assert rec.nbytes == 3 * 2 * 2 * (2 + 4) and len(EMPTY) == 0 and list(EMPTY) == []
    assert compact(([], None)) is EMPTY


def test_routing_mismatches_counts_live_tokens_against_a_stacked_record():
    rec = _record()
    plan = StepPlan(0, 1, [10, 11], [4, 7], [1, 1], [0, 0], [True, True], forced=rec, scratch_seqs=[11])
    assert routing_mismatches(plan, rec) == 0
    other = RoutingRecord(rec.layers, rec.ids.copy(), rec.weights)
    other.ids[1, 1] += 1  # the dead row differs: not counted
    assert routing_mismatches(plan, other) == 0
    other.ids[2, 0] += 1  # a live row differs in one layer
    assert routing_mismatches(plan, other) == 1


def test_token_state_ring_counts_a_record_s_bytes():
    ring = TokenStateRing("all", 1, 4, 8)
    ring.record(0, 1, [1, 2], torch.zeros(2, 4), _record())
    assert ring.stats()["checkpoint_host_bytes"] == _record().nbytes and ring.get(0, 1).routing.layers == (3, 4, 5)


def test_coverage_is_the_prefix_of_positions_every_layer_holds():
    """Tags name (sequence, position): a gap ends the prefix, a layer not written yet holds it back, and a
    slot another sequence (or another position) wrote since does not count."""
    bs, tables = 4, {7: [2, 0, 5], 8: [1, 3]}
    tags = np.zeros((3, 6 * bs), dtype=np.int64)

    def write(sid: int, start: int, n: int, layers=slice(None)) -> None:
        slots = [tables[sid][p // bs] * bs + p % bs for p in range(start, start + n)]
        tags[layers, slots] = position_tags([sid], [start], [n])

    write(7, 0, 5)
    write(7, 5, 1)
    write(7, 9, 1)  # a gap: not a prefix any more
    write(8, 0, 4, slice(0, 2))  # prompt KV, layer by layer
    assert covered_by_tags(tags, tables, bs) == {7: 6, 8: 0}
    write(8, 0, 4, slice(2, 3))
    assert covered_by_tags(tags, tables, bs) == {7: 6, 8: 4}
    tags[1, 2 * bs + 1] = position_tags([8], [1], [1])[0]  # sequence 7's block 2 reused by 8 in one layer
    assert covered_by_tags(tags, tables, bs)[7] == 1
    assert covered_by_tags(tags, {9: [4]}, bs) == {9: 0}
    full = {7: [2]}
    write(7, 0, 4)
    assert covered_by_tags(tags, full, bs) == {7: 4}  # every position of its table


def _fake_kv(layers=(0, 1)) -> SimpleNamespace:
    return SimpleNamespace(layers=list(layers), device=torch.device("cpu"))


def _chunk_args(step: int, mb: int = 0):
    return mb, step, [5], [step], [1], [40 + step]


def test_replica_sender_coalesces_steps_and_one_ack_frees_them():
    sent: list[tuple[ReplicaChunk, torch.Tensor]] = []
    sender = ReplicaSender("s0", _fake_kv(), lag=4, send=lambda m, kv: sent.append((m, kv)))
    assert sender.batch == 2
    kvs = [torch.full((2, 2, 1, 1, 2), float(i)) for i in range(4)]
    for i in range(4):
        sender.chunk(*_chunk_args(i), written=kvs[i])
    sender.flush()
    assert [m.acks() for m, _ in sent] == [[(0, 0), (0, 1)], [(0, 2), (0, 3)]]
    first, kv = sent[0]
    assert first.slots == [40, 41] and first.start_pos == [0, 1] and torch.equal(kv, torch.cat(kvs[:2], dim=2))
    assert sender.unacked[0] == [0, 1, 2, 3]
    sender.acked(ReplicaAck("s0", first.acks()))
    assert sender.unacked[0] == [2, 3]


def test_a_lone_step_leaves_at_the_end_of_the_window():
    sent: list[ReplicaChunk] = []
    sender = ReplicaSender("s0", _fake_kv(), lag=4, send=lambda m, kv: sent.append(m))
    sender.COALESCE_WINDOW_S = 0.05
    sender.chunk(*_chunk_args(0), written=torch.zeros(2, 2, 1, 1, 2))
    time.sleep(0.01)
    assert sent == []  # waiting for the next step's chunk
    time.sleep(0.3)
    assert [m.acks() for m in sent] == [[(0, 0)]]  # none came: it went alone


def test_back_pressure_nudges_the_chunks_held_out():
    sent: list[ReplicaChunk] = []
    sender = ReplicaSender("s0", _fake_kv(), lag=4, send=lambda m, kv: sent.append(m))
    sender.COALESCE_WINDOW_S = 60.0
    sender.batch = 8  # more than the lag: without the nudge the step's chunks would wait a minute
    for i in range(4):
        sender.chunk(*_chunk_args(i), written=torch.zeros(2, 2, 1, 1, 2))

    def holder() -> None:  # acknowledges whatever arrives
        while not sent:
            time.sleep(0.005)
        sender.acked(ReplicaAck("s0", sent[0].acks()))

    t = threading.Thread(target=holder)
    t.start()
    assert sender.wait_for(0, timeout_s=10)
    t.join()
    assert [m.acks() for m in sent] == [[(0, 0), (0, 1), (0, 2), (0, 3)]]


def test_a_coalesced_chunk_covers_each_sequence_in_turn(tmp_path):
    store = ReplicaStore("s0", range(2), 64, 1, 2, torch.float32, False)
    steps = [ReplicaChunk("s0", 0, s, [0, 1], [5, 6], [s, s], [1, 1], [10 + s, 30 + s]) for s in range(3)]
    kv = [torch.full((2, 2, 2, 1, 2), float(s)) for s in range(3)]
    merged, data = coalesce(steps, kv)
    store.apply(merged, data)
    tables = {5: [2], 6: [6], 7: [1]}  # block size 5: positions 0.. of 5 at slots 10.., of 6 at 30..
    assert store.coverage(tables, 5) == {5: 3, 6: 3, 7: 0}
    assert store.coverage({5: [3, 2]}, 5) == {5: 0}  # another table: those slots are not its positions 0..
    assert torch.equal(store.read([12, 32]), torch.full((2, 2, 2, 1, 2), 2.0))
    assert merged.acks() == [(0, 0), (0, 1), (0, 2)]
    bulk = ReplicaChunk("s0", -1, -1, [1], [9], [0], [4], [0, 1, 2, 3])
    store.apply(bulk, torch.zeros(2, 1, 4, 1, 2))  # one layer only
    assert store.coverage({9: [0]}, 5) == {9: 0} and bulk.acks() == []
    assert store.bytes == store.nbytes(2 * 6 + 4, 1)  # slot-layers tagged



@pytest.mark.parametrize("lag,batch", [(1, 1), (2, 1), (4, 2), (8, 4)])
def test_coalescing_leaves_half_the_lag_free(lag, batch):
    assert ReplicaSender("s0", _fake_kv(), lag=lag, send=lambda m, kv: None).batch == batch


def test_host_buffers_hand_a_buffer_out_again_for_any_shape_and_dtype_that_fits():
    from dejavu_py.stage.host_buffers import HostBuffers

    pool = HostBuffers(reuse=True, pin=False, keep=2)
    a = pool.take((2, 3, 4), torch.float32)
    assert a.shape == (2, 3, 4) and pool.allocated == 1
    pool.give(a)
    b = pool.take((5, 4), torch.float32)  # smaller: the same buffer
    assert b.data_ptr() == a.data_ptr() and pool.allocated == 1
    c = pool.take((2, 3, 4), torch.float32)  # b is not back: a new one
    assert c.data_ptr() != b.data_ptr() and pool.allocated == 2
    pool.give(c)
    d = pool.take((48,), torch.int16)  # bytes are bytes: c's buffer again
    assert d.dtype == torch.int16 and d.data_ptr() == c.data_ptr() and pool.allocated == 2
    for t in (b, d, pool.take((1,), torch.float32)):
        pool.give(t)
    assert len(pool._free) == 2  # keeps at most ``keep``
    flat = HostBuffers(reuse=True, pin=False)
    record = flat.take((64,), torch.uint8)
    flat.give(record[16:].view(torch.float32)[2:])  # any view of a buffer taken: the whole buffer goes back
    assert flat.take((64,), torch.uint8).data_ptr() == record.data_ptr()
    other = HostBuffers(reuse=True, pin=False)
    other.give(torch.zeros(2, 4, 3, dtype=torch.int16))  # not from take (a bulk chunk's): flattened
    assert other.take((3, 5), torch.int16).shape == (3, 5) and other.allocated == 0


def test_host_buffers_off_on_a_cpu_stage():
    from dejavu_py.stage.host_buffers import HostBuffers

    pool = HostBuffers(reuse=False)
    t = torch.ones(3)
    pool.give(t)  # a CPU stage's host copy may be a tensor still in use: never handed out again
    assert pool.take((3,), torch.float32).data_ptr() != t.data_ptr()


def test_a_chunk_written_into_the_holder_s_file_is_acknowledged_by_that_write():
    """Same host: no acknowledgement comes back from the holder, yet back-pressure lets the stage on; the
    slots' tags go in with the bytes, so no message goes at all; the step's host buffer goes back for the
    next step."""
    from dejavu_py.stage.host_buffers import HostBuffers

    sent: list[ReplicaChunk] = []
    sender = ReplicaSender("s0", _fake_kv(), lag=4, send=lambda m, kv: sent.append(m))
    sender.attach(replica_shm.Replica(torch.zeros(2, 2, 64, 1, 2), torch.zeros(2, 64, dtype=torch.int64)), None)
    sender.buffers = HostBuffers(reuse=True, pin=False)
    kv = sender.buffers.take((2, 2, 1, 1, 2), torch.float32).fill_(3.0)
    sender.chunk(*_chunk_args(0), written=kv)
    for i in range(1, 4):
        sender.chunk(*_chunk_args(i), written=torch.full((2, 2, 1, 1, 2), 4.0))
    assert sender.wait_for(0, timeout_s=10)  # 4 steps queued, lag 4: only the writes free them
    sender.flush()
    assert sender.unacked.get(0, []) == [] and sent == []
    kv_, tags = sender.shm
    assert torch.all(kv_[:, :, 40] == 3.0) and torch.all(kv_[:, :, 43] == 4.0)
    assert covered_by_tags(tags.numpy(), {5: [5]}, 8) == {5: 4}  # slot 40 + i holds position i

    assert sender.buffers.take((4,), torch.float32).data_ptr() == kv.data_ptr()


@pytest.mark.parametrize("start_pos,num_tokens", [([0, 15, 16, 33], [1, 1, 1, 1]), ([0, 15, 30, 2], [20, 1, 4, 0])],
                         ids=["decode", "mixed"])
def test_step_slots_are_the_slots_of_each_written_position(start_pos, num_tokens):
    tables = [[7, 3, 9], [1, 2], [4, 0, 5], [8, 6, 11]]
    want = [slot_of(t, p, 16) for t, s, n in zip(tables, start_pos, num_tokens) for p in range(s, s + n)]
    assert step_slots(tables, start_pos, num_tokens, 16) == want and len(want) == sum(num_tokens)


def test_a_stage_s_routing_records_ride_with_the_next_plan_it_sends_on():
    """Behind those of the stages before it; a replay's plan, which stops before the last stage, takes none."""
    from dejavu_py.protocol.plan import StepRouting
    from dejavu_py.stage.stage_ft import StageFT

    ft = StageFT.__new__(StageFT)  # only its unsent routing records are used here
    ft.unsent_routing = [StepRouting(0, 3, "s1", "r3"), StepRouting(1, 4, "s1", "r4")]
    replay = StepPlan(0, 5, [1], [9], [1], [7], [True], replay_until="s2")
    ft.attach_routing(replay)
    assert replay.relayed == [] and len(ft.unsent_routing) == 2
    plan = StepPlan(0, 6, [1], [9], [1], [7], [True], relayed=[StepRouting(0, 3, "s0", "up")])
    ft.attach_routing(plan)
    assert [(r.stage, r.step) for r in plan.relayed] == [("s0", 3), ("s1", 3), ("s1", 4)] and ft.unsent_routing == []
    ft.attach_routing(plan)
    assert len(plan.relayed) == 3


def test_the_last_stage_s_result_takes_its_records_of_earlier_steps_and_keeps_this_one_s_for_the_next():
    """Taking a step's record apart is off the chain on the last stage too: its result takes the records
    relayed to it and its own kept ones; this step's is kept in the idle time, for the next result. A
    large record (a batch of prompts') goes to the coordinator on its own instead."""
    from dejavu_py.protocol.plan import StepResult, StepRouting
    from dejavu_py.stage.stage_ft import ATTACHED_ROUTING_BYTES, StageFT

    ft = StageFT.__new__(StageFT)
    records = []
    ft.sender, ft.unsent_routing = None, [StepRouting(0, 4, "s1", "r4")]
    ft.ring = SimpleNamespace(record=lambda *a: records.append(a))
    ft.port, ft.runner = SimpleNamespace(me=SimpleNamespace(name="s1")), None  # no record is taken on the chain
    plan = StepPlan(0, 5, [1], [9], [1], [7], [True], relayed=[StepRouting(0, 4, "s0", "up")])
    result = StepResult(0, 5, [1], [9])
    done = SimpleNamespace(plan=plan)
    assert ft.after_step(done, result) is False
    assert [(r.stage, r.step) for r in result.relayed] == [("s0", 4), ("s1", 4)] and ft.unsent_routing == []
    small, large = SimpleNamespace(nbytes=ATTACHED_ROUTING_BYTES), SimpleNamespace(nbytes=ATTACHED_ROUTING_BYTES + 1)
    coord: list = []
    ft.runner, ft.port.send_coord = SimpleNamespace(ft_record=lambda done: SimpleNamespace(routing=small)), coord.append
    ft.bookkeep(done, result)
    assert [(r.stage, r.step, r.routing) for r in ft.unsent_routing] == [("s1", 5, small)] and len(records) == 1
    ft.runner = SimpleNamespace(ft_record=lambda done: SimpleNamespace(routing=large))  # a batch of prompts'
    ft.bookkeep(SimpleNamespace(plan=dataclasses.replace(plan, step=6)), result)
    assert len(ft.unsent_routing) == 1 and [(r.stage, r.step, r.routing) for r in coord] == [("s1", 6, large)]


def test_host_buffers_reserved_ahead_serve_the_sizes_they_were_reserved_for():
    """Reserved large buffers stay for large requests (a small one gets a small buffer of its own), and
    all of them are kept, however many."""
    from dejavu_py.stage.host_buffers import HostBuffers

    pool = HostBuffers(reuse=True, pin=False, keep=2)
    pool.reserve([4 << 20, 4 << 20, 16 << 20])
    assert pool.reserved == 3 and pool.allocated == 0 and len(pool._free) == 3
    small = pool.take((1000,), torch.uint8)
    assert pool.allocated == 1
    big = [pool.take((4 << 20,), torch.uint8), pool.take((3 << 20,), torch.uint8), pool.take((16 << 20,), torch.uint8)]
    assert pool.allocated == 1 and sorted(b.untyped_storage().nbytes() >> 20 for b in big) == [4, 4, 16]
    for t in (small, *big):
        pool.give(t)
    assert len(pool._free) == 4


def test_a_stage_reserves_the_host_buffers_its_fault_tolerance_takes_while_serving():
    """A decode step's K/V at the largest batch for the replica lag and the steps in flight, the prompts'
    routing, and (with a replica holder) the prompt replica's pieces; nothing with FT off."""
    from dejavu_py import cli
    from dejavu_py.models.kv_cache import CacheSpec
    from dejavu_py.protocol.layout import build_layout
    from dejavu_py.stage.replica_sender import PIECE_BYTES
    from dejavu_py.stage.stage_ft import host_reservation

    mcfg = SimpleNamespace(num_experts_per_tok=8, is_moe_layer=lambda i: i % 2 == 0)
    spec = CacheSpec(100, 16, 4, 64)
    args = ["--model", "m", "--prompts", "p", "--stages", "2", "--max-batch-size", "32", "--max-batch-tokens", "512",
            "--replica-lag", "4"]
    for ft, want in (("on", True), ("off", False)):
        cfg, _ = cli.parse([*args, "--ft", ft])
        layout = build_layout(cfg, 6, 2)
        me = layout.by_name("s0")
        sizes = host_reservation(cfg, layout, me, mcfg, spec, [0, 1, 2], torch.bfloat16)
        step_kv, routing = 2 * 3 * 32 * 4 * 64 * 2, 2 * 2 * 512 * 8 * 4
        assert sorted(sizes) == (sorted([step_kv] * 7 + [routing] * 2 + [PIECE_BYTES] * 3) if want else [])


class _Copy:
    """A step's K/V copy to the host still in flight until ``land``: then its bytes are in."""

    def __init__(self, kv: torch.Tensor) -> None:
        self.kv, self.landed = kv, threading.Event()

    def land(self, value: float) -> None:
        self.kv.fill_(value)
        self.landed.set()

    def query(self) -> bool:
        return self.landed.is_set()

    def synchronize(self) -> None:
        self.landed.wait(10)


def test_a_step_s_chunk_already_on_the_host_is_written_by_the_stage_s_thread_the_others_by_the_sender():
    """Same host: a chunk whose bytes are in is in the holder's file when ``chunk`` returns (no thread
    takes the interpreter's lock from the stage's for it); one whose copy is still on its way goes to the
    sender thread, written once it lands, and back-pressure counts only that one."""
    sent: list[ReplicaChunk] = []
    sender = ReplicaSender("s0", _fake_kv(), lag=4, send=lambda m, kv: sent.append(m))
    sender.attach(replica_shm.Replica(torch.zeros(2, 2, 64, 1, 2), torch.zeros(2, 64, dtype=torch.int64)), None)
    late = _Copy(torch.zeros(2, 2, 1, 1, 2))
    sender.chunk(*_chunk_args(0), written=late.kv, ready=late)
    sender.chunk(*_chunk_args(1), written=torch.full((2, 2, 1, 1, 2), 5.0))
    kv_, tags = sender.shm
    assert torch.all(kv_[:, :, 41] == 5.0) and sender.unacked[0] == [0]  # step 1 written, step 0 waits
    assert covered_by_tags(tags.numpy(), {5: [5]}, 8) == {5: 0}  # position 0 not in yet
    late.land(7.0)
    sender.flush()
    assert torch.all(kv_[:, :, 40] == 7.0) and sender.unacked[0] == [] and sent == []
    assert covered_by_tags(tags.numpy(), {5: [5]}, 8) == {5: 2}


def test_a_step_record_in_one_buffer_comes_apart_on_the_host_as_its_rows():
    """A small graph step's record goes to the host in one copy of its buffer (K/V, then routing); taken
    apart there, the first rows (the real ones of a padded batch bucket) are the step's K/V and routing."""
    from dejavu_py.stage.decode_graphs import StepRecord, stack_routing

    B, Bb, K, D, E = 3, 4, 2, 8, 5
    g = torch.Generator().manual_seed(0)
    written = [(torch.randn(Bb, K, D, generator=g), torch.randn(Bb, K, D, generator=g)) for _ in range(3)]
    routed = [(layer, torch.randint(0, E, (Bb, 2), generator=g), torch.rand(Bb, 2, generator=g)) for layer in (4, 6)]
    rec = StepRecord.build([4, 6], routed, written, torch.bfloat16)
    assert rec.flat.dtype == torch.uint8 and rec.flat.numel() == 2 * 3 * Bb * K * D * 2 + 2 * 2 * Bb * 2 * 4
    kv, routing = rec.on_host(rec.flat.clone(), B)
    want_kv = torch.stack((torch.stack([k for k, _ in written]), torch.stack([v for _, v in written]))).bfloat16()
    assert torch.equal(kv, want_kv[:, :, :B]) and torch.equal(routing, stack_routing(routed)[:, :, :B])
    assert kv.untyped_storage().data_ptr() == routing.untyped_storage().data_ptr()  # one buffer: back with the K/V
    record = compact((rec.layers, routing), copy=True)
    assert record.layers == (4, 6) and (record.ids == np.stack([i[:B].numpy() for _, i, _ in routed])).all()
