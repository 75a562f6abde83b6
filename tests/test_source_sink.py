"""The coordinator's seam for front-ends: a request source feeds the serving loop, an output sink hears
every token and every record, the journal answers what an earlier attempt finished. The loop itself
runs here in-process, with a driver that answers like a pipeline and a source that behaves like an
online front-end (requests at any time, from another thread, until it is closed)."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from dejavu_py.config import RunConfig, RuntimeConfig
from dejavu_py.coordinator.coordinator import Coordinator, Wake
from dejavu_py.coordinator.journal import Journal
from dejavu_py.coordinator.ledger import Ledger
from dejavu_py.coordinator.output import error_record, read_outputs
from dejavu_py.coordinator.request import Request
from dejavu_py.coordinator.sequence import Sequence, Status
from dejavu_py.coordinator.sink import JsonlSink, OutputSink
from dejavu_py.coordinator.source import FileSource, RequestSource
from dejavu_py.protocol.layout import build_layout
from dejavu_py.protocol.plan import StepResult
from dejavu_py.protocol.sampling import SamplingParams


def req(rid: str, line: int | None = None, arrival_s: float = 0.0, max_new: int = 3) -> Request:
    return Request(id=rid, input_ids=[5, 6], max_new_tokens=max_new, sampling=SamplingParams(seed=1),
                   arrival_s=arrival_s, line=line)


class RecordingSink:
    """What an online front-end would stream, in the order it is told."""

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.closed = False

    def on_tokens(self, request_id: str, token_ids) -> None:
        self.events.append(("tokens", request_id, list(token_ids)))

    def on_finish(self, record: dict) -> None:
        self.events.append(("finish", record["id"], record.get("output_ids", record.get("error"))))

    def close(self) -> None:
        self.closed = True


class OnlineSource:
    """Requests handed over at any time from another thread, until closed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: list[Request] = []
        self._closed = False
        self._wake = None

    def start(self, t0: float, wake) -> None:
        self._wake = wake

    def submit(self, r: Request) -> None:
        with self._lock:
            self._queue.append(r)
        self._wake()

    def close(self) -> None:
        self._closed = True
        self._wake()

    def poll(self, now: float) -> list[Request]:
        with self._lock:
            out, self._queue = self._queue, []
        return out

    def next_arrival(self) -> float | None:
        return None

    def exhausted(self) -> bool:
        with self._lock:
            return self._closed and not self._queue

    def expected(self) -> int | None:
        return None


class EchoDriver:
    """A one-stage 'pipeline' answering every running sequence's step at once: token 100, 101, ..."""

    def __init__(self, inbox, answer: bool = True) -> None:
        self.inbox, self.answer = inbox, answer
        self.running: dict[int, Sequence] = {}
        self.inflight: set[int] = set()
        self.step = 0

    def add(self, seq: Sequence) -> None:
        self.running[seq.seq_id] = seq

    def fill(self) -> None:
        for sid, seq in self.running.items():
            if sid not in self.inflight:
                self.inflight.add(sid)
                self.step += 1
                if self.answer:
                    result = StepResult(mb=0, step=self.step, seq_ids=[sid], token_ids=[100 + len(seq.output_ids)])
                    self.inbox.put(("s0", result))

    def busy(self) -> bool:
        return bool(self.running)

    def on_message(self, source: str, msg: StepResult) -> list[Sequence]:
        (sid,), (token,) = msg.seq_ids, msg.token_ids
        self.inflight.discard(sid)
        seq = self.running[sid]
        if seq.append(token, frozenset()):
            del self.running[sid]
            return [seq]
        return []


def coordinator(tmp_path: Path, sink: OutputSink, comm_timeout_s: float = 5.0, answer: bool = True) -> Coordinator:
    cfg = RunConfig(model=tmp_path / "no-model", prompts=tmp_path / "req.jsonl", run_dir=tmp_path / "run",
                    runtime=RuntimeConfig(comm_timeout_s=comm_timeout_s, progress=False))
    cfg.run_dir.mkdir()
    coord = Coordinator(cfg, build_layout(cfg, 4, 1), None, store=None)
    coord.journal = Journal(cfg.run_dir / "journal.jsonl", "job")
    coord.journal.start()
    coord.ledger = Ledger(coord.journal, sink, None)
    coord.driver = EchoDriver(coord.inbox, answer)
    return coord


def _protocol_methods(proto: type) -> set[str]:
    return {n for n in vars(proto) if not n.startswith("_")}


def test_file_source_and_jsonl_sink_implement_the_protocols():
    assert _protocol_methods(RequestSource) == {"start", "poll", "next_arrival", "exhausted", "expected"}
    assert _protocol_methods(OutputSink) == {"on_tokens", "on_finish", "close"}
    for impl, proto in ((FileSource, RequestSource), (JsonlSink, OutputSink)):
        for name in _protocol_methods(proto):
            assert callable(getattr(impl, name)), (impl, name)


# ---- the request file as a source ---------------------------------------------------------------------


def test_file_source_replays_arrivals_in_file_order_among_equals():
    src = FileSource([req("a", 1, 0.5), req("b", 2, 0.0), req("c", 3, 0.5), req("d", 4, 0.0)])
    assert src.expected() == 4 and not src.exhausted()
    with pytest.raises(RuntimeError, match="before start"):
        src.poll(0.0)
    src.start(100.0, lambda: None)
    assert src.next_arrival() == 100.0
    assert [r.id for r in src.poll(100.2)] == ["b", "d"]
    assert src.poll(100.3) == [] and src.next_arrival() == 100.5 and not src.exhausted()
    assert [r.id for r in src.poll(100.5)] == ["a", "c"]
    assert src.exhausted() and src.next_arrival() is None and src.poll(1e9) == []


