"""The run's progress and summary: latency percentiles from output records, the progress log line when
stderr is not a terminal, and the console handler keeping log records off the bar's line."""
from __future__ import annotations

import io
import json
import logging
import sys

import pytest

from dejavu_py import log
from dejavu_py.coordinator.progress import (
    ProgressBar,
    RunSummary,
    Tally,
    latency_stats,
    percentile,
    tpot_s,
    ttft_s,
)


def _record(first: float, total: float, n_out: int) -> dict:
    return {"line": 1, "id": "q", "output_ids": list(range(n_out)), "finish_reason": "length",
            "num_prompt_tokens": 3, "timings": {"queued_s": 0.0, "first_token_s": first, "total_s": total}}


def test_percentile_interpolates_between_ranks() -> None:
    xs = [1.0, 2.0, 3.0, 4.0]
    assert percentile(xs, 0) == 1.0
    assert percentile(xs, 50) == pytest.approx(2.5)
    assert percentile(xs, 100) == 4.0
    assert percentile(list(map(float, range(101))), 90) == pytest.approx(90.0)
    assert percentile(list(map(float, range(101))), 99) == pytest.approx(99.0)
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_ttft_and_tpot_of_a_record() -> None:
    assert ttft_s(_record(0.2, 1.2, 11)) == pytest.approx(0.2)
    assert tpot_s(_record(0.2, 1.2, 11)) == pytest.approx(0.1)
    assert ttft_s(_record(0.3, 0.3, 1)) == pytest.approx(0.3)
    assert tpot_s(_record(0.3, 0.3, 1)) is None  # one token: no gap to time
    err = {"line": 2, "id": "e", "error": "bad request"}
    assert ttft_s(err) is None and tpot_s(err) is None


def test_tally_collects_latencies_and_summary_reports_them() -> None:
    tally = Tally()
    firsts = [0.1 * (i + 1) for i in range(10)]  # 0.1 .. 1.0 s
    for f in firsts:
        tally.count(_record(f, f + 0.9, 10))  # 9 gaps of 0.1 s
    tally.count(_record(0.05, 0.05, 1))  # TTFT only
    tally.count({"line": 12, "id": "e", "error": "bad"})  # neither
    assert tally.records == 12 and tally.failed == 1
    ttft, tpot = latency_stats(tally.ttft), latency_stats(tally.tpot)
    assert ttft["count"] == 11 and tpot["count"] == 10
    assert ttft["p50"] == pytest.approx(0.5)
    assert ttft["mean"] == pytest.approx((sum(firsts) + 0.05) / 11)
    assert ttft["p90"] == pytest.approx(0.9) and ttft["p99"] == pytest.approx(0.99)
    assert tpot["p50"] == pytest.approx(0.1) and tpot["p99"] == pytest.approx(0.1) and tpot["mean"] == pytest.approx(0.1)

    s = RunSummary(requests=12, completed=11, failed=1, prompt_tokens=36, generated_tokens=101, wall_s=3.0,
                   generate_s=2.0, stages=2, ttft_s=ttft, tpot_s=tpot)
    doc = json.loads(json.dumps(s.to_dict()))
    for key in ("requests", "completed", "failed", "prompt_tokens", "generated_tokens", "wall_s", "generate_s",
                "stages", "tokens_per_s"):  # the keys readers had before the latencies came
        assert key in doc
    assert doc["ttft_s"]["p50"] == pytest.approx(0.5) and doc["tpot_s"]["p90"] == pytest.approx(0.1)
    assert set(doc["ttft_s"]) == {"count", "mean", "p50", "p90", "p99"}
    line = s.line()
    assert "TTFT p50/p90/p99 500.0/900.0/990.0 ms" in line
    assert "TPOT p50/p90/p99 100.0/100.0/100.0 ms (mean 100.0 ms)" in line


def test_summary_without_samples_has_null_latencies() -> None:
    s = RunSummary(requests=1, completed=0, failed=1, prompt_tokens=0, generated_tokens=0, wall_s=1.0,
                   generate_s=0.5, stages=2)
    doc = s.to_dict()
    assert doc["ttft_s"] == {"count": 0, "mean": None, "p50": None, "p90": None, "p99": None}
    assert doc["tpot_s"]["count"] == 0
    assert "TTFT" not in s.line() and "TPOT" not in s.line()


