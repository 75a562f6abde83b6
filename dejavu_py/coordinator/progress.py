"""Progress on long runs: the tally of answers, a one-line bar on a terminal, and the end-of-run summary."""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from typing import Any


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

    def count(self, record: dict[str, Any]) -> None:
        self.records += 1
        self.failed += "error" in record


class ProgressBar:
    """``[#####.....] 12/40 requests | 1,234 tokens | 56.7 tok/s`` redrawn in place on stderr (without
    the bar and the total when the number of requests is not known in advance)."""

    def __init__(self, total: int | None, enabled: bool, min_interval_s: float = 0.2) -> None:
        self.total = total
        self.enabled = enabled and sys.stderr.isatty()
        self.t0 = time.monotonic()
        self._last = 0.0
        self._min = min_interval_s

    def update(self, done: int, tokens: int, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < self._min:
            return
        self._last = now
        rate = tokens / max(now - self.t0, 1e-9)
        sys.stderr.write(f"\r{self._count(done)} requests | {tokens:,} tokens | {rate:,.1f} tok/s ")
        sys.stderr.flush()

    def _count(self, done: int, width: int = 30) -> str:
        if self.total is None:
            return str(done)
        fill = int(width * done / max(self.total, 1))
        return f"[{'#' * fill}{'.' * (width - fill)}] {done}/{self.total}"

    def close(self, done: int, tokens: int) -> None:
        if self.enabled:
            self.update(done, tokens, force=True)
            sys.stderr.write("\n")
            sys.stderr.flush()


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

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / max(self.generate_s, 1e-9)

    def line(self) -> str:
        return (
            f"done: {self.completed}/{self.requests} requests ({self.failed} failed), "
            f"{self.generated_tokens:,} tokens generated in {self.generate_s:.2f}s "
            f"({self.tokens_per_s:,.1f} tok/s), {self.stages} stages, wall {self.wall_s:.1f}s"
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s}
