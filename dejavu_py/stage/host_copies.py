"""Copies from the device to the host and the waits for them: what the stage's thread waits for with
the GIL released, and the copies another thread waits for (``DeferredCopy``)."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch


class DeviceWait:
    """Waits for a launched step's event with the GIL released, counting the time: reading a result back
    (``tolist``, ``cpu``) would hold the GIL through the step's kernels (the stage's receiver and replica
    threads need it), and would wait for the whole stream, the step launched behind it included."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self, event: torch.cuda.Event | None) -> None:
        if event is not None:
            t0 = time.perf_counter()
            event.synchronize()
            self.seconds += time.perf_counter() - t0


def record_event(blocking: bool = False) -> torch.cuda.Event:
    """An event recorded on the current stream. ``blocking``: a thread waiting for it sleeps instead of
    spinning, for waits off the pipeline's chain (a thread spinning on the device slows every CUDA call
    of the stage's own thread, launches included)."""
    event = torch.cuda.Event(blocking=blocking)
    event.record()
    return event


@torch.inference_mode()
def queue_copies(copies: list[tuple[torch.Tensor, torch.Tensor]], blocking: bool = False) -> torch.cuda.Event:
    """(device source, host destination) copies on the current stream; the event marks them done
    (``blocking``: see ``record_event``)."""
    for src, dst in copies:
        dst.copy_(src, non_blocking=True)
    return record_event(blocking)


@dataclass
class DeferredCopy:
    """A copy to the host queued when the next step is launched and started with that step's kernels
    (``stage.runner.StageRunner._queue_deferred``): a graph step's K/V, or one another thread asked for
    (``StageRunner.defer_copy``). The copy engine moves it while this stage computes: right behind its own
    step it would hold up the stages sharing the GPU (their contexts take turns with this one's copies),
    and no step waits for it (only the reuse of a K/V staging buffer, two steps later)."""

    src: torch.Tensor
    """A device copy of the graph's record, in one of two buffers that alternate."""
    dst: torch.Tensor
    """Pinned host buffer (the runner's ``host``)."""
    event: torch.cuda.Event | None = None
    """Recorded behind the copy once it is queued."""
    after: torch.cuda.Event | None = None
    """The copy waits for it too (``src`` computed on the device and not yet waited for)."""
    queued: threading.Event = field(default_factory=threading.Event)
    """Set once ``event`` is: another thread may wait for the bytes before the copy is queued."""

    def query(self) -> bool:
        """Whether ``dst`` holds the bytes now (without waiting)."""
        return self.queued.is_set() and self.event.query()

    def synchronize(self, timeout_s: float | None = None) -> bool:
        """Wait until ``dst`` holds the bytes (the copy is queued by the stage's thread, at its next launch
        or ``StageRunner.flush_deferred_copies``); False if it was not queued within ``timeout_s``."""
        if not self.queued.wait(timeout_s):
            return False
        self.event.synchronize()
        return True
