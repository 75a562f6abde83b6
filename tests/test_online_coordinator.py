"""The coordinator's side of online serving: front-ends submit and cancel over the local link, tokens
stream back in order with their indexes, a cancellation frees what its request held, and the engine's
state reaches every front-end.

The first tests run the real serving loop, scheduler and link in this process, with a stand-in stage
that answers plans at its own pace; the schedulers' cancellation is tested on its own (colocated,
disaggregated, around a recovery); the last test serves from real stage processes and compares with
the batch command's outputs.
"""
from __future__ import annotations

import json
import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from e2e import ROOT, env, mixed_requests, run_pipeline, write_requests
from make_checkpoint import make_checkpoint

from dejavu_py.comm.local_link import Link, LinkAddress, connect
from dejavu_py.comm.store import free_port
from dejavu_py.config import (
    CacheConfig,
    GenerationConfig,
    PipelineConfig,
    RunConfig,
    RuntimeConfig,
    SchedulerConfig,
    ServeConfig,
)
from dejavu_py.coordinator.block_manager import BlockManager
from dejavu_py.coordinator.colocated import ColocatedDriver
from dejavu_py.coordinator.coordinator import Coordinator, Wake
from dejavu_py.coordinator.disagg import DisaggDriver
from dejavu_py.coordinator.engine_state import cause_of, recovery_counters
from dejavu_py.coordinator.journal import Journal
from dejavu_py.coordinator.ledger import Ledger
from dejavu_py.coordinator.online import OnlineService
from dejavu_py.coordinator.prefill_scheduler import PrefillScheduler
from dejavu_py.coordinator.replay import for_replay
from dejavu_py.coordinator.request import Request
from dejavu_py.coordinator.scheduler import Scheduler
from dejavu_py.coordinator.sequence import Sequence, Status
from dejavu_py.protocol.layout import build_layout
from dejavu_py.protocol.plan import KVAck, StepPlan, StepResult, Stop
from dejavu_py.protocol.sampling import SamplingParams
from dejavu_py.protocol.serving import Cancel, EngineState, Finished, ServerInfo, Submit, Tokens
from dejavu_py.runtime.rank import OnlineFrontEnd

EOS = 2
VOCAB = 64


def token_at(pos: int) -> int:
    """The stand-in model: the token sampled at position ``pos`` (end-of-sequence every 5th one)."""
    return EOS if pos % 5 == 4 else 10 + pos % 40


class PacedStage:
    """A one-stage pipeline answering each plan after ``pace_s``, in order, on a thread of its own."""

    def __init__(self, inbox: queue.Queue, pace_s: float = 0.01) -> None:
        self.inbox, self.pace_s = inbox, pace_s
        self.plans: list[StepPlan] = []
        self._todo: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, daemon=True).start()

    def send(self, member: str, msg: object) -> None:
        self._todo.put(msg)

    def _run(self) -> None:
        while True:
            msg = self._todo.get()
            if isinstance(msg, Stop):
                self.inbox.put(("s0", msg))
                continue
            time.sleep(self.pace_s)
            self.plans.append(msg)
            tokens = [token_at(start + n) for start, n in zip(msg.start_pos, msg.num_tokens)]
            self.inbox.put(("s0", StepResult(msg.mb, msg.step, list(msg.seq_ids), tokens)))


