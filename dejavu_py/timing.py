"""Where a process's loop spends its time, per step: the coordinator's and every stage's, in summary.json."""
from __future__ import annotations

import collections
import statistics
import time


class LoopTimes:
    """Where a serving loop's time goes, per step: blocked waiting for its next message (``idle``), and
    named phases of its own work. Medians over steps, so that one-time costs (the first prefill, the
    replica's first mapping, the stop) do not hide what every step pays. Shows whether the device or the
    host paces a run.

    A batch run keeps every step (its files report them all); a server runs for days, so it keeps the
    latest ``keep`` steps for the medians and :meth:`step_ms`, and a running sum per phase for the means,
    which still cover every step: its memory stays bounded."""

    def __init__(self, keep: int | None = None) -> None:
        """``keep``: how many of the latest steps to keep; None: all."""
        if keep is not None and keep <= 0:
            raise ValueError(f"keep={keep}: must be a positive number of steps, or None to keep them all")
        self.steps = 0
        self._now: dict[str, float] = {}
        self._per_step: collections.deque[dict[str, float]] = collections.deque(maxlen=keep)
        self._sums: dict[str, float] = {}
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
        for k, v in self._now.items():
            self._sums[k] = self._sums.get(k, 0.0) + v
        self._now = {}

    @property
    def kept(self) -> int:
        """Steps whose times are kept (all of them unless ``keep`` was given)."""
        return len(self._per_step)

    def step_ms(self) -> list[float]:
        """Each kept step's whole time (its phases together), in order: where a run's slow steps are."""
        return [round(1e3 * sum(d.values()), 3) for d in self._per_step]

    def per_step_ms(self) -> dict:
        """Median ms per step of each phase (``<phase>_ms``, over the kept steps), and the means over
        every step (``mean``: a phase that is cheap in most steps and long in a few shows there)."""
        phases = sorted(self._sums)
        return {"steps": self.steps, **{f"{k}_ms": self._median_ms(k) for k in phases},
                "mean": {f"{k}_ms": self._mean_ms(k) for k in phases}}

    def _kept_of(self, phase: str) -> list[float]:
        return [d.get(phase, 0.0) for d in self._per_step]

    def _median_ms(self, phase: str) -> float:
        return round(1e3 * statistics.median(self._kept_of(phase)), 4)

    def _mean_ms(self, phase: str) -> float:
        if self.kept == self.steps:  # every step at hand: the exactly rounded mean, as a batch run reports
            return round(1e3 * statistics.fmean(self._kept_of(phase)), 4)
        return round(1e3 * self._sums[phase] / self.steps, 4)
