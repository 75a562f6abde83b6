"""The coordinator's watchers: they turn supervisors' exit reports and missing heartbeats into inbox
events (``MemberLost``), each for the member's current generation only."""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from dejavu_py.comm.heartbeat import last_beat
from dejavu_py.comm.store import get_json, has
from dejavu_py.protocol import keys


@dataclass
class MemberLost:
    """A member's worker is gone (exited) or hung (no heartbeat for the hang timeout)."""

    name: str
    generation: int
    how: str
    hung: bool = False


def watch(store, names: list[str], generation_of: Callable[[str], int], inbox: queue.Queue,
          hang_timeout_s: float, stop: threading.Event, paused: Callable[[str], bool]) -> None:
    """Start both watchers as daemon threads."""
    threading.Thread(target=_exits, args=(store, names, generation_of, inbox, stop), name="exit-watch",
                     daemon=True).start()
    threading.Thread(target=_hangs, args=(store, names, generation_of, inbox, hang_timeout_s, stop, paused),
                     name="hang-watch", daemon=True).start()


def _exits(store, names, generation_of, inbox, stop) -> None:
    reported: set[tuple[str, int]] = set()
    count = 0
    while not stop.is_set():
        n = store.add(keys.EXIT_COUNT, 0)
        if n != count:
            count = n
            for name in names:
                gen = generation_of(name)
                if (name, gen) not in reported and has(store, keys.exit_(name, gen)):
                    reported.add((name, gen))
                    inbox.put(("supervisor", MemberLost(name, gen, get_json(store, keys.exit_(name, gen))["how"])))
        stop.wait(0.02)


def _hangs(store, names, generation_of, inbox, hang_timeout_s, stop, paused) -> None:
    reported: set[tuple[str, int]] = set()
    while not stop.is_set():
        now = time.time()
        for name in names:
            gen = generation_of(name)
            beat = last_beat(store, name)
            if beat is None or beat[0] != gen or paused(name) or (name, gen) in reported:
                continue
            if now - beat[1] > hang_timeout_s:
                reported.add((name, gen))
                inbox.put(("supervisor", MemberLost(name, gen, f"hung (no heartbeat for {now - beat[1]:.1f}s)", True)))
        stop.wait(min(0.1, hang_timeout_s / 10))