class Client:
    """A front-end: everything it hears, in order."""

    def __init__(self, address) -> None:
        self.link: Link = connect(address, timeout_s=10)
        self.heard: queue.Queue = queue.Queue()
        self.log: list = []
        self._taken: set[int] = set()  # ends already returned by finished()
        self.link.start_reading(self.heard.put, lambda: None, "test-client")

    def send(self, msg) -> None:
        assert self.link.send(msg)

    def until(self, pred, timeout_s: float = 10.0):
        """Messages heard until one that ``pred`` accepts (returned)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                msg = self.heard.get(timeout=0.05)
            except queue.Empty:
                continue
            self.log.append(msg)
            if pred(msg):
                return msg
        raise AssertionError(f"not heard in {timeout_s}s; heard {self.log[-5:]}")

    def drain(self) -> None:
        """Into the log: everything heard so far."""
        while not self.heard.empty():
            self.log.append(self.heard.get())

    def finished(self, rid: str, timeout_s: float = 30.0) -> Finished:
        """The next end of ``rid`` not asked for before (heard already, or to come)."""
        match = lambda m: isinstance(m, Finished) and m.request_id == rid and id(m) not in self._taken  # noqa: E731
        end = next((m for m in self.log if match(m)), None) or self.until(match, timeout_s)
        self._taken.add(id(end))
        return end

    def streamed(self, rid: str) -> list[tuple[int, list[int]]]:
        """(index, tokens) of every Tokens item for ``rid`` heard so far."""
        return [(i, toks) for m in self.log if isinstance(m, Tokens) for r, i, toks in m.items if r == rid]


class Served:
    """The serving loop of a real Coordinator with a real scheduler, in a thread, over the paced stage."""

    def __init__(self, tmp_path: Path, pace_s: float = 0.01, **serve) -> None:
        cfg = RunConfig(model=tmp_path / "no-model", prompts=None, run_dir=tmp_path / "run",
                        cache=CacheConfig(capacity_tokens=512, block_size=8),
                        scheduler=SchedulerConfig(max_batch_size=4),
                        runtime=RuntimeConfig(comm_timeout_s=10, progress=False),
                        serve=ServeConfig(enabled=True, **serve))
        cfg.run_dir.mkdir()
        model_cfg = SimpleNamespace(vocab_size=VOCAB, max_position_embeddings=128, eos_token_ids=(EOS,))
        self.coord = coord = Coordinator(cfg, build_layout(cfg, 4, 1), model_cfg, store=None)
        self.service = OnlineService(coord)
        coord.journal = Journal(cfg.run_dir / "journal.jsonl", "job", requests=False)
        coord.ledger = Ledger(coord.journal, self.service.sink, None)
        self.stage = PacedStage(coord.inbox, pace_s)
        self.blocks = BlockManager(cfg.cache.num_blocks, cfg.cache.block_size)
        sched = Scheduler(cfg.scheduler, self.blocks, 1, frozenset({EOS}), coord.steps)
        coord.driver = ColocatedDriver(sched, coord.layout.decode_pipeline, self.stage.send)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def start(self) -> Served:
        t0 = time.monotonic()
        self.service.source.start(t0, lambda: self.coord.inbox.put((None, Wake())))
        self.coord._set_serving(True)
        self.thread.start()
        return self

    def _serve(self) -> None:
        try:
            self.coord._serve(self.service.source, time.monotonic())
        except BaseException as e:  # shown by stop()
            self.error = e

    def stop(self) -> None:
        self.service.source.close()
        self.thread.join(timeout=20)
        assert not self.thread.is_alive() and self.error is None, self.error
        self.service.sink.close()
        self.service.close()
        self.coord.close()


@pytest.fixture
def served(tmp_path):
    made: list[Served] = []

    def make(**kw) -> Served:
        made.append(Served(tmp_path, **kw))
        return made[-1]

    yield make
    for s in made:
        if s.thread.is_alive():
            s.stop()


def submit(rid: str, n_prompt: int = 3, max_tokens: int = 8, **kw) -> Submit:
    return Submit(rid, list(range(20, 20 + n_prompt)), max_tokens, **kw)


def expected(n_prompt: int, max_tokens: int, ignore_eos: bool = False) -> list[int]:
    out = []
    for pos in range(n_prompt, n_prompt + max_tokens):
        out.append(token_at(pos))
        if out[-1] == EOS and not ignore_eos:
            break
    return out


# ---- over the link, with the real serving loop ----------------------------------------------------


def test_tokens_stream_in_order_with_their_indexes_and_the_end_comes_last(served):
    s = served(pace_s=0.002).start()
    c = Client(s.service.address)
    info = c.until(lambda m: True)
    assert isinstance(info, ServerInfo)  # always the first message
    assert (info.vocab_size, info.max_model_len, info.eos_token_ids, info.model) == (VOCAB, 128, (EOS,), "no-model")
    assert info.max_prompt_tokens == 127 and info.default_max_tokens == 64
    c.send(submit("a", n_prompt=5, max_tokens=12))  # the model's eos at position 9: its 5th token
    c.send(submit("b", n_prompt=5, max_tokens=12, ignore_eos=True))  # goes on to its 12th
    c.send(submit("c", n_prompt=2, max_tokens=6, stop_token_ids=(token_at(3),)))  # its own stop: 2nd token
    c.send(Submit("d", (20, 21, 22), None, ignore_eos=True))  # no max_tokens: the run's default (64)
    wants = {"a": (expected(5, 12), "stop"), "b": (expected(5, 12, ignore_eos=True), "length"),
             "c": ([token_at(2), token_at(3)], "stop"), "d": (expected(3, 64, ignore_eos=True), "length")}
    assert len(wants["a"][0]) == 5 and len(wants["b"][0]) == 12
    for rid, (want, reason) in wants.items():
        end = c.finished(rid)
        streamed = c.streamed(rid)
        assert [i for i, _ in streamed] == [sum(len(t) for _, t in streamed[:k]) for k in range(len(streamed))]
        assert [t for _, toks in streamed for t in toks] == want == end.record["output_ids"]
        assert end.record["finish_reason"] == reason and end.record["id"] == rid
        assert all(m.request_id != rid for m in c.log[c.log.index(end) + 1:] if isinstance(m, Finished))
        assert all(r != rid for m in c.log[c.log.index(end):] if isinstance(m, Tokens) for r, _, _ in m.items)
    s.stop()


def test_a_submit_over_the_limits_gets_an_error_and_is_never_scheduled(served):
    s = served(pace_s=0.002).start()
    c = Client(s.service.address)
    c.send(Submit("long", [5] * 128, 4))  # 128 prompt tokens: no room for one more
    assert "128 tokens" in c.finished("long").record["error"]
    c.send(Submit("vocab", [5, VOCAB], 4))
    assert "outside the vocabulary" in c.finished("vocab").record["error"]
    c.send(Submit("temp", [5], 4, temperature=-1.0))
    assert "temperature" in c.finished("temp").record["error"]
    c.send(Submit("odd", [5], 4, stop_token_ids=None))  # a malformed one is refused, the link stays
    assert "error" in c.finished("odd").record
    c.send(Cancel(["not", "an", "id"]))
    c.send("hello")
    c.send(submit("ok", max_tokens=200, ignore_eos=True))  # clamped to the model's length, like a file's line
    c.until(lambda m: isinstance(m, Tokens))
    other = Client(s.service.address)  # another live front-end, with the same id
    other.send(submit("ok", max_tokens=4))
    assert "being served already" in other.finished("ok").record["error"]
    end = c.finished("ok").record
    assert end["finish_reason"] == "length" and len(end["output_ids"]) == 128 - 3
    assert s.stage.plans and all(sid == 0 for p in s.stage.plans for sid in p.seq_ids)  # only "ok" ran
    s.stop()


def test_requests_beyond_max_waiting_are_refused_at_once(served):
    s = served(pace_s=0.01, max_waiting=2).start()  # a microbatch runs 4 at most, 2 more may wait
    c = Client(s.service.address)
    for i in range(10):  # all sent long before the first ends
        c.send(submit(f"r{i}", max_tokens=60, ignore_eos=True))
    ends = [c.finished(f"r{i}").record for i in range(10)]
    refused = [e for e in ends if "overloaded" in e.get("error", "")]
    assert 4 <= len(refused) <= 8 and all("--max-waiting" in e["error"] for e in refused)
    assert all(len(e["output_ids"]) == 60 for e in ends if e not in refused)
    s.stop()


def test_cancel_frees_the_blocks_and_ends_the_request_as_aborted(served):
    s = served(pace_s=0.02).start()
    total = s.blocks.num_free()
    c = Client(s.service.address)
    c.send(submit("x", n_prompt=3, max_tokens=60, ignore_eos=True))
    c.send(submit("y", n_prompt=3, max_tokens=60, ignore_eos=True))
    c.until(lambda m: isinstance(m, Tokens) and any(r == "x" for r, _, t in m.items))
    busy = c.until(lambda m: isinstance(m, EngineState) and m.running == 2)
    assert busy.serving and busy.counters["kv_blocks_used"] == 2 * 8 and busy.kv_usage > 0
    c.send(Cancel("x"))
    end = c.finished("x")
    told = [t for _, toks in c.streamed("x") for t in toks]
    assert end.record["finish_reason"] == "abort" and end.record["output_ids"] == told and 0 < len(told) < 60
    state = c.until(lambda m: isinstance(m, EngineState) and m.running == 1)
    assert state.counters["kv_blocks_used"] == 8 and s.blocks.num_free() == total - 8
    c.send(Cancel("y", reason="stop"))  # the front-end matched a stop string
    assert c.finished("y").record["finish_reason"] == "stop"
    c.until(lambda m: isinstance(m, EngineState) and m.running == 0 and m.counters["kv_blocks_used"] == 0)
    assert s.blocks.num_free() == total and not s.coord.driver.busy() and not s.coord.ledger.live
    s.stop()


def test_a_cancelled_request_leaves_the_plans_and_the_stages_are_told(served):
    s = served(pace_s=0.02).start()
    c = Client(s.service.address)
    c.send(submit("x", max_tokens=60, ignore_eos=True))
    c.send(submit("y", max_tokens=60, ignore_eos=True))
    c.until(lambda m: isinstance(m, Tokens) and any(r == "y" for r, _, t in m.items))
    c.send(Cancel("x"))
    c.finished("x")
    n = len(s.stage.plans)
    c.until(lambda m: isinstance(m, Tokens) and len(s.stage.plans) > n + 2)
    plans = list(s.stage.plans)
    told = [i for i, p in enumerate(plans) if 0 in p.release]
    assert len(told) == 1  # the stages forget x (seq 0) with the next plan...
    assert all(0 not in p.seq_ids for p in plans[told[0]:])  # ...and it runs no more
    assert all(1 in p.seq_ids for p in plans[told[0]:])  # while y goes on
    c.send(Cancel("x"))  # cancelling again, or an unknown id, changes nothing
    c.send(Cancel("nobody"))
    c.send(Cancel("y"))
    assert c.finished("y").record["finish_reason"] == "abort"
    s.stop()


def test_the_source_ends_on_close_refusing_new_requests_after_those_in_flight(served):
    s = served(pace_s=0.005).start()
    c = Client(s.service.address)
    c.send(submit("a", max_tokens=30, ignore_eos=True))
    c.until(lambda m: isinstance(m, Tokens))
    assert not s.service.source.exhausted()
    s.service.source.close()
    c.send(submit("late"))
    assert "shutting down" in c.finished("late").record["error"]
    assert c.finished("a").record["output_ids"] == expected(3, 30, ignore_eos=True)  # finished, not cut
    s.thread.join(timeout=10)
    assert not s.thread.is_alive() and s.service.source.exhausted()
    s.stop()


def heard_tokens(c: Client, rid: str) -> list[int]:
    """``rid``'s tokens by index, each index heard the same every time it came (a front-end's view)."""
    tokens: dict[int, int] = {}
    for i, toks in c.streamed(rid):
        for k, t in enumerate(toks):
            assert tokens.setdefault(i + k, t) == t
    assert sorted(tokens) == list(range(len(tokens)))
    return [tokens[i] for i in range(len(tokens))]


def test_a_front_end_that_connects_again_gets_its_streams_from_the_first_token(served):
    """It submits its open requests again (same ids): nothing is served twice, and a request that ended
    meanwhile is answered too."""
    s = served(pace_s=0.01).start()
    c = Client(s.service.address)
    c.send(submit("long", max_tokens=40, ignore_eos=True))
    c.send(submit("short", max_tokens=3, ignore_eos=True))
    c.until(lambda m: isinstance(m, Tokens))
    c.link.close()  # cancels nothing
    time.sleep(0.2)  # "short" ends meanwhile, with no link to go to
    again = Client(s.service.address)
    assert isinstance(again.until(lambda m: True), ServerInfo)
    time.sleep(0.1)
    again.drain()
    assert not again.streamed("long") and not any(isinstance(m, Finished) for m in again.log)  # unclaimed
    again.send(submit("long", max_tokens=40, ignore_eos=True))
    again.send(submit("short", max_tokens=3, ignore_eos=True))
    for rid, n in (("long", 40), ("short", 3)):
        end = again.finished(rid).record
        assert heard_tokens(again, rid) == end["output_ids"] == expected(3, n, ignore_eos=True)
    assert s.coord.ledger.tally.served == 2  # each was served once
    s.stop()


def test_engine_state_says_serving_at_once_and_counts_the_waiting(served):
    s = served(pace_s=0.05, state_interval_s=10.0)  # only changes are sent (and one per connection)
    c = Client(s.service.address)
    first = c.until(lambda m: isinstance(m, EngineState))
    assert not first.serving and first.counters["workers"] == {}
    s.start()
    assert c.until(lambda m: isinstance(m, EngineState)).serving
    s.coord._set_serving(False)  # the run failed
    assert not c.until(lambda m: isinstance(m, EngineState)).serving
    s.stop()


def test_recovery_counters_by_cause_and_kind():
    records = [{"cause": "s1 killed by SIGKILL", "recovered_s": 1.5, "phases": {"load_s": 1.0}, "takeover": False,
                "tokens_recomputed": 10},
               {"cause": "s0 hung (no heartbeat for 5.2s)", "recovered_s": 0.5, "phases": {"load_s": 0.0},
                "takeover": True, "replica_bytes": 4096},
               {"cause": "s2 lost its connection (reset)", "recovered_s": 2.0, "phases": {"replay_s": 0.1}}]
    c = recovery_counters(records)
    assert c["recoveries_total"] == {("crash", "cold"): 1, ("hang", "standby"): 1, ("connection", "cold"): 1}
    assert c["recovery_seconds"] == [1.5, 0.5, 2.0] and c["recovery_phase_seconds"] == {"replay_s": 0.1}
    assert c["tokens_recomputed_total"] == 10 and c["replica_bytes_total"] == 4096
    assert recovery_counters([])["recovery_seconds"] == [] and cause_of("s1 exited with code 1") == "crash"


# ---- the front-end process -------------------------------------------------------------------------


def test_a_front_end_process_that_dies_ends_serving_with_an_error(served):
    s = served(frontend_module="json.tool")  # not a front-end: it exits at once on the arguments
    fe = OnlineFrontEnd(s.coord)
    try:
        deadline = time.monotonic() + 20
        while not fe.failed and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fe.failed and fe.source.exhausted()
        assert fe.outcome(0) == 1 and fe.outcome(3) == 3
        assert "usage: python -m json.tool" in (s.coord.cfg.logs_dir / "frontend.log").read_text()  # its complaint
    finally:
        fe.close()


def test_sigterm_stops_serving_and_the_front_end_is_stopped_last(served, monkeypatch, tmp_path):
    monkeypatch.setenv("PYTHONPATH", f"{ROOT / 'tests'}{os.pathsep}{ROOT}")
    monkeypatch.setenv("DEJAVU_TEST_RELAY_FILE", str(tmp_path / "relay.json"))
    s = served(frontend_module="online_relay")
    before = signal.getsignal(signal.SIGTERM)
    fe = OnlineFrontEnd(s.coord)
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / "relay.json").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fe.proc.poll() is None and not fe.source.exhausted()
        os.kill(os.getpid(), signal.SIGTERM)
        while not fe.source.exhausted() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fe.source.exhausted() and signal.getsignal(signal.SIGTERM) is before  # a 2nd acts as before
        assert fe.proc.poll() is None  # the front-end outlives serving, to deliver the last words
    finally:
        fe.close()
    assert fe.proc.returncode is not None and not fe.failed and fe.outcome(0) == 0


# ---- the schedulers' cancellation ---------------------------------------------------------------------


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


# ---- real stage processes ---------------------------------------------------------------------------


def serve_config(ckpt: Path, run_dir: Path, port: int) -> RunConfig:
    """configs/tiny-cpu.yaml's settings, serving online through the relay (tests/online_relay.py)."""
    return RunConfig(
        model=ckpt, prompts=None, run_dir=run_dir,
        pipeline=PipelineConfig(device="cpu", dtype="float32", threads=1),
        scheduler=SchedulerConfig(max_batch_size=4, max_batch_tokens=512),
        cache=CacheConfig(capacity_tokens=4096, block_size=8),
        generation=GenerationConfig(max_new_tokens=32),
        runtime=RuntimeConfig(comm_timeout_s=60, startup_timeout_s=120, progress=False),
        serve=ServeConfig(enabled=True, port=port, served_model_name="tiny", frontend_module="online_relay"),
    )


