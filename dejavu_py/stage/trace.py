"""An opt-in device trace of a stage worker's steps, for finding where a step's time goes.

    python -m dejavu_py ... --trace-dir traces --trace-steps 100:120

Each stage worker records its host calls (with their shapes and Python stacks: who allocated what) and
its device's kernels and copies (torch.profiler) from its
step 100 to its step 120 and writes ``traces/<stage>.json`` (Chrome trace format). The stages' device
timestamps share one clock: their traces can be laid side by side to see how stages sharing a GPU take
turns. Off (no cost) unless asked for (RuntimeConfig.trace_dir and trace_steps).
"""
from __future__ import annotations

from pathlib import Path

from dejavu_py import log
from dejavu_py.config import RuntimeConfig

_log = log.get(__name__)


class StepTrace:
    """Starts the profiler at the first step of the window, stops it and writes the trace at the last."""

    def __init__(self, name: str, cfg: RuntimeConfig) -> None:
        self.name = name
        self.dir = cfg.trace_dir
        self.start, self.end = cfg.trace_steps or (-1, -1)  # both or neither (RuntimeConfig checks)
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
