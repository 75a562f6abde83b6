"""Cancelling a request in the schedulers (colocated and disaggregated, around a recovery and its
replay), and per-request ignore_eos: on their own, with a stand-in model (tests/online_harness.py)."""
from __future__ import annotations

from types import SimpleNamespace

from online_harness import EOS, expected, token_at

from dejavu_py.config import SchedulerConfig
from dejavu_py.coordinator.block_manager import BlockManager
from dejavu_py.coordinator.disagg import DisaggDriver
from dejavu_py.coordinator.prefill_scheduler import PrefillScheduler
from dejavu_py.coordinator.replay import for_replay
from dejavu_py.coordinator.request import Request
from dejavu_py.coordinator.scheduler import Scheduler
from dejavu_py.coordinator.sequence import Sequence, Status
from dejavu_py.protocol.plan import KVAck, StepPlan, StepResult
from dejavu_py.protocol.sampling import SamplingParams


def request(i: int, n_prompt: int = 4, max_new: int = 6, ignore_eos: bool = False) -> Request:
    return Request(id=f"q{i}", input_ids=list(range(20, 20 + n_prompt)), max_new_tokens=max_new,
                   sampling=SamplingParams(seed=i), ignore_eos=ignore_eos)


def answer(plan: StepPlan) -> StepResult:
    return StepResult(plan.mb, plan.step, list(plan.seq_ids),
                      [token_at(start + n) for start, n in zip(plan.start_pos, plan.num_tokens)])


def test_per_request_ignore_eos_keeps_a_set_lookup_per_token():
    sched = Scheduler(SchedulerConfig(), BlockManager(64, 8), 1, frozenset({EOS}))
    a, b = Sequence(0, request(0, max_new=9)), Sequence(1, request(1, max_new=9, ignore_eos=True))
    for seq in (a, b):
        sched.add(seq)
    while sched.has_work():
        for plan in sched.schedule_all():
            sched.on_result(answer(plan))
    assert a.output_ids == expected(4, 9) and a.finish_reason == "stop"
    assert b.output_ids == expected(4, 9, ignore_eos=True) and b.finish_reason == "length"
    assert b.stop_ids == frozenset() and a.stop_ids == frozenset({EOS})
    assert sched.blocks.num_free() == 64 and not sched.seqs  # finished ones are not kept


def test_abort_in_the_queue_and_in_a_microbatch_with_a_plan_in_flight():
    blocks = BlockManager(64, 8)
    sched = Scheduler(SchedulerConfig(max_batch_size=1), blocks, 1, frozenset({EOS}), depth=2)
    a, b, c = (Sequence(i, request(i, max_new=20, ignore_eos=True)) for i in range(3))
    for seq in (a, b, c):
        sched.add(seq)
    first, second = sched.schedule_all()  # a's prefill, and its next step in flight behind it
    assert first.seq_ids == second.seq_ids == [0]
    assert sched.abort(c) and not sched.abort(c)  # waiting: it just leaves the queue
    assert sched.abort(a)  # running, two plans in flight
    assert blocks.num_free() == 64 and list(sched.waiting) == [b]
    assert sched.on_result(answer(first)) == [] and a.output_ids == []  # its tokens are dropped
    assert sched.on_result(answer(second)) == []
    nxt = sched.schedule(0)
    assert nxt.seq_ids == [1] and sorted(nxt.release) == [0, 2] and 1 in nxt.new_seqs
    assert blocks.num_free() == 64 - blocks.blocks_for(b.max_len)
    assert sched.states().keys() == {1}


def test_a_replay_after_an_abort_sends_the_aborted_rows_to_scratch():
    sched = Scheduler(SchedulerConfig(), BlockManager(64, 8), 1, frozenset({EOS}))
    a, b = Sequence(0, request(0, max_new=9, ignore_eos=True)), Sequence(1, request(1, max_new=9, ignore_eos=True))
    sched.add(a), sched.add(b)
    for _ in range(3):
        (plan,) = sched.schedule_all()
        sched.on_result(answer(plan))
    sched.abort(a)
    live = set(sched.states())
    replayed = [for_replay(p, "s0", live) for p in sched.history[0]]
    assert live == {1} and all(p.scratch_seqs == [0] for p in replayed)


def disagg(token_blocks: int = 64) -> DisaggDriver:
    cfg = SchedulerConfig(max_batch_size=2)
    tb = BlockManager(token_blocks, 8)
    prefill = PrefillScheduler(cfg, BlockManager(32, 8), tb, 1, frozenset({EOS}))
    decode = Scheduler(cfg, tb, 1, frozenset({EOS}))
    members = [SimpleNamespace(name=n) for n in ("p0", "t0")]
    d = DisaggDriver(prefill, decode, (members[0],), (members[1],), lambda member, msg: d.sent.append(msg))
    d.sent = []
    return d


def test_disaggregated_abort_waiting_prefilling_and_decoding():
    d = disagg()
    seqs = [Sequence(i, request(i, max_new=10, ignore_eos=True)) for i in range(4)]
    for s in seqs:
        d.add(s)
    d.fill()
    (plan,) = d.sent  # seqs 0 and 1 are prefilled; 2 and 3 wait
    assert plan.seq_ids == [0, 1] and d.decode.blocks.num_free() == 64 - 4
    assert d.abort(seqs[2]) and seqs[2].cancelled  # waiting: out of the queue
    assert d.abort(seqs[0]) and not d.abort(seqs[0])  # its prefill is in flight: it ends now...
    assert d.decode.blocks.num_free() == 64 - 4  # ...and its token-side blocks wait for its KV
    done = d.on_message("p0", StepResult(0, plan.step, [0, 1], [30, 31]))
    assert done == [] and seqs[0].output_ids == [] and seqs[1].output_ids == [31]
    assert d.on_message("t0", KVAck("t0", [0, 1], [100, 100])) == []
    assert d.decode.blocks.num_free() == 64 - 2 and 0 in d.decode._release  # 0's KV is in: freed, forgotten
    assert list(d.decode.waiting) == [seqs[1]]
    assert d.abort(seqs[1]) and d.decode.blocks.num_free() == 64 and not d.decode.has_work()
    assert d.counts() == (0, 1) and d.busy()  # seq 3 still waits for its prefill
    assert d.abort(seqs[3]) and not d.busy() and d.decode.blocks.num_free() == 64


def test_disaggregated_recovery_does_not_prefill_a_cancelled_request_again():
    d = disagg()
    seqs = [Sequence(i, request(i, max_new=10)) for i in range(2)]
    for s in seqs:
        d.add(s)
    d.fill()
    (plan,) = d.sent
    d.on_message("p0", StepResult(0, plan.step, [0, 1], [30, 31]))  # prefilled, KV not acknowledged
    assert d.abort(seqs[0])
    info = d.recover({"t0"})  # the token stage is replaced: unacknowledged prefills are redone...
    assert info.notes["prefills_redone"] == 1
    assert list(d.prefill.waiting) == [seqs[1]] and seqs[0].status is Status.FINISHED  # ...but not a cancelled one
    assert d.decode.blocks.num_free() == 64 - 2 and 0 in d.decode._release
