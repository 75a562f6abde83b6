"""Progress on long runs: the tally of answers, a one-line bar on a terminal (a log line every few
seconds otherwise), and the end-of-run summary with its latency percentiles."""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from dejavu_py import log

_log = log.get(__name__)

PERCENTILES = (50, 90, 99)
"""The percentiles of TTFT and TPOT the summary gives, next to their mean."""


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ascending values, interpolated linearly between the two
    nearest ranks (numpy's default), so that p50 of an even count is the mean of the middle two."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def latency_stats(values: Sequence[float]) -> dict[str, float | int | None]:
    """``{"count", "mean", "p50", "p90", "p99"}`` of ``values`` in seconds (None but count without values:
    e.g. no request generated 2 tokens, so no TPOT)."""
    xs = sorted(values)
    stats: dict[str, float | int | None] = {"count": len(xs), "mean": sum(xs) / len(xs) if xs else None}
    for q in PERCENTILES:
        stats[f"p{q}"] = percentile(xs, q) if xs else None
    return stats


def ttft_s(record: dict[str, Any]) -> float | None:
    """Time to first token of a success record: its first_token_s (None for an error record)."""
    timings = record.get("timings")
    return None if "error" in record or not timings else float(timings["first_token_s"])


def tpot_s(record: dict[str, Any]) -> float | None:
    """Time per output token after the first: (total_s - first_token_s) / (output tokens - 1); None for
    an error or a record of fewer than 2 output tokens (no gap between tokens to time)."""
    timings, ids = record.get("timings"), record.get("output_ids") or []
    if "error" in record or not timings or len(ids) < 2:
        return None
    return max(float(timings["total_s"]) - float(timings["first_token_s"]), 0.0) / (len(ids) - 1)


@dataclass
class Tally:
    """What the serving loop has answered so far: progress.json, the bar and the summary read it."""

    records: int = 0
    """Output records told to the sink: successes and errors, bad lines and journal answers included."""
    failed: int = 0
    """Those of them that are errors."""
    served: int = 0
    """Requests this attempt's pipeline finished."""
    resumed: int = 0
    """Requests answered from an earlier attempt's journal."""
    tokens: int = 0
    """Tokens this attempt's step results brought."""
    ttft: list[float] = field(default_factory=list)
    """Time to first token of each success record, in seconds."""
    tpot: list[float] = field(default_factory=list)
    """Time per output token of each success record of 2 tokens or more, in seconds."""

    def count(self, record: dict[str, Any]) -> None:
        self.records += 1
        self.failed += "error" in record
        for samples, value in ((self.ttft, ttft_s(record)), (self.tpot, tpot_s(record))):
            if value is not None:
                samples.append(value)


class ProgressBar:
    """``[#####.....] 12/40 requests | 1,234 tokens | 56.7 tok/s`` redrawn in place on stderr when it is a
    terminal (without the bar and the total when the number of requests is not known in advance).
    Otherwise, where a bar would only litter a pipe or a file, an INFO line every ``interval_s``:
    ``progress: 120/400 requests, 15,360 tokens, 1,234 tok/s, 2 recoveries``."""

    def __init__(self, total: int | None, enabled: bool, interval_s: float = 10.0, min_interval_s: float = 0.2,
                 clock: Callable[[], float] = time.monotonic, terminal: bool | None = None) -> None:
        self.total = total
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.enabled = enabled
        self._clock = clock
        self.t0 = clock()
        self._last = self.t0 if not self.terminal else 0.0  # a log line after interval_s, not at once
        self._min = min_interval_s if self.terminal else interval_s

    def update(self, done: int, tokens: int, recoveries: int = 0, force: bool = False) -> None:
        if not self.enabled:
            return
        now = self._clock()
        if not force and now - self._last < self._min:
            return
        self._last = now
        rate = tokens / max(now - self.t0, 1e-9)
        if self.terminal:
            log.draw_bar(f"{self._count(done)} requests | {tokens:,} tokens | {rate:,.1f} tok/s ")
        else:
            _log.info("progress: %s requests, %s tokens, %s tok/s, %d recover%s", self._done(done), f"{tokens:,}",
                      f"{rate:,.0f}", recoveries, "y" if recoveries == 1 else "ies")

    def _done(self, done: int) -> str:
        return str(done) if self.total is None else f"{done}/{self.total}"

    def _count(self, done: int, width: int = 30) -> str:
        if self.total is None:
            return str(done)
        fill = int(width * done / max(self.total, 1))
        return f"[{'#' * fill}{'.' * (width - fill)}] {done}/{self.total}"

    def close(self, done: int, tokens: int) -> None:
        """The bar's last state on its own line (no closing log line: the summary line follows)."""
        if self.enabled and self.terminal:
            self.update(done, tokens, force=True)
            log.end_bar()


@dataclass
class RunSummary:
    """What a run did, written to RUN_DIR/summary.json and printed as one line."""

    requests: int
    completed: int
    failed: int
    prompt_tokens: int
    generated_tokens: int
    wall_s: float
    generate_s: float
    stages: int
    ttft_s: dict[str, float | int | None] = field(default_factory=lambda: latency_stats([]))
    """Time to first token over the success records: count, mean, p50, p90, p99 (latency_stats)."""
    tpot_s: dict[str, float | int | None] = field(default_factory=lambda: latency_stats([]))
    """Time per output token after the first, over the success records of 2 tokens or more."""

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / max(self.generate_s, 1e-9)

    def line(self) -> str:
        return (
            f"done: {self.completed}/{self.requests} requests ({self.failed} failed), "
            f"{self.generated_tokens:,} tokens generated in {self.generate_s:.2f}s "
            f"({self.tokens_per_s:,.1f} tok/s), {self.stages} stages, wall {self.wall_s:.1f}s"
            f"{_latency_part('TTFT', self.ttft_s)}{_latency_part('TPOT', self.tpot_s)}"
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s}


def _latency_part(name: str, stats: dict[str, float | int | None]) -> str:
    """``, TTFT p50/p90/p99 12.3/45.6/78.9 ms (mean 20.1 ms)`` for the summary line; empty without samples."""
    if not stats.get("count"):
        return ""
    qs = "/".join(f"p{q}" for q in PERCENTILES)
    vals = "/".join(f"{1e3 * stats[f'p{q}']:,.1f}" for q in PERCENTILES)  # type: ignore[operator]
    return f", {name} {qs} {vals} ms (mean {1e3 * stats['mean']:,.1f} ms)"  # type: ignore[operator]
