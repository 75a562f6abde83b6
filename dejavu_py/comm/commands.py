"""Commands from the coordinator to a supervisor, through the store: ``cmd/<rank>/<n>`` with a counter.

The store outlives every worker, so the coordinator can reach a supervisor whatever died. Commands:
``spawn`` (start a replacement for a member at a generation), ``takeover`` (hand a member to a warm
standby), ``kill`` (end a hung worker). Besides, ``keys.RECOVERED`` holds the latest generation whose
recovery is over (supervisors refill their standbys after it).
"""
from __future__ import annotations

import json
from typing import Any

from dejavu_py.protocol import keys


def post(store, rank: int, cmd: dict[str, Any]) -> None:
    n = store.add(keys.command_count(rank), 1)
    store.set(keys.command(rank, n), json.dumps(cmd))


class CommandReader:
    """Yields the commands posted for one rank, each once, in order."""

    def __init__(self, store, rank: int) -> None:
        self.store, self.rank, self.seen = store, rank, 0

    def poll(self) -> list[dict[str, Any]]:
        """The commands posted since the last poll. Never blocks: the client may be shared with the
        poster (rank 0's coordinator), and a client serialises its calls, so waiting here for a command
        whose counter moved but whose body is not set yet would hold up that very ``set``."""
        n = self.store.add(keys.command_count(self.rank), 0)
        out = []
        while self.seen < n:
            key = keys.command(self.rank, self.seen + 1)
            if not self.store.check([key]):  # posted after the counter moved: next poll
                break
            out.append(json.loads(self.store.get(key).decode()))
            self.seen += 1
        return out
