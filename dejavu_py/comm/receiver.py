"""A receiver thread per edge: everything a peer sends goes to the owner's inbox, and a broken edge
becomes one ``EdgeBroken`` event there. The coordinator, every stage and a stage's replica edges use
the same thread; what differs is where a message goes (``deliver``)."""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

IDLE_TIMEOUT_S = 7 * 24 * 3600.0
"""A receiver waits this long for its peer's next message; a dead peer is reported sooner by the
transport, by the peer's supervisor or by its missing heartbeats."""


@dataclass
class EdgeBroken:
    """Put in an inbox when an edge failed (the peer died or the link broke), by its receiver thread or
    by a send that failed."""

    peer: str
    error: str
    generation: int = 0
    """Generation of the edge that broke (a stale edge of a replaced member is no news)."""

    @staticmethod
    def of(peer: str, error: BaseException, generation: int) -> EdgeBroken:
        """The event for ``error`` (its first line: the transport's messages run long)."""
        return EdgeBroken(peer, str(error).splitlines()[0][:300] if str(error) else type(error).__name__, generation)


def start_receiver(edge: Any, peer: str, deliver: Callable[[Any, Any], bool], on_broken: Callable[[EdgeBroken], None],
                   quiet: Callable[[], bool] = lambda: False, release: bool = False) -> threading.Thread:
    """A daemon thread that hands every (message, tensor) ``peer`` sends on ``edge`` to ``deliver``, and
    returns once ``deliver`` says so (True: e.g. after a ``Stop``). When the edge breaks it reports
    ``on_broken`` unless the edge was closed on purpose or ``quiet()`` (its owner is closing).
    ``release``: first release the edge's rings (the owner's stream may be waiting on them)."""

    def run() -> None:
        while True:
            try:
                msg, tensor = edge.recv(IDLE_TIMEOUT_S)
            except Exception as e:  # the peer died or the link broke: the owner's loop decides what it means
                if release:
                    edge.release()
                if not (edge.closed or quiet()):
                    on_broken(EdgeBroken.of(peer, e, edge.generation))
                return
            if deliver(msg, tensor):
                return

    thread = threading.Thread(target=run, name=f"recv-{peer}-{edge.channel}", daemon=True)
    thread.start()
    return thread