def start_serving(cfg: RunConfig, nproc: int) -> tuple[subprocess.Popen, Client]:
    """torchrun with tests/online_rank.py; the test's client connected through the relay."""
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "cfg.pkl").write_bytes(pickle.dumps(cfg))
    e = env()
    e["PYTHONPATH"] = f"{ROOT / 'tests'}{os.pathsep}{e['PYTHONPATH']}"
    e["DEJAVU_TEST_RELAY_FILE"] = str(cfg.run_dir / "relay.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--monitor-interval=0.1", str(ROOT / "tests/online_rank.py"), str(cfg.run_dir / "cfg.pkl")]
    console = open(cfg.run_dir / "console.txt", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=console, stderr=subprocess.STDOUT, start_new_session=True)
    relay = cfg.run_dir / "relay.json"
    deadline = time.monotonic() + 120
    while not relay.exists():
        assert proc.poll() is None and time.monotonic() < deadline, (cfg.run_dir / "console.txt").read_text()[-3000:]
        time.sleep(0.05)
    doc = json.loads(relay.read_text())
    assert doc["args"] == {"--link": doc["args"]["--link"], "--host": "127.0.0.1", "--port": str(cfg.serve.port),
                           "--checkpoint": str(cfg.model), "--max-waiting": "1024", "--log-level": "info",
                           "--served-model-name": "tiny"}
    return proc, Client(LinkAddress(doc["host"], doc["port"], doc["key"]))


