"""The engine's state for online front-ends (protocol/serving.py ``EngineState``): health, load, and
the fault-tolerance counters their metrics export.

It is read on a thread of its own, from the coordinator's live objects (lengths and counters, which a
read from another thread sees whole) and from the job's store through a client of its own: the
serving loop pays nothing for it, and it goes on while a recovery holds the loop.

``counters``, with the names the front-end's metrics read (serve/engine_metrics.py); cumulative unless
said otherwise:
  recoveries_total            {(cause, kind): n}; cause: crash, hang, connection or other;
                              kind: standby (a warm standby took over) or cold (a new process)
  recovery_seconds            [seconds, ...] of every recovery so far (failure to serving again), oldest first
  recovery_phase_seconds      {phase: seconds} of the last recovery (coordinator/recovery.py), now
  tokens_recomputed_total     tokens whose KV recoveries recomputed from the tokens
  replica_bytes_total         KV bytes restored from replicas
  workers                     {state: n} now: loading, ready, replacing
  standbys_ready              warm standbys ready to take over, now
  requests_finished_total, requests_failed_total, tokens_generated_total
  kv_blocks_total, kv_blocks_used   the decode pipeline's KV cache, now
"""
from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from typing import Any

from dejavu_py import log
from dejavu_py.comm.store import connect, get_json, has
from dejavu_py.protocol import keys
from dejavu_py.protocol.serving import EngineState

_log = log.get(__name__)


def cause_of(cause: str) -> str:
    """A recovery's cause as a metric label, from how the failed member ended (coordinator/watch.py,
    Coordinator.why)."""
    if " hung " in f" {cause} ":
        return "hang"
    if "killed by" in cause or "exited with" in cause:
        return "crash"
    if "connection" in cause:
        return "connection"
    return "other"


def recovery_counters(records: list[dict]) -> dict[str, Any]:
    """The counters of the recoveries written so far (their records, as recoveries.jsonl has them)."""
    kinds = collections.Counter((cause_of(r.get("cause", "")), "standby" if r.get("takeover") else "cold")
                                for r in records)
    last = records[-1] if records else None
    return {
        "recoveries_total": dict(kinds),
        "recovery_seconds": [r.get("recovered_s", 0.0) for r in records],
        "recovery_phase_seconds": dict(last.get("phases", {})) if last else {},
        "tokens_recomputed_total": sum(r.get("tokens_recomputed", 0) for r in records),
        "replica_bytes_total": sum(r.get("replica_bytes", 0) for r in records),
    }


class EngineStateView:
    """Reads a coordinator's state (see the module's docstring for what it holds)."""

    def __init__(self, coordinator: Any) -> None:
        self.coord = coordinator
        self._store = None  # its own client: the loop's is not to be shared across threads

    def snapshot(self) -> EngineState:
        c = self.coord
        driver = c.driver
        running, waiting = driver.counts() if driver is not None else (0, 0)
        used, total = _kv_blocks(driver)
        tally = c.ledger.tally if c.ledger is not None else None
        counters = {
            **recovery_counters(list(c.recovery.records)),
            **self._members(),
            "requests_finished_total": tally.served if tally else 0,
            "requests_failed_total": tally.failed if tally else 0,
            "tokens_generated_total": tally.tokens if tally else 0,
            "kv_blocks_total": total,
            "kv_blocks_used": used,
        }
        return EngineState(serving=c.serving, recovering=c.recovery.in_progress, running=running,
                           waiting=waiting, kv_usage=used / total if total else 0.0, counters=counters)

    def _members(self) -> dict[str, Any]:
        """Workers by state and standbys ready, from the store (none before the coordinator joined it)."""
        c = self.coord
        if c.addr is None:
            return {"workers": {}, "standbys_ready": 0}
        if self._store is None:
            self._store = connect(c.addr)
        store, states = self._store, collections.Counter()
        for m in c.layout.members:
            info = get_json(store, keys.member(m.name)) if has(store, keys.member(m.name)) else {}
            current = info.get("generation", 0) == c.generation_of(m.name)
            states[info.get("state", "loading") if current else "replacing"] += 1
        return {"workers": dict(states), "standbys_ready": self._standbys(store)}

    def _standbys(self, store) -> int:
        """Standbys registered ready and not assigned; a host's ids count up from 0, one more per takeover."""
        c = self.coord
        if c.cfg.ft.standby == 0:
            return 0
        ready = 0
        for rank in sorted({m.rank for m in c.layout.members}):
            if get_json(store, keys.supervisor(rank)).get("local_rank") != 0:
                continue
            for sid in range(c.cfg.ft.standby + c.recovery.generation):
                key = keys.standby(f"{rank}.{sid}")
                if (has(store, key) and not has(store, keys.assign(f"{rank}.{sid}"))
                        and get_json(store, key).get("state") == "ready"):
                    ready += 1
        return ready


def _kv_blocks(driver: Any) -> tuple[int, int]:
    """(used, total) blocks of the decode pipeline's cache."""
    if driver is None:
        return 0, 0
    blocks = driver.decode_scheduler.blocks
    total = blocks.per_partition * blocks.partitions
    return total - sum(blocks.num_free(p) for p in range(blocks.partitions)), total


class StatePublisher:
    """Sends ``snapshot()`` through ``send`` every ``interval_s``, and at once when kicked."""

    def __init__(self, snapshot: Callable[[], EngineState], send: Callable[[EngineState], None],
                 interval_s: float) -> None:
        self.snapshot, self.send, self.interval_s = snapshot, send, interval_s
        self._kick = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-state", daemon=True)
        self._thread.start()

    def kick(self) -> None:
        """Send now (any thread)."""
        self._kick.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._kick.wait(self.interval_s)
            self._kick.clear()
            self._publish()

    def _publish(self) -> None:
        try:
            self.send(self.snapshot())
        except Exception as e:  # e.g. the store going away at the end: the next one may work
            _log.debug("engine state not sent: %s", e)

    def close(self) -> None:
        """Stop, sending the state once more first (the last word on health)."""
        self._stop.set()
        self._kick.set()
        self._thread.join(timeout=5)
        self._publish()
