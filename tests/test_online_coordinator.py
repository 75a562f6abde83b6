"""The coordinator's side of online serving, in this process: front-ends submit and cancel over the
local link, tokens stream back in order with their indexes, a cancellation frees what its request held,
the engine's state reaches every front-end, and rank 0's front-end process and signals. The real serving
loop and scheduler run here, with a stand-in stage answering plans at its own pace (tests/online_harness.py).
"""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from e2e import ROOT
from online_harness import (
    EOS,
    VOCAB,
    Client,
    PacedStage,
    expected,
    heard_tokens,
    token_at,
)

from dejavu_py.config import (
    CacheConfig,
    RunConfig,
    RuntimeConfig,
    SchedulerConfig,
    ServeConfig,
)
from dejavu_py.coordinator.block_manager import BlockManager
from dejavu_py.coordinator.colocated import ColocatedDriver
from dejavu_py.coordinator.coordinator import Coordinator, Wake
from dejavu_py.coordinator.engine_state import cause_of, recovery_counters
from dejavu_py.coordinator.journal import Journal
from dejavu_py.coordinator.ledger import Ledger
from dejavu_py.coordinator.online import OnlineService
from dejavu_py.coordinator.scheduler import Scheduler
from dejavu_py.protocol.layout import build_layout
from dejavu_py.protocol.serving import (
    Cancel,
    EngineState,
    Finished,
    ServerInfo,
    Submit,
    Tokens,
)
from dejavu_py.runtime.rank import OnlineFrontEnd


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


def test_a_server_keeps_only_its_latest_steps_and_progress_samples(served):
    """Memory stays bounded however long it serves: the loop's times and the timeline keep ``history``
    entries; the step count and the means still cover every step."""
    s = served(pace_s=0.01, history=3).start()
    c = Client(s.service.address)
    c.send(submit("a", max_tokens=40, ignore_eos=True))
    assert c.finished("a").record["output_ids"] == expected(3, 40, ignore_eos=True)
    s.service.source.close()
    s.thread.join(timeout=10)
    times = s.coord.loop_times
    assert times.steps >= 40 and times.kept == 3 and len(times.step_ms()) == 3
    assert times.per_step_ms()["steps"] == times.steps
    assert len(s.coord.timeline) == 3 and s.coord.timeline[-1][1] == 40  # the latest: every token counted
    s.stop()


def test_a_front_end_that_connects_again_gets_its_streams_from_the_first_token(served):
    """It submits its open requests again (same ids): nothing is served twice, and a request that ended
    meanwhile is answered too. (An end sent while the coordinator had not yet seen its link go would be
    served again: the front-end resubmits what it never heard.)"""
    s = served(pace_s=0.01).start()
    c = Client(s.service.address)
    c.send(submit("long", max_tokens=60, ignore_eos=True))
    c.send(submit("short", max_tokens=20, ignore_eos=True))
    c.until(lambda m: isinstance(m, Tokens))
    c.link.close()  # cancels nothing
    wait_until(lambda: not s.service.fronts.links)  # the coordinator saw it go...
    assert "short" in s.coord.ledger.by_id
    wait_until(lambda: "short" not in s.coord.ledger.by_id)  # ...before "short" ended, with no link to go to
    again = Client(s.service.address)
    assert isinstance(again.until(lambda m: True), ServerInfo)
    time.sleep(0.1)
    again.drain()
    assert not again.streamed("long") and not any(isinstance(m, Finished) for m in again.log)  # unclaimed
    again.send(submit("long", max_tokens=60, ignore_eos=True))
    again.send(submit("short", max_tokens=20, ignore_eos=True))
    for rid, n in (("long", 60), ("short", 20)):
        end = again.finished(rid).record
        assert heard_tokens(again, rid) == end["output_ids"] == expected(3, n, ignore_eos=True)
    assert s.coord.ledger.tally.served == 2  # each was served once
    s.stop()


def wait_until(cond, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "not in time"
        time.sleep(0.005)


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
