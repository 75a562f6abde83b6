"""Recovery, driven by the coordinator: replace only the failed stage(s); everyone else keeps their
process, weights and KV.

Phases, each timed into RUN_DIR/recoveries.jsonl:
  detect   failure (supervisor's exit report, or the last heartbeat of a hung worker) -> noticed here
  replace  a standby takes the member over, or its host's supervisor forks a new worker
  load     the replacement loads its stage (0 for a standby preloaded with it)
  rebuild  the edges touching the failed members are rebuilt at a new generation, by the survivors,
           the replacements and the coordinator; every other edge stays
  restore  the replacement learns the sequences in flight and gets their KV (from the replica)
  replay   steps the KV replica had not acknowledged are recomputed; the plans in flight are re-issued
A failure noticed during a recovery (a replacement dying, another stage) restarts it with every failed
member at a newer generation.
"""
from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .. import log
from ..comm.edge import Edge
from ..comm.store import get_json, has
from ..engine.plan import EdgeBroken
from ..runtime.layout import COORD
from ..runtime.supervisor import exit_key
from . import commands
from .heartbeat import last_beat
from .messages import Rebuilt, Recover, Restore

if TYPE_CHECKING:
    from ..engine.coordinator import Coordinator

_log = log.get(__name__)


class MoreFailures(Exception):
    def __init__(self, members: set[str], why: str) -> None:
        super().__init__(why)
        self.members, self.why = members, why


@dataclass
class RecoveryRecord:
    failed: list[str]
    cause: str
    t_failure: float
    """Wall-clock time of the failure (exit report or last heartbeat)."""
    phases: dict[str, float] = field(default_factory=dict)
    attempts: int = 1
    notes: dict = field(default_factory=dict)


