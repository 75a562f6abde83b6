"""Recovery, driven by the coordinator: replace only the failed stage(s); everyone else keeps their
process, weights and KV.

Phases, each timed into RUN_DIR/recoveries.jsonl (coordinator/recovery_log.py):
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

import queue
import threading
import time
from pathlib import Path

from dejavu_py import log
from dejavu_py.comm import commands
from dejavu_py.comm.edge import Edge
from dejavu_py.comm.receiver import EdgeBroken
from dejavu_py.comm.store import get_json, has
from dejavu_py.config import FTConfig
from dejavu_py.coordinator.recovery_log import RecoveryLog, RecoveryRecord
from dejavu_py.coordinator.recovery_port import RecoveryPort
from dejavu_py.coordinator.replay import for_replay, replay_steps
from dejavu_py.coordinator.watch import MemberLost
from dejavu_py.protocol import keys
from dejavu_py.protocol.layout import COORD
from dejavu_py.protocol.recovery import (
    Rebuilt,
    Recover,
    Replayed,
    ReplayHave,
    ReplayQuery,
    ReplaySteps,
    ReplicaQuery,
    Rereplicate,
    Restore,
)
from dejavu_py.protocol.replica import ReplicaCoverage

_log = log.get(__name__)


class MoreFailures(Exception):
    def __init__(self, members: set[str], why: str) -> None:
        super().__init__(why)
        self.members, self.why = members, why


class Recovery:
    """The coordinator's recoveries, one at a time on its thread; what it touches of the coordinator
    is its RecoveryPort (coordinator/recovery_port.py)."""

    def __init__(self, port: RecoveryPort, ft: FTConfig, path: Path) -> None:
        """``port``: the coordinator; ``path``: where recoveries.jsonl is written."""
        self.port, self.ft = port, ft
        self.log = RecoveryLog(lambda: port.store, path)
        self.generation = 0
        self.in_progress = False
        self.count = 0

    @property
    def records(self) -> list[dict]:
        """The recoveries written so far (ft_stats.json lists them)."""
        return self.log.records

    # -- entry -----------------------------------------------------------------------------------
    def run(self, failed: set[str], cause: str) -> None:
        port = self.port
        self.log.flush("interrupted by a later failure", self.generation)
        rec = self.log.open(failed, cause, {name: port.generation_of(name) for name in failed})
        self.in_progress = True
        port.write_progress()
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
            port.requeue(stash)
        self.count += 1
        port.write_progress()

    # -- one attempt -----------------------------------------------------------------------------
    def _attempt(self, failed: set[str], rec: RecoveryRecord, stash: list) -> None:
        port = self.port
        self.generation += 1
        gen = self.generation
        t0 = time.monotonic()
        drop_through = port.steps.current
        _log.warning("recovering %s (generation %d): %s", sorted(failed), gen, rec.cause)
        for name in failed:  # a hung one must really be gone before its replacement joins
            self._kill(name)
            port.set_generation(name, gen)
        peers = {p for f in failed for p in port.layout.peers_of(f) + port.layout.replica_peers_of(f)}
        survivors = {p for p in peers if p != COORD and p not in failed}
        for s in survivors:
            port.send(s, Recover(gen, sorted(failed), drop_through))
        for name in sorted(failed):
            commands.post(port.store, port.host_leader_of(port.layout.by_name(name).rank), {
                "op": "replace", "member": name, "generation": gen})
        edges = self._coord_edges(failed, gen)
        ready = self._wait(failed, survivors, gen, edges, stash, rec, t0)
        for name, edge in ready.items():
            port.install_edge(name, edge)
        t_restore = time.monotonic()
        keep = self._replicas_usable(failed)
        info = port.driver.recover(failed, keep_kv=keep)
        rec.notes.update(info.notes)
        replays = self._restore(failed, info, drop_through, keep, rec, stash) if keep else {}
        if not keep:
            for name in sorted(failed):
                port.send(name, Restore(info.states_for(name), drop_through))
            if any(m in {x.name for x in port.layout.decode_pipeline} for m in failed):
                rec.notes["kv_source"] = "recomputed from the tokens (no live replica)"
        rec.phases["restore_s"] = time.monotonic() - t_restore
        t_replay = time.monotonic()
        self._await_replays(replays, rec, stash, failed)
        rec.phases["replay_s"] = time.monotonic() - t_replay
        t_resume = time.monotonic()
        rec.phases["paused_s"] = t_resume - t0
        self.log.resumed(rec, [seq.seq_id for seq in info.redo], t_resume)
        port.refresh_workers_file()

    def _replicas_usable(self, failed: set[str]) -> bool:
        """Every failed decode stage has a live replica holder (else KV is recomputed from tokens)."""
        port = self.port
        decode = {m.name for m in port.layout.decode_pipeline}
        holders = [port.layout.replica_holder(m) for m in failed if m in decode]
        return self.ft.enabled and all(h is not None and h not in failed for h in holders)

    def _restore(self, failed, info, drop_through, keep, rec, stash) -> dict[str, int]:
        """KV back from the replica holders, the gap replayed; returns replays expected per member."""
        port = self.port
        decode_names = [m.name for m in port.layout.decode_pipeline]
        sched = port.driver.decode_scheduler
        replays: dict[str, int] = {}
        for x in sorted(failed):
            states = info.states_for(x)
            if x not in decode_names:
                port.send(x, Restore(states, drop_through))
                continue
            holder = port.layout.replica_holder(x)
            port.send(holder, ReplicaQuery(x, x, {sid: st.block_table for sid, st in states.items()}))
            cov = self._await(lambda m: isinstance(m, ReplicaCoverage) and m.source == x, stash, failed)
            need = {sid: sched.seqs[sid].num_cached for sid in states}
            plans, recompute = replay_steps(sched.history, need, cov.covered)
            for sid in recompute:  # its gap reaches back before the plan ring: recompute it from its tokens
                sched.seqs[sid].num_cached = 0
                info.redo.append(sched.seqs[sid])
            # the holder ships nothing when it covers nothing (no sequence in flight, or none replicated
            # yet): a replacement told to wait for its chunk would wait forever
            port.send(x, Restore(states, drop_through, replica_from=holder if cov.bytes else None, replay=len(plans)))
            self._send_replay(x, plans, set(states), stash, failed)
            replays[x] = len(plans)
            rec.notes.setdefault("replica_bytes", 0)
            rec.notes["replica_bytes"] += cov.bytes
            rec.notes["steps_recomputed"] = rec.notes.get("steps_recomputed", 0) + len(plans)
            unrecorded = sum(x not in p.routing for p in plans)  # its last record had not left it yet
            rec.notes["steps_replayed_unrecorded"] = rec.notes.get("steps_replayed_unrecorded", 0) + unrecorded
            rec.notes["sequences_recomputed_from_tokens"] = len(info.redo)
            source = port.layout.replica_source(x)
            if source is not None and source not in failed:  # the replica x held is gone: send it again
                port.send(source, Rereplicate(x, {sid: st.block_table for sid, st in states.items()}, need))
        rec.notes["kv_source"] = "replica"
        return replays

    def _send_replay(self, x: str, plans, live: set[int], stash, failed) -> None:
        """From x's predecessor's checkpoints where it kept them all for a microbatch, else through
        the stages before x (the first stage embeds the recorded tokens)."""
        port = self.port
        pipe = [m.name for m in port.layout.decode_pipeline]
        prev = port.layout.by_name(x).prev
        by_mb: dict[int, list] = {}
        for p in plans:
            by_mb.setdefault(p.mb, []).append(for_replay(p, x, live))
        have: set = set()
        if prev != COORD and plans:
            port.send(prev, ReplayQuery([(p.mb, p.step) for p in plans]))
            have = set(map(tuple, self._await(lambda m: isinstance(m, ReplayHave) and m.member == prev, stash, failed).steps))
        for mb, mb_plans in by_mb.items():
            if prev == COORD:
                for p in mb_plans:
                    port.send(x, p)
            elif all((p.mb, p.step) in have for p in mb_plans):
                port.send(prev, ReplaySteps(mb_plans, x))
            else:
                for p in mb_plans:
                    port.send(pipe[0], p)

    def _await_replays(self, replays: dict[str, int], rec, stash, failed) -> None:
        mismatches = 0
        for x in sorted(replays):
            done = self._await(lambda m: isinstance(m, Replayed) and m.member == x, stash, failed)
            mismatches += done.mismatches
        if replays:
            rec.notes["routing_mismatches"] = mismatches

    def _await(self, match, stash, failed):
        """The first inbox message ``match`` accepts; failures raise MoreFailures, the rest is kept."""
        port = self.port
        deadline = time.monotonic() + self.ft.recovery_timeout_s
        while time.monotonic() < deadline:
            got = port.next_message(0.05)
            if got is None:
                continue
            source, msg = got
            if match(msg):
                return msg
            self._triage(source, msg, failed, stash)
        raise RuntimeError(f"recovery of {sorted(failed)}: no answer within {self.ft.recovery_timeout_s:.0f}s")

    def _kill(self, name: str) -> None:
        port = self.port
        info = get_json(port.store, keys.member(name)) if has(port.store, keys.member(name)) else None
        if info is not None:
            kill = {"op": "kill", "pid": info["pid"], "why": f"{name} failed"}
            commands.post(port.store, port.host_leader_of(info["rank"]), kill)
            commands.post(port.store, info["rank"], kill)

    def _coord_edges(self, failed: set[str], gen: int) -> dict[str, "queue.Queue"]:
        """The coordinator's own edges to the replacements, built in the background (they block until
        the replacement joins)."""
        out: dict[str, queue.Queue] = {}
        for name in sorted(failed):
            box: queue.Queue = queue.Queue()
            out[name] = box

            def build(name=name, box=box) -> None:
                try:
                    box.put(self.port.make_edge(name, gen))
                except Exception as e:  # the replacement never joined
                    box.put(e)

            threading.Thread(target=build, name=f"coord-edge-{name}", daemon=True).start()
        return out

    def _wait(self, failed, survivors, gen, edges, stash, rec, t0) -> dict[str, Edge]:
        """Until replacements are loaded and every rebuilt edge is up; timing replace/load/rebuild."""
        port = self.port
        deadline = time.monotonic() + self.ft.recovery_timeout_s
        loading, loaded, rebuilt, ready = set(), {}, set(), {}
        while len(ready) < len(failed) or rebuilt < survivors or len(loaded) < len(failed):
            if time.monotonic() > deadline:
                raise RuntimeError(f"recovery of {sorted(failed)} did not finish in {self.ft.recovery_timeout_s:.0f}s")
            for name in failed:
                info = get_json(port.store, keys.member(name)) if has(port.store, keys.member(name)) else {}
                if info.get("generation") == gen and name not in loading:
                    loading.add(name)
                    rec.phases.setdefault("replace_s", time.monotonic() - t0)
                if info.get("generation") == gen and info.get("state") == "ready" and name not in loaded:
                    loaded[name] = info
                    rec.phases["load_s"] = max(rec.phases.get("load_s", 0.0), info.get("load_s", 0.0))
                    rec.notes["takeover"] = info.get("takeover", False)
                    t_loaded = time.monotonic()
                if has(port.store, keys.exit_(name, gen)):
                    raise MoreFailures({name}, f"replacement {get_json(port.store, keys.exit_(name, gen))['how']}")
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
        port = self.port
        while True:
            got = port.next_message(0)
            if got is None:
                return
            source, msg = got
            if isinstance(msg, Rebuilt) and msg.generation == gen:
                rebuilt.add(msg.member)
            else:
                self._triage(source, msg, failed, stash)

    def _triage(self, source, msg, failed, stash) -> None:
        port = self.port
        if isinstance(msg, EdgeBroken) and msg.peer in failed:
            return  # old edges of the failed members
        if port.is_loss(msg):
            name = port.member_of(msg)
            if name not in failed:
                raise MoreFailures({name}, port.why(msg))
        elif isinstance(msg, (EdgeBroken, MemberLost)):
            return  # news of an older generation
        elif source in failed and not isinstance(msg, (Replayed, ReplicaCoverage)):
            return  # sent by a failed member before it died: stale
        else:
            stash.append((source, msg))

    # -- after the replay --------------------------------------------------------------------------
    def on_tokens(self, seq_ids: list[int]) -> None:
        """Tokens arrived for these sequences: records of recoveries they end are written."""
        self.log.on_tokens(seq_ids, self.generation)

    def finish(self) -> None:
        """End of run: write what is still open."""
        self.log.flush("run ended before it finished", self.generation)