# ---- the output file as a sink ------------------------------------------------------------------------


def test_jsonl_sink_writes_only_at_close_in_line_order(tmp_path):
    out = tmp_path / "out.jsonl"
    sink = JsonlSink(out)
    sink.on_tokens("b", [7, 8])
    sink.on_finish({"line": 2, "id": "b", "output_ids": [7, 8]})
    sink.on_finish(error_record(1, "a", "bad"))
    assert not out.exists()  # nothing per token or per record: the file is written once
    sink.close()
    assert [r["line"] for r in read_outputs(out)] == [1, 2]


# ---- ledger: journal answers, tokens told once, records ----------------------------------------------


def test_ledger_answers_from_the_journal_and_tells_new_tokens_once(tmp_path):
    path = tmp_path / "journal.jsonl"
    first = Journal(path, "job")
    first.start()
    first.finish({"line": 1, "id": "a", "output_ids": [1]})
    first.close()
    journal = Journal(path, "job")
    assert list(journal.finished) == ["a"] and journal.attempts == 1
    journal.start()
    sink = RecordingSink()
    ledger = Ledger(journal, sink, None)
    (seq,) = ledger.arrived([req("a", 1), req("b", 2, max_new=3)], t0=0.0)
    assert seq.request.id == "b" and seq.seq_id == 0 and ledger.tally.resumed == 1
    seq.append(100, frozenset())
    ledger.tokens([0], 1)
    ledger.tokens([0], 1)  # a result that changed nothing for it (a dropped plan's)
    seq.restart()  # generated again from its prompt: the same tokens, not told twice
    seq.append(100, frozenset())
    seq.append(101, frozenset())
    ledger.tokens([0], 1)
    assert seq.append(102, frozenset())  # its last by length
    ledger.tokens([0], 1)
    ledger.finished([seq])
    assert sink.events == [("finish", "a", [1]), ("tokens", "b", [100]), ("tokens", "b", [101]),
                           ("tokens", "b", [102]), ("finish", "b", [100, 101, 102])]
    assert ledger.tally.records == 2 and ledger.tally.served == 1 and ledger.tally.failed == 0
    journal.close()
    entries = [json.loads(x) for x in path.read_text().splitlines()]
    assert {"type": "accepted", "ids": ["b"]} in entries
    assert set(Journal(path, "job").finished) == {"a", "b"}


def test_ledger_abandon_answers_every_unfinished_request(tmp_path):
    journal = Journal(tmp_path / "journal.jsonl", "job")
    sink = RecordingSink()
    ledger = Ledger(journal, sink, None)
    done, running = ledger.arrived([req("a", 1, max_new=1), req("b", 2)], t0=0.0)
    done.append(100, frozenset())
    ledger.finished([done])
    ledger.abandon([req("c", 3, arrival_s=9.0)], t0=0.0, why="lost s1")
    assert sink.events[-2:] == [("finish", "b", "not finished: lost s1"), ("finish", "c", "not finished: lost s1")]
    assert ledger.tally.failed == 2 and set(journal.finished) == {"a"}  # errors are redone by a rerun
    assert running.status is not Status.FINISHED


# ---- the serving loop -----------------------------------------------------------------------------------


def test_loop_serves_an_online_source_until_it_closes(tmp_path):
    """Requests come one at a time, with idle gaps longer than --comm-timeout (nothing in flight is no
    silence), each one woken up by the source; the loop ends when the source closes."""
    sink = RecordingSink()
    coord = coordinator(tmp_path, sink, comm_timeout_s=0.3)
    source = OnlineSource()

    def client() -> None:
        for rid in ("a", "b"):
            time.sleep(0.5)
            source.submit(req(rid, max_new=2))
            deadline = time.monotonic() + 5
            while ("finish", rid, [100, 101]) not in sink.events and time.monotonic() < deadline:
                time.sleep(0.01)
        time.sleep(0.5)
        source.close()

    source.start(time.monotonic(), lambda: coord.inbox.put((None, Wake())))  # what Coordinator.run gives
    thread = threading.Thread(target=client)
    thread.start()
    coord._serve(source, time.monotonic())
    thread.join()
    assert sink.events == [("tokens", "a", [100]), ("tokens", "a", [101]), ("finish", "a", [100, 101]),
                           ("tokens", "b", [100]), ("tokens", "b", [101]), ("finish", "b", [100, 101])]
    assert json.loads((coord.cfg.run_dir / "progress.json").read_text())["requests_done"] == 2
    coord.close()


def test_loop_fails_when_stages_are_silent_with_work_in_flight(tmp_path):
    coord = coordinator(tmp_path, RecordingSink(), comm_timeout_s=0.3, answer=False)
    source = FileSource([req("a", 1)])
    t0 = time.monotonic()
    source.start(t0, lambda: None)
    with pytest.raises(TimeoutError, match="no message from any stage"):
        coord._serve(source, t0)
    assert 0.25 < time.monotonic() - t0 < 3
    coord.close()


def test_loop_ends_at_once_when_every_request_was_answered_from_the_journal(tmp_path):
    sink = RecordingSink()
    coord = coordinator(tmp_path, sink, comm_timeout_s=5.0)
    coord.journal.finished["a"] = {"line": 1, "id": "a", "output_ids": [9]}
    source = FileSource([req("a", 1)])
    t0 = time.monotonic()
    source.start(t0, lambda: None)
    coord._serve(source, t0)
    assert time.monotonic() - t0 < 2  # no wait for a message that cannot come
    assert sink.events == [("finish", "a", [9])] and coord.ledger.tally.resumed == 1
    coord.close()