class Recovery:
    def __init__(self, coord: Coordinator) -> None:
        self.coord = coord
        self.generation = 0
        self.in_progress = False
        self.count = 0
        self.pending: dict[int, RecoveryRecord] = {}  # seq -> record, until its next token (replay done)
        self.t_resume: dict[int, float] = {}

    # -- entry -----------------------------------------------------------------------------------
    def run(self, failed: set[str], cause: str) -> None:
        c = self.coord
        self._flush_pending("interrupted by a later failure")
        rec = RecoveryRecord(sorted(failed), cause, self._failure_time(failed))
        rec.phases["detect_s"] = max(time.time() - rec.t_failure, 0.0)
        self.in_progress = True
        stash: list = []
        try:
            while True:
                try:
                    self._attempt(failed, rec, stash)
                    break
                except MoreFailures as e:
                    _log.warning("another failure during recovery: %s %s", sorted(e.members), e.why)
                    failed |= e.members
                    rec.failed, rec.attempts = sorted(failed), rec.attempts + 1
        finally:
            self.in_progress = False
            for item in stash:
                c.inbox.put(item)
        self.count += 1

    def _failure_time(self, failed: set[str]) -> float:
        times = []
        for name in failed:
            gen = self.coord.generation_of(name)
            if has(self.coord.store, exit_key(name, gen)):
                times.append(get_json(self.coord.store, exit_key(name, gen))["time"])
            else:
                beat = last_beat(self.coord.store, name)
                times.append(beat[1] if beat else time.time())
        return min(times)

    # -- one attempt -----------------------------------------------------------------------------
    def _attempt(self, failed: set[str], rec: RecoveryRecord, stash: list) -> None:
        c = self.coord
        self.generation += 1
        gen = self.generation
        t0 = time.monotonic()
        drop_through = c.steps.current
        _log.warning("recovering %s (generation %d): %s", sorted(failed), gen, rec.cause)
        for name in failed:  # a hung one must really be gone before its replacement joins
            self._kill(name)
            c.member_gen[name] = gen
        survivors = {p for f in failed for p in c.layout.peers_of(f) if p != COORD and p not in failed}
        for s in survivors:
            c.send(s, Recover(gen, sorted(failed), drop_through))
        for name in sorted(failed):
            commands.post(c.store, c.host_leader_of(c.layout.by_name(name).rank), {
                "op": "replace", "member": name, "generation": gen})
        edges = self._coord_edges(failed, gen)
        ready = self._wait(failed, survivors, gen, edges, stash, rec, t0)
        for name, edge in ready.items():
            old = c.edges.get(name)
            if old is not None:
                old.close()
            c.edges[name] = edge
            c.start_pump(name, edge)
        t_restore = time.monotonic()
        info = c.driver.recover(failed)
        for name in sorted(failed):
            c.send(name, Restore(info.states_for(name), drop_through))
        rec.phases["restore_s"] = time.monotonic() - t_restore
        rec.notes.update(info.notes)
        t_resume = time.monotonic()
        for seq in info.redo:
            self.pending[seq.seq_id] = rec
            self.t_resume[seq.seq_id] = t_resume
        rec.phases["paused_s"] = t_resume - t0
        if not info.redo:
            self._write(rec, replay_s=0.0)
        c.refresh_workers_file()

    def _kill(self, name: str) -> None:
        c = self.coord
        info = get_json(c.store, f"member/{name}") if has(c.store, f"member/{name}") else None
        if info is not None:
            commands.post(c.store, c.host_leader_of(info["rank"]), {"op": "kill", "pid": info["pid"], "why": f"{name} failed"})
            commands.post(c.store, info["rank"], {"op": "kill", "pid": info["pid"], "why": f"{name} failed"})

    def _coord_edges(self, failed: set[str], gen: int) -> dict[str, "queue.Queue"]:
        """The coordinator's own edges to the replacements, built in the background (they block until
        the replacement joins)."""
        out: dict[str, queue.Queue] = {}
        for name in sorted(failed):
            box: queue.Queue = queue.Queue()
            out[name] = box

            def build(name=name, box=box) -> None:
                try:
                    box.put(self.coord.make_edge(name, gen))
                except Exception as e:  # the replacement never joined
                    box.put(e)

            threading.Thread(target=build, name=f"coord-edge-{name}", daemon=True).start()
        return out

    def _wait(self, failed, survivors, gen, edges, stash, rec, t0) -> dict[str, Edge]:
        """Until replacements are loaded and every rebuilt edge is up; timing replace/load/rebuild."""
        c = self.coord
        deadline = time.monotonic() + c.cfg.ft.recovery_timeout_s
        loading, loaded, rebuilt, ready = set(), {}, set(), {}
        while len(ready) < len(failed) or rebuilt < survivors or len(loaded) < len(failed):
            if time.monotonic() > deadline:
                raise RuntimeError(f"recovery of {sorted(failed)} did not finish in {c.cfg.ft.recovery_timeout_s:.0f}s")
            for name in failed:
                info = get_json(c.store, f"member/{name}") if has(c.store, f"member/{name}") else {}
                if info.get("generation") == gen and name not in loading:
                    loading.add(name)
                    rec.phases.setdefault("replace_s", time.monotonic() - t0)
                if info.get("generation") == gen and info.get("state") == "ready" and name not in loaded:
                    loaded[name] = info
                    rec.phases["load_s"] = max(rec.phases.get("load_s", 0.0), info.get("load_s", 0.0))
                    rec.notes["takeover"] = info.get("takeover", False)
                    t_loaded = time.monotonic()
                if has(c.store, exit_key(name, gen)):
                    raise MoreFailures({name}, f"replacement {get_json(c.store, exit_key(name, gen))['how']}")
                box = edges[name]
                if name not in ready and not box.empty():
                    got = box.get()
                    if isinstance(got, Exception):
                        raise MoreFailures({name}, f"replacement did not connect: {got}")
                    ready[name] = got
            self._drain(failed, survivors, gen, rebuilt, stash)
            time.sleep(0.005)
        rec.phases["rebuild_s"] = time.monotonic() - t_loaded
        return ready

    def _drain(self, failed, survivors, gen, rebuilt, stash) -> None:
        """Handle what arrives meanwhile: acknowledgements of the rebuild, new failures; keep the rest."""
        c = self.coord
        while True:
            try:
                source, msg = c.inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(msg, Rebuilt) and msg.generation == gen:
                rebuilt.add(msg.member)
            elif isinstance(msg, EdgeBroken) and msg.peer in failed:
                continue  # old edges of the failed members
            elif c.is_loss(msg):
                name = c.member_of(msg)
                if name not in failed:
                    raise MoreFailures({name}, c.why(msg))
            elif source in failed:
                continue  # sent by a failed member before it died: stale
            else:
                stash.append((source, msg))

    # -- after the replay --------------------------------------------------------------------------
    def on_tokens(self, seq_ids: list[int]) -> None:
        """Tokens arrived for these sequences: a recovery whose recomputations all produced one is done."""
        for sid in seq_ids:
            rec = self.pending.pop(sid, None)
            if rec is None:
                continue
            t = self.t_resume.pop(sid)
            rec.phases["replay_s"] = max(rec.phases.get("replay_s", 0.0), time.monotonic() - t)
            if rec not in self.pending.values():
                self._write(rec, rec.phases["replay_s"])

    def _flush_pending(self, why: str) -> None:
        """Write the records of earlier recoveries whose replay had not finished."""
        for rec in {id(r): r for r in self.pending.values()}.values():
            rec.notes["replay"] = why
            self._write(rec, max(time.monotonic() - t for sid, t in self.t_resume.items() if self.pending[sid] is rec))
        self.pending.clear()
        self.t_resume.clear()

    def _write(self, rec: RecoveryRecord, replay_s: float) -> None:
        rec.phases["replay_s"] = replay_s
        total = time.time() - rec.t_failure
        doc = {"failed": rec.failed, "cause": rec.cause, "attempts": rec.attempts, "generation": self.generation,
               "phases": {k: round(v, 4) for k, v in rec.phases.items()}, "kill_to_next_token_s": round(total, 4),
               **rec.notes}
        with open(self.coord.cfg.run_dir / "recoveries.jsonl", "a") as f:
            f.write(json.dumps(doc) + "\n")
        _log.warning("recovered %s in %.2fs: %s", rec.failed, total, doc["phases"])
