"""An opt-in device trace of a stage worker's steps, for finding where a step's time goes.

    DEJAVU_TRACE_DIR=traces DEJAVU_TRACE_STEPS=100:120 python -m dejavu_py ...

Each stage worker records its host calls (with their shapes and Python stacks: who allocated what) and
its device's kernels and copies (torch.profiler) from its
step 100 to its step 120 and writes ``traces/<stage>.json`` (Chrome trace format). The stages' device
timestamps share one clock: their traces can be laid side by side to see how stages sharing a GPU take
turns. Off (no cost) unless both variables are set.
"""
from __future__ import annotations

import os
from pathlib import Path

from dejavu_py import log

_log = log.get(__name__)


class StepTrace:
    """Starts the profiler at the first step of the window, stops it and writes the trace at the last."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.dir = os.environ.get("DEJAVU_TRACE_DIR", "").strip()
        window = os.environ.get("DEJAVU_TRACE_STEPS", "").strip()
        self.start = self.end = -1
        if self.dir and window:
            try:
                start, end = (int(v) for v in window.split(":"))
            except ValueError:
                raise SystemExit(f"DEJAVU_TRACE_STEPS={window!r}: expected FIRST:LAST step numbers, e.g. 100:120") from None
            self.start, self.end = start, end
        self.prof = None

    def at(self, steps: int) -> None:
        """Called with the number of steps this worker has launched so far."""
        if self.prof is None and self.start <= steps < self.end:
            import torch
            from torch.profiler import ProfilerActivity, profile

            cuda = [ProfilerActivity.CUDA] if torch.cuda.is_available() else []
            self.prof = profile(activities=[ProfilerActivity.CPU, *cuda], record_shapes=True, with_stack=True)
            self.prof.__enter__()
        elif self.prof is not None and steps >= self.end:
            self.prof.__exit__(None, None, None)
            path = Path(self.dir) / f"{self.name}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            self.prof.export_chrome_trace(str(path))
            _log.info("device trace of steps %d-%d: %s", self.start, self.end, path)
            self.prof, self.start = None, -1
