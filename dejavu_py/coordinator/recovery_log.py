"""RUN_DIR/recoveries.jsonl: one line per recovery, with the timing of its phases (coordinator/recovery.py
lists them) and what it did.

A record outlives its recovery: it is written once the pipeline produces again and every sequence whose
KV was recomputed from its tokens has its next token or is gone (cancelled before it), so that the line
times the whole interruption and a cancelled request does not hold it back. The
failure is dated when the recovery starts and dated again, once the exit reports are in, before writing.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed as dist

from dejavu_py import log
from dejavu_py.comm.heartbeat import last_beat
from dejavu_py.comm.store import get_json, has, put_json
from dejavu_py.protocol import keys

_log = log.get(__name__)


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


class RecoveryLog:
    """The records of a run's recoveries: open ones until their sequences produce again, written ones."""

    def __init__(self, store: Callable[[], dist.Store], path: Path) -> None:
        """``store``: gives the job's store when one is needed (the coordinator connects to it only after
        it was built); ``path``: recoveries.jsonl."""
        self._store, self.path = store, path
        self.records: list[dict] = []
        self.pending: dict[int, RecoveryRecord] = {}  # seq -> record, until its next token (recompute done)
        self.t_resume: dict[int, float] = {}
        self.first_token: list[RecoveryRecord] = []  # records waiting for the first token after resuming

    # -- a recovery starts and ends --------------------------------------------------------------
    def open(self, failed: set[str], cause: str, gens: dict[str, int]) -> RecoveryRecord:
        """The record of a recovery of ``failed`` (at generations ``gens``), noticed now."""
        rec = RecoveryRecord(sorted(failed), cause, self._failure_time(gens), time.time(), dict(gens))
        rec.phases["detect_s"] = max(rec.t_noticed - rec.t_failure, 0.0)
        return rec

    def resumed(self, rec: RecoveryRecord, recomputed: list[int], t_resume: float) -> None:
        """The pipeline serves again; ``recomputed`` sequences rebuild their KV from their tokens."""
        for sid in recomputed:
            self.pending[sid] = rec
            self.t_resume[sid] = t_resume
        self.first_token.append(rec)  # written once the pipeline produces again (and recomputes are done)

    @property
    def store(self) -> dist.Store:
        return self._store()

    def _failure_time(self, gens: dict[str, int]) -> float:
        times = []
        for name, gen in gens.items():
            if has(self.store, keys.exit_(name, gen)):
                times.append(get_json(self.store, keys.exit_(name, gen))["time"])
            else:
                beat = last_beat(self.store, name)
                times.append(beat[1] if beat else time.time())
        return min(times)

    def _redate(self, rec: RecoveryRecord) -> None:
        """A broken connection is often noticed before the supervisor's exit report lands, and the failure
        was then dated by the last heartbeat (up to a beat earlier). Once every failed member's report is
        in, and each says it exited before it was noticed (a hung one we killed exits after), date it so."""
        times = []
        for name, gen in rec.gens.items():
            key = keys.exit_(name, gen)
            t = get_json(self.store, key)["time"] if has(self.store, key) else None
            if t is None or t > rec.t_noticed:
                return
            times.append(t)
        if times and min(times) > rec.t_failure:
            rec.t_failure = min(times)
            rec.phases["detect_s"] = max(rec.t_noticed - rec.t_failure, 0.0)

    # -- after the replay --------------------------------------------------------------------------
    def on_tokens(self, seq_ids: list[int], generation: int) -> None:
        """Tokens arrived for these sequences: a recovery whose recomputations all produced one is done.
        The first token after a recovery also lets supervisors refill their standbys (loading a stage
        before it would compete with the recovery for the device)."""
        self._refill_standbys(generation)
        for rec in self.first_token:
            self._redate(rec)
            rec.notes["kill_to_next_token_s"] = round(time.time() - rec.t_failure, 4)
            rec.notes["resumed_at"] = round(time.time(), 4)  # wall clock: tools compare it with the fault's time
            if rec not in self.pending.values():
                self._write(rec, generation)
        self.first_token.clear()
        for sid in seq_ids:
            rec = self.pending.pop(sid, None)
            if rec is None:
                continue
            t = self.t_resume.pop(sid)
            rec.phases["recompute_s"] = max(rec.phases.get("recompute_s", 0.0), time.monotonic() - t)
            if rec not in self.pending.values():
                self._write(rec, generation)

    def gone(self, seq_ids: list[int], generation: int) -> None:
        """These sequences left without another token (cancelled): a recovery waits no longer for their
        recomputation. Its record is written now if no other recomputed sequence is pending and the
        pipeline produced since it resumed, else at that token as usual."""
        for sid in seq_ids:
            rec = self.pending.pop(sid, None)
            if rec is None:
                continue
            self.t_resume.pop(sid)
            rec.notes["recompute_cancelled"] = rec.notes.get("recompute_cancelled", 0) + 1
            if rec not in self.pending.values() and rec not in self.first_token:
                self._write(rec, generation)

    def _refill_standbys(self, generation: int) -> None:
        if self.first_token:
            put_json(self.store, keys.RECOVERED, {"generation": generation})

    def flush(self, why: str, generation: int) -> None:
        """Write the records of earlier recoveries whose recomputation had not finished."""
        self._refill_standbys(generation)
        for rec in self.first_token:
            if rec not in self.pending.values():
                self._write(rec, generation)
        self.first_token.clear()
        for rec in {id(r): r for r in self.pending.values()}.values():
            rec.notes["recompute"] = why
            rec.phases["recompute_s"] = max(time.monotonic() - t for sid, t in self.t_resume.items() if self.pending[sid] is rec)
            self._write(rec, generation)
        self.pending.clear()
        self.t_resume.clear()

    def _write(self, rec: RecoveryRecord, generation: int) -> None:
        if rec.notes.get("written"):
            return
        rec.notes["written"] = True
        total = time.time() - rec.t_failure
        notes = {k: v for k, v in rec.notes.items() if k != "written"}
        doc = {"failed": rec.failed, "cause": rec.cause, "attempts": rec.attempts, "generation": generation,
               "phases": {k: round(v, 4) for k, v in rec.phases.items()}, "recovered_s": round(total, 4), **notes}
        self.records.append(doc)
        with open(self.path, "a") as f:
            f.write(json.dumps(doc) + "\n")
        _log.warning("recovered %s in %.2fs: %s", rec.failed, total, doc["phases"])
