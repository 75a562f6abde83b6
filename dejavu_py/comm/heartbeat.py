"""Heartbeats: how a hung worker (stopped, stuck in a collective) is told from a slow one.

Each worker's thread writes ``hb/<member>`` = "<generation> <unix time>" every interval; the
coordinator's watcher reads them and reports a member whose beat is older than the hang timeout.
A stopped process stops beating with everything else in it.
"""
from __future__ import annotations

import threading
import time

from dejavu_py.protocol import keys

MAX_BEAT_S = 0.1
"""Longest interval between two beats. A failure noticed before its supervisor's exit report lands (a
killed GPU process drops its connections well before it has exited) is dated by the last beat: this
bounds how early that date can be, and with it how much recoveries.jsonl overstates a recovery."""


def beat_interval(hang_timeout_s: float) -> float:
    """A fifth of the hang timeout, at most ``MAX_BEAT_S``."""
    return min(hang_timeout_s / 5, MAX_BEAT_S)




def start_beating(store, name: str, generation: int, interval_s: float) -> threading.Event:
    """Beat until the returned event is set."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            try:
                store.set(keys.heartbeat(name), f"{generation} {time.time():.3f}")
            except Exception:  # the store is gone: the job is ending
                return
            stop.wait(interval_s)

    threading.Thread(target=beat, name="heartbeat", daemon=True).start()
    return stop


def last_beat(store, name: str) -> tuple[int, float] | None:
    """(generation, time) of the member's last beat, or None before its first."""
    if not store.check([keys.heartbeat(name)]):
        return None
    gen, t = store.get(keys.heartbeat(name)).decode().split()
    return int(gen), float(t)