class _Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def progress_logs(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch):
    """INFO records of the progress module, once each, whether or not log.setup ran in this process
    (it stops the package logger's propagation to the root logger that caplog listens on)."""
    monkeypatch.setattr(logging.getLogger("dejavu_py"), "propagate", True)
    caplog.set_level(logging.INFO, logger="dejavu_py.coordinator.progress")
    return caplog


def _progress_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress:")]


def test_progress_line_every_interval_when_not_a_terminal(progress_logs, capsys) -> None:
    clock = _Clock()
    bar = ProgressBar(400, True, interval_s=10.0, clock=clock, terminal=False)
    bar.update(10, 1_000, 0)
    clock.t += 5.0
    bar.update(60, 6_000, 0)
    assert _progress_lines(progress_logs) == []  # not before the first interval is over
    clock.t += 5.0
    bar.update(120, 15_360, 2)
    assert _progress_lines(progress_logs) == ["progress: 120/400 requests, 15,360 tokens, 1,536 tok/s, 2 recoveries"]
    clock.t += 3.0
    bar.update(130, 16_000, 2)
    assert len(_progress_lines(progress_logs)) == 1  # 3 s after the last line: too soon
    clock.t += 7.0
    bar.update(140, 20_000, 1)
    assert _progress_lines(progress_logs)[-1] == "progress: 140/400 requests, 20,000 tokens, 1,000 tok/s, 1 recovery"
    bar.close(140, 20_000)
    assert len(_progress_lines(progress_logs)) == 2  # the summary line follows: no extra line at the end
    assert "\r" not in capsys.readouterr().err  # no bar drawn into a pipe or a file


def test_progress_line_without_a_known_total(progress_logs) -> None:
    clock = _Clock()
    bar = ProgressBar(None, True, interval_s=1.0, clock=clock, terminal=False)
    clock.t += 2.0
    bar.update(7, 300, 0)
    assert _progress_lines(progress_logs) == ["progress: 7 requests, 300 tokens, 150 tok/s, 0 recoveries"]


def test_no_progress_line_when_disabled_or_on_a_terminal(progress_logs, monkeypatch) -> None:
    monkeypatch.setattr("sys.stderr", io.StringIO())
    clock = _Clock()
    off = ProgressBar(10, False, interval_s=1.0, clock=clock, terminal=False)
    tty = ProgressBar(10, True, interval_s=1.0, clock=clock, terminal=True)
    clock.t += 5.0
    off.update(1, 10, 0)
    tty.update(1, 10, 0)
    assert _progress_lines(progress_logs) == []
    assert "1/10 requests" in sys.stderr.getvalue()  # the terminal gets the bar instead
    tty.close(1, 10)


def _console(stream: io.StringIO) -> logging.Logger:
    logger = logging.getLogger("test_progress.console")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    for h in list(logger.handlers):
        logger.removeHandler(h)
    handler = log.ConsoleHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    return logger


def test_console_record_clears_the_bar_line_first() -> None:
    stream = io.StringIO()
    logger = _console(stream)
    log.draw_bar("[###...] 3/9 requests", stream)
    logger.info("stage t1 lost")
    assert stream.getvalue() == "\r\033[K[###...] 3/9 requests\r\033[Kstage t1 lost\n"
    logger.info("recovered")  # the bar is not on the line any more: nothing to clear
    assert stream.getvalue().endswith("stage t1 lost\nrecovered\n")
    log.draw_bar("[####..] 4/9 requests", stream)  # redrawn on its next update, on a line of its own
    log.end_bar()
    logger.info("done")
    assert stream.getvalue().endswith("recovered\n\r\033[K[####..] 4/9 requests\ndone\n")


def test_console_record_leaves_a_bar_on_another_stream_alone() -> None:
    bar_stream, log_stream = io.StringIO(), io.StringIO()
    logger = _console(log_stream)
    log.draw_bar("bar", bar_stream)
    logger.info("elsewhere")
    assert log_stream.getvalue() == "elsewhere\n"
    log.end_bar()
    assert bar_stream.getvalue() == "\r\033[Kbar\n"


def test_setup_puts_the_bar_aware_handler_on_the_console() -> None:
    root = logging.getLogger("dejavu_py")
    saved = (list(root.handlers), root.propagate, root.level)
    try:
        log.setup("INFO", None, console_level="INFO")
        assert any(isinstance(h, log.ConsoleHandler) for h in root.handlers)
    finally:  # leave the package logger as later tests of this process expect it
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved[0]:
            root.addHandler(h)
        root.propagate, root.level = saved[1], saved[2]
