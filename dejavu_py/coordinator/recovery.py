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
from pathlib import Path

from dejavu_py import log
from dejavu_py.comm import commands
from dejavu_py.comm.edge import Edge
from dejavu_py.comm.heartbeat import last_beat
from dejavu_py.comm.receiver import EdgeBroken
from dejavu_py.comm.store import get_json, has, put_json
from dejavu_py.config import FTConfig
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


@dataclass
class RecoveryRecord:
    failed: list[str]
    cause: str
    t_failure: float
    """Wall-clock time of the failure (exit report or last heartbeat)."""
    t_noticed: float = 0.0
    gens: dict[str, int] = field(default_factory=dict)
    """The failed members' generations when they failed (their exit reports are keyed by them)."""
    phases: dict[str, float] = field(default_factory=dict)
    attempts: int = 1
    notes: dict = field(default_factory=dict)


class Recovery:
    def __init__(self, port: RecoveryPort, ft: FTConfig, path: Path) -> None:
        """``port``: the coordinator; ``path``: where recoveries.jsonl is written."""
        self.port, self.ft, self.path = port, ft, path
        self.generation = 0
        self.in_progress = False
        self.count = 0
        self.records: list[dict] = []
        self.pending: dict[int, RecoveryRecord] = {}  # seq -> record, until its next token (recompute done)
        self.t_resume: dict[int, float] = {}
        self.first_token: list[RecoveryRecord] = []  # records waiting for the first token after resuming

    # -- entry -----------------------------------------------------------------------------------
    def run(self, failed: set[str], cause: str) -> None:
        c = self.port
        self._flush_pending("interrupted by a later failure")
        rec = RecoveryRecord(sorted(failed), cause, self._failure_time(failed), time.time(),
                             {name: c.generation_of(name) for name in failed})
        rec.phases["detect_s"] = max(rec.t_noticed - rec.t_failure, 0.0)
        self.in_progress = True
        c.write_progress()
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
            c.requeue(stash)
        self.count += 1
        c.write_progress()

    def _failure_time(self, failed: set[str]) -> float:
        times = []
        for name in failed:
            gen = self.port.generation_of(name)
            if has(self.port.store, keys.exit_(name, gen)):
                times.append(get_json(self.port.store, keys.exit_(name, gen))["time"])
            else:
                beat = last_beat(self.port.store, name)
                times.append(beat[1] if beat else time.time())
        return min(times)

    def _redate(self, rec: RecoveryRecord) -> None:
        """A broken connection is often noticed before the supervisor's exit report lands, and the failure
        was then dated by the last heartbeat (up to a beat earlier). Once every failed member's report is
        in, and each says it exited before it was noticed (a hung one we killed exits after), date it so."""
        c, times = self.port, []
        for name, gen in rec.gens.items():
            key = keys.exit_(name, gen)
            t = get_json(c.store, key)["time"] if has(c.store, key) else None
            if t is None or t > rec.t_noticed:
                return
            times.append(t)
        if times and min(times) > rec.t_failure:
            rec.t_failure = min(times)
            rec.phases["detect_s"] = max(rec.t_noticed - rec.t_failure, 0.0)

    # -- one attempt -----------------------------------------------------------------------------
    def _attempt(self, failed: set[str], rec: RecoveryRecord, stash: list) -> None:
        c = self.port
        self.generation += 1
        gen = self.generation
        t0 = time.monotonic()
        drop_through = c.steps.current
        _log.warning("recovering %s (generation %d): %s", sorted(failed), gen, rec.cause)
        for name in failed:  # a hung one must really be gone before its replacement joins
            self._kill(name)
            c.set_generation(name, gen)
        peers = {p for f in failed for p in c.layout.peers_of(f) + c.layout.replica_peers_of(f)}
        survivors = {p for p in peers if p != COORD and p not in failed}
        for s in survivors:
            c.send(s, Recover(gen, sorted(failed), drop_through))
        for name in sorted(failed):
            commands.post(c.store, c.host_leader_of(c.layout.by_name(name).rank), {
                "op": "replace", "member": name, "generation": gen})
        edges = self._coord_edges(failed, gen)
        ready = self._wait(failed, survivors, gen, edges, stash, rec, t0)
        for name, edge in ready.items():
            c.install_edge(name, edge)
        t_restore = time.monotonic()
        keep = self._replicas_usable(failed)
        info = c.driver.recover(failed, keep_kv=keep)
        rec.notes.update(info.notes)
        replays = self._restore(failed, info, drop_through, keep, rec, stash) if keep else {}
        if not keep:
            for name in sorted(failed):
                c.send(name, Restore(info.states_for(name), drop_through))
            if any(m in {x.name for x in c.layout.decode_pipeline} for m in failed):
                rec.notes["kv_source"] = "recomputed from the tokens (no live replica)"
        rec.phases["restore_s"] = time.monotonic() - t_restore
        t_replay = time.monotonic()
        self._await_replays(replays, rec, stash, failed)
        rec.phases["replay_s"] = time.monotonic() - t_replay
        t_resume = time.monotonic()
        for seq in info.redo:
            self.pending[seq.seq_id] = rec
            self.t_resume[seq.seq_id] = t_resume
        rec.phases["paused_s"] = t_resume - t0
        self.first_token.append(rec)  # written once the pipeline produces again (and recomputes are done)
        c.refresh_workers_file()

    def _replicas_usable(self, failed: set[str]) -> bool:
        """Every failed decode stage has a live replica holder (else KV is recomputed from tokens)."""
        c = self.port
        decode = {m.name for m in c.layout.decode_pipeline}
        holders = [c.layout.replica_holder(m) for m in failed if m in decode]
        return self.ft.enabled and all(h is not None and h not in failed for h in holders)

    def _restore(self, failed, info, drop_through, keep, rec, stash) -> dict[str, int]:
        """KV back from the replica holders, the gap replayed; returns replays expected per member."""
        c = self.port
        decode_names = [m.name for m in c.layout.decode_pipeline]
        sched = c.driver.decode_scheduler
        replays: dict[str, int] = {}
        for x in sorted(failed):
            states = info.states_for(x)
            if x not in decode_names:
                c.send(x, Restore(states, drop_through))
                continue
            holder = c.layout.replica_holder(x)
            c.send(holder, ReplicaQuery(x, x, {sid: st.block_table for sid, st in states.items()}))
            cov = self._await(lambda m: isinstance(m, ReplicaCoverage) and m.source == x, stash, failed)
            need = {sid: sched.seqs[sid].num_cached for sid in states}
            plans, recompute = replay_steps(sched.history, need, cov.covered)
            for sid in recompute:  # its gap reaches back before the plan ring: recompute it from its tokens
                sched.seqs[sid].num_cached = 0
                info.redo.append(sched.seqs[sid])
            # the holder ships nothing when it covers nothing (no sequence in flight, or none replicated
            # yet): a replacement told to wait for its chunk would wait forever
            c.send(x, Restore(states, drop_through, replica_from=holder if cov.bytes else None, replay=len(plans)))
            self._send_replay(x, plans, set(states), stash, failed)
            replays[x] = len(plans)
            rec.notes.setdefault("replica_bytes", 0)
            rec.notes["replica_bytes"] += cov.bytes
            rec.notes["steps_recomputed"] = rec.notes.get("steps_recomputed", 0) + len(plans)
            unrecorded = sum(x not in p.routing for p in plans)  # its last record had not left it yet
            rec.notes["steps_replayed_unrecorded"] = rec.notes.get("steps_replayed_unrecorded", 0) + unrecorded
            rec.notes["sequences_recomputed_from_tokens"] = len(info.redo)
            source = c.layout.replica_source(x)
            if source is not None and source not in failed:  # the replica x held is gone: send it again
                c.send(source, Rereplicate(x, {sid: st.block_table for sid, st in states.items()}, need))
        rec.notes["kv_source"] = "replica"
        return replays

    def _send_replay(self, x: str, plans, live: set[int], stash, failed) -> None:
        """From x's predecessor's checkpoints where it kept them all for a microbatch, else through
        the stages before x (the first stage embeds the recorded tokens)."""
        c = self.port
        pipe = [m.name for m in c.layout.decode_pipeline]
        prev = c.layout.by_name(x).prev
        by_mb: dict[int, list] = {}
        for p in plans:
            by_mb.setdefault(p.mb, []).append(for_replay(p, x, live))
        have: set = set()
        if prev != COORD and plans:
            c.send(prev, ReplayQuery([(p.mb, p.step) for p in plans]))
            have = set(map(tuple, self._await(lambda m: isinstance(m, ReplayHave) and m.member == prev, stash, failed).steps))
        for mb, mb_plans in by_mb.items():
            if prev == COORD:
                for p in mb_plans:
                    c.send(x, p)
            elif all((p.mb, p.step) in have for p in mb_plans):
                c.send(prev, ReplaySteps(mb_plans, x))
            else:
                for p in mb_plans:
                    c.send(pipe[0], p)

    def _await_replays(self, replays: dict[str, int], rec, stash, failed) -> None:
        mismatches = 0
        for x in sorted(replays):
            done = self._await(lambda m: isinstance(m, Replayed) and m.member == x, stash, failed)
            mismatches += done.mismatches
        if replays:
            rec.notes["routing_mismatches"] = mismatches

    def _await(self, match, stash, failed):
        """The first inbox message ``match`` accepts; failures raise MoreFailures, the rest is kept."""
        c = self.port
        deadline = time.monotonic() + self.ft.recovery_timeout_s
        while time.monotonic() < deadline:
            got = c.next_message(0.05)
            if got is None:
                continue
            source, msg = got
            if match(msg):
                return msg
            self._triage(source, msg, failed, stash)
        raise RuntimeError(f"recovery of {sorted(failed)}: no answer within {self.ft.recovery_timeout_s:.0f}s")

    def _kill(self, name: str) -> None:
        c = self.port
        info = get_json(c.store, keys.member(name)) if has(c.store, keys.member(name)) else None
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
                    box.put(self.port.make_edge(name, gen))
                except Exception as e:  # the replacement never joined
                    box.put(e)

            threading.Thread(target=build, name=f"coord-edge-{name}", daemon=True).start()
        return out

    def _wait(self, failed, survivors, gen, edges, stash, rec, t0) -> dict[str, Edge]:
        """Until replacements are loaded and every rebuilt edge is up; timing replace/load/rebuild."""
        c = self.port
        deadline = time.monotonic() + self.ft.recovery_timeout_s
        loading, loaded, rebuilt, ready = set(), {}, set(), {}
        while len(ready) < len(failed) or rebuilt < survivors or len(loaded) < len(failed):
            if time.monotonic() > deadline:
                raise RuntimeError(f"recovery of {sorted(failed)} did not finish in {self.ft.recovery_timeout_s:.0f}s")
            for name in failed:
                info = get_json(c.store, keys.member(name)) if has(c.store, keys.member(name)) else {}
                if info.get("generation") == gen and name not in loading:
                    loading.add(name)
                    rec.phases.setdefault("replace_s", time.monotonic() - t0)
                if info.get("generation") == gen and info.get("state") == "ready" and name not in loaded:
                    loaded[name] = info
                    rec.phases["load_s"] = max(rec.phases.get("load_s", 0.0), info.get("load_s", 0.0))
                    rec.notes["takeover"] = info.get("takeover", False)
                    t_loaded = time.monotonic()
                if has(c.store, keys.exit_(name, gen)):
                    raise MoreFailures({name}, f"replacement {get_json(c.store, keys.exit_(name, gen))['how']}")
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
        c = self.port
        while True:
            got = c.next_message(0)
            if got is None:
                return
            source, msg = got
            if isinstance(msg, Rebuilt) and msg.generation == gen:
                rebuilt.add(msg.member)
            else:
                self._triage(source, msg, failed, stash)

    def _triage(self, source, msg, failed, stash) -> None:
        c = self.port
        if isinstance(msg, EdgeBroken) and msg.peer in failed:
            return  # old edges of the failed members
        if c.is_loss(msg):
            name = c.member_of(msg)
            if name not in failed:
                raise MoreFailures({name}, c.why(msg))
        elif isinstance(msg, (EdgeBroken, MemberLost)):
            return  # news of an older generation
        elif source in failed and not isinstance(msg, (Replayed, ReplicaCoverage)):
            return  # sent by a failed member before it died: stale
        else:
            stash.append((source, msg))

    # -- after the replay --------------------------------------------------------------------------
    def on_tokens(self, seq_ids: list[int]) -> None:
        """Tokens arrived for these sequences: a recovery whose recomputations all produced one is done.
        The first token after a recovery also lets supervisors refill their standbys (loading a stage
        before it would compete with the recovery for the device)."""
        self._refill_standbys()
        for rec in self.first_token:
            self._redate(rec)
            rec.notes["kill_to_next_token_s"] = round(time.time() - rec.t_failure, 4)
            rec.notes["resumed_at"] = round(time.time(), 4)  # wall clock: tools compare it with the fault's time
            if rec not in self.pending.values():
                self._write(rec)
        self.first_token.clear()
        for sid in seq_ids:
            rec = self.pending.pop(sid, None)
            if rec is None:
                continue
            t = self.t_resume.pop(sid)
            rec.phases["recompute_s"] = max(rec.phases.get("recompute_s", 0.0), time.monotonic() - t)
            if rec not in self.pending.values():
                self._write(rec)

    def _refill_standbys(self) -> None:
        if self.first_token:
            put_json(self.port.store, keys.RECOVERED, {"generation": self.generation})

    def finish(self) -> None:
        """End of run: write what is still open."""
        self._flush_pending("run ended before it finished")

    def _flush_pending(self, why: str) -> None:
        """Write the records of earlier recoveries whose recomputation had not finished."""
        self._refill_standbys()
        for rec in self.first_token:
            if rec not in self.pending.values():
                self._write(rec)
        self.first_token.clear()
        for rec in {id(r): r for r in self.pending.values()}.values():
            rec.notes["recompute"] = why
            rec.phases["recompute_s"] = max(time.monotonic() - t for sid, t in self.t_resume.items() if self.pending[sid] is rec)
            self._write(rec)
        self.pending.clear()
        self.t_resume.clear()

    def _write(self, rec: RecoveryRecord) -> None:
        if rec.notes.get("written"):
            return
        rec.notes["written"] = True
        total = time.time() - rec.t_failure
        notes = {k: v for k, v in rec.notes.items() if k != "written"}
        doc = {"failed": rec.failed, "cause": rec.cause, "attempts": rec.attempts, "generation": self.generation,
               "phases": {k: round(v, 4) for k, v in rec.phases.items()}, "recovered_s": round(total, 4), **notes}
        self.records.append(doc)
        with open(self.path, "a") as f:
            f.write(json.dumps(doc) + "\n")
        _log.warning("recovered %s in %.2fs: %s", rec.failed, total, doc["phases"])
