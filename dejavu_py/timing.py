"""Where a process's loop spends its time, per step: the coordinator's and every stage's, in summary.json."""
from __future__ import annotations

import statistics
import time


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
