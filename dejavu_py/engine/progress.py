"""Progress on long runs: a one-line bar on a terminal, and the end-of-run summary."""
from __future__ import annotations

import statistics
import sys
import time
from dataclasses import asdict, dataclass


class ProgressBar:
    """``[#####.....] 12/40 requests | 1,234 tokens | 56.7 tok/s`` redrawn in place on stderr."""

    def __init__(self, total: int, enabled: bool, min_interval_s: float = 0.2) -> None:
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
        width = 30
        fill = int(width * done / max(self.total, 1))
        sys.stderr.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {done}/{self.total} requests | {tokens:,} tokens | {rate:,.1f} tok/s ")
        sys.stderr.flush()

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


class LoopTimes:
    """Where a serving loop's time goes, per step: blocked waiting for its next message (``idle``), and
    named phases of its own work. Medians over steps, so that one-time costs (the first prefill, the
    replica's first mapping, the stop) do not hide what every step pays. Shows whether the device or the
    host paces a run."""

    def __init__(self) -> None:
        self.steps = 0
        self._now: dict[str, float] = {}
        self._per_step: list[dict[str, float]] = []
        self._t = time.perf_counter()

    def mark(self, phase: str) -> None:
        """Charge the time since the last mark to ``phase`` (of the step under way)."""
        now = time.perf_counter()
        self.add(phase, now - self._t)
        self._t = now

    def add(self, phase: str, seconds: float) -> None:
        self._now[phase] = self._now.get(phase, 0.0) + seconds

    def end_step(self) -> None:
        """The step under way is complete: what was charged since the last one is its cost."""
        self.steps += 1
        self._per_step.append(self._now)
        self._now = {}

    def step_ms(self) -> list[float]:
        """Each step's whole time (its phases together), in order: where a run's slow steps are."""
        return [round(1e3 * sum(d.values()), 3) for d in self._per_step]

    def per_step_ms(self) -> dict:
        """Median ms per step of each phase (``<phase>_ms``), and the means (``mean``: a phase that is
        cheap in most steps and long in a few shows there)."""
        phases = sorted({k for d in self._per_step for k in d})
        avg = lambda f, k: round(1e3 * f([d.get(k, 0.0) for d in self._per_step]), 4)  # noqa: E731
        return {"steps": self.steps, **{f"{k}_ms": avg(statistics.median, k) for k in phases},
                "mean": {f"{k}_ms": avg(statistics.fmean, k) for k in phases}}
