"""The request journal: RUN_DIR/journal.jsonl, append-only and flushed as it goes.

It records, per attempt, which requests were accepted and, as each one finishes, its output record,
keyed by the request's id. Running the same command again with the same --run-dir after the whole job
died resumes: requests already finished are not redone, the others are, and the output file ends
complete. A journal written for another request file or model is refused (use a fresh --run-dir):
:func:`check_job` says so before any worker starts.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dejavu_py import log
from dejavu_py.errors import UserError

_log = log.get(__name__)

FSYNC_EVERY_S = 0.5


def fingerprint(requests_file: Path | None, model: Path) -> str:
    """What makes two runs the same job: the request file's bytes (None: an online server's, whose
    requests come from its clients) and the checkpoint's config."""
    h = hashlib.sha256(b"online" if requests_file is None else Path(requests_file).read_bytes())
    h.update((Path(model) / "config.json").read_bytes())
    return h.hexdigest()[:16]


def _entries(path: Path, warn: bool = True) -> Iterator[dict[str, Any]]:
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            yield json.loads(raw)
        except json.JSONDecodeError:  # a torn last line after a crash: everything before it counts
            if warn:
                _log.warning("%s line %d is incomplete; ignoring it", path, n)


def _other_job(path: Path) -> UserError:
    run_dir = path.parent
    return UserError(
        f"run directory {run_dir} holds the journal of another job (a different request file or model); "
        f"give another --run-dir, or delete {run_dir} to start over"
    )


def check_job(path: Path, job: str) -> None:
    """Raise UserError when the journal at ``path`` belongs to another job: found before any worker
    starts, instead of once they all loaded their weights."""
    path = Path(path)
    if not path.exists():
        return
    for entry in _entries(path, warn=False):  # the journal's loading says it
        if entry.get("type") == "start" and entry.get("job") != job:
            raise _other_job(path)


class Journal:
    def __init__(self, path: Path, job: str, requests: bool = True) -> None:
        """``requests`` False (an online server): requests are neither recorded nor answered from an
        earlier attempt (their clients are gone with it, and a server's ids may repeat); only the
        run's events are noted."""
        self.path = Path(path)
        self.job = job
        self.requests = requests
        self.finished: dict[str, dict[str, Any]] = {}  # request id -> output record
        self.attempts = 0
        if self.path.exists():
            self._load()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")
        self._last_sync = time.monotonic()

    def _load(self) -> None:
        for entry in _entries(self.path):
            if entry.get("type") == "start":
                if entry.get("job") != self.job:
                    raise _other_job(self.path)
                self.attempts += 1
            elif entry.get("type") == "finished" and self.requests:
                rec = entry["record"]
                self.finished[str(rec["id"])] = rec
        if self.finished:
            _log.info("%s: resuming attempt %d with %d requests already finished", self.path, self.attempts + 1,
                      len(self.finished))

    def start(self) -> None:
        self._append({"type": "start", "job": self.job, "time": time.time(), "attempt": self.attempts + 1})
        self._sync(force=True)

    def accept(self, request_ids: list[str]) -> None:
        """Requests that arrived and will be served (not flushed to disk at once: a crash before their
        record only means they are served again)."""
        if not self.requests:
            return
        self._append({"type": "accepted", "ids": list(request_ids)})
        self._sync()

    def finish(self, record: dict[str, Any]) -> None:
        """A request's output record; a rerun answers its id with it instead of serving it again."""
        if not isinstance(record.get("id"), str):
            raise TypeError(f"journal records need a string 'id' (a request's): {record!r:.200}")
        if not self.requests:
            return
        self.finished[record["id"]] = record
        self._append({"type": "finished", "record": record})
        self._sync()

    def note(self, kind: str, **fields: Any) -> None:
        """Other events worth keeping with the job (failures, recoveries)."""
        self._append({"type": kind, "time": time.time(), **fields})
        self._sync(force=True)

    def _append(self, entry: dict[str, Any]) -> None:
        self._f.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._f.flush()  # survives the death of this process; fsync below survives the machine's

    def _sync(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_sync > FSYNC_EVERY_S:
            os.fsync(self._f.fileno())
            self._last_sync = now

    def close(self) -> None:
        self._sync(force=True)
        self._f.close()