def as_submit(r: dict) -> Submit:
    """A request file's line as a front-end submits it."""
    return Submit(r["id"], r["input_ids"], r["max_new_tokens"], r.get("temperature", 0.0), r.get("top_p", 1.0),
                  r.get("top_k", 0), r.get("seed"), tuple(r.get("stop_token_ids", ())), r.get("ignore_eos", False))


def stream_of(c: Client, rid: str, since: int = 0) -> list[int]:
    """The tokens of ``rid`` heard from log position ``since`` on, checked to come in order, each once."""
    out: list[int] = []
    for m in c.log[since:]:
        if isinstance(m, Tokens):
            for r, i, toks in m.items:
                if r == rid:
                    assert i == len(out), f"{rid}: tokens from {i}, {len(out)} heard"
                    out += toks
    return out


def test_serving_from_stage_processes_matches_the_batch_command(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ck", family="olmoe", seed=5)
    reqs = mixed_requests(5, 384, seed=61) + [{**r, "id": f"s{i}"} for i, r in
                                              enumerate(mixed_requests(4, 384, seed=62, sampled=True))]
    reqs[1]["ignore_eos"] = True
    reqs[2]["stop_token_ids"] = [7, 9]
    del reqs[6]["seed"]  # derived from the run's seed and its id, the same way by both
    batch = run_pipeline(ckpt, write_requests(tmp_path / "req.jsonl", reqs), tmp_path / "batch", 2)
    proc, c = start_serving(serve_config(ckpt, tmp_path / "serve", free_port()), 2)
    try:
        info = c.until(lambda m: True)
        assert isinstance(info, ServerInfo) and info.model == "tiny" and info.max_model_len == 256
        assert info.max_prompt_tokens == 255 and info.eos_token_ids == (2,) and info.default_max_tokens == 32
        c.until(lambda m: isinstance(m, EngineState) and m.serving, timeout_s=120)
        start = len(c.log)
        for r in reqs:
            c.send(as_submit(r))
        for r in reqs:  # the same tokens as the batch command's, streamed in order
            end = c.finished(r["id"]).record
            assert end["output_ids"] == batch[r["id"]]["output_ids"] == stream_of(c, r["id"], start), r["id"]
            assert end["finish_reason"] == batch[r["id"]]["finish_reason"]
            assert "text" in batch[r["id"]] and "text" not in end  # the front-end detokenizes

        start = len(c.log)  # again, with stage s1 killed while they stream: its replacement takes over
        for r in reqs:
            c.send(as_submit(r))
        c.until(lambda m: isinstance(m, Tokens))
        workers = json.loads((tmp_path / "serve" / "workers.json").read_text())["workers"]
        os.kill(next(w["pid"] for w in workers if w["name"] == "s1"), signal.SIGKILL)
        for r in reqs:
            end = c.finished(r["id"]).record
            assert end["output_ids"] == batch[r["id"]]["output_ids"] == stream_of(c, r["id"], start), r["id"]
        after = c.until(lambda m: isinstance(m, EngineState) and m.counters["recoveries_total"], timeout_s=60)
        assert after.counters["recoveries_total"] == {("crash", "cold"): 1} and after.serving
        (seconds,) = after.counters["recovery_seconds"]
        assert seconds > 0 and "replay_s" in after.counters["recovery_phase_seconds"]
        states = [m for m in c.log[start:] if isinstance(m, EngineState)]
        assert any(m.recovering for m in states) and all(m.serving for m in states)  # paused, never down

        c.send(Submit("too-long", [5] * 256, 4))
        assert "256 tokens" in c.finished("too-long").record["error"]

        c.send(Submit("cancel-me", [5, 6, 7], 200, ignore_eos=True))
        c.until(lambda m: isinstance(m, EngineState) and m.running == 1 and m.counters["kv_blocks_used"] > 0)
        c.send(Cancel("cancel-me"))
        end = c.finished("cancel-me").record
        assert end["finish_reason"] == "abort" and 0 < len(end["output_ids"]) < 200
        idle = c.until(lambda m: isinstance(m, EngineState) and m.running == 0)
        assert idle.counters["kv_blocks_used"] == 0 and idle.counters["workers"] == {"ready": 2}

        c.send(Submit("last", [5, 6, 7], 40, ignore_eos=True))  # in flight when rank 0 is told to stop
        c.until(lambda m: isinstance(m, Tokens) and any(r == "last" for r, _, _ in m.items))
        coordinator = json.loads((tmp_path / "serve" / "workers.json").read_text())["coordinator_pid"]
        os.kill(coordinator, signal.SIGTERM)
        assert len(c.finished("last").record["output_ids"]) == 40  # finished, not cut short
        assert proc.wait(timeout=60) == 0, (tmp_path / "serve" / "console.txt").read_text()[-3000:]
        journal = (tmp_path / "serve" / "journal.jsonl").read_text().splitlines()
        assert {json.loads(x)["type"] for x in journal} == {"start", "member_lost"}  # no request is journaled
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
