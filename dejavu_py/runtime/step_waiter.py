"""Asynchronous scheduling on the stage side: a thread that tells the serving loop when the device has
finished a launched step, so that the loop can launch the next plan first and finish the last one later
(see engine.scheduler for the coordinator's side)."""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .layout import COORD

if TYPE_CHECKING:
    from ..engine.runner import Launched
    from .worker import WorkerSpec


@dataclass
class StepDone:
    """Put in the inbox when the device has finished a launched step."""

    step: int


class StepWaiter:
    """A thread that waits, with the GIL released, for launched steps' events and reports each done."""

    def __init__(self, inbox: queue.Queue) -> None:
        self.inbox = inbox
        self.todo: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, name="step-waiter", daemon=True).start()

    def watch(self, launched: Launched) -> None:
        self.todo.put((launched.plan.step, launched.event))

    def _run(self) -> None:
        while True:
            step, event = self.todo.get()
            if event is not None:  # on CPU the step is done when launched
                event.synchronize()
            self.inbox.put((COORD, StepDone(step), None))


def runs_ahead(spec: WorkerSpec) -> bool:
    """Asynchronous scheduling applies: a stage of the decode pipeline without KV swapping (the
    coordinator plans its steps two deep, see engine.scheduler). On CPU a step is done when launched;
    the loop is the same."""
    cfg = spec.cfg
    return cfg.pipeline.async_scheduling and not cfg.cache.swap and spec.member.role in ("stage", "token")
