"""The request journal: RUN_DIR/journal.jsonl, append-only and flushed as it goes.

It records, per attempt, which requests were accepted and, as each one finishes, its output record.
Running the same command again with the same --run-dir after the whole job died resumes: requests
already finished are not redone, the others are, and the output file ends complete. A journal written
for another request file or model is refused (use a fresh --run-dir).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from dejavu_py import log
from dejavu_py.errors import UserError

_log = log.get(__name__)

FSYNC_EVERY_S = 0.5


def fingerprint(requests_file: Path, model: Path) -> str:
    """What makes two runs the same job: the request file's bytes and the checkpoint's config."""
    h = hashlib.sha256(Path(requests_file).read_bytes())
    h.update((Path(model) / "config.json").read_bytes())
    return h.hexdigest()[:16]


class Journal:
    def __init__(self, path: Path, job: str) -> None:
        self.path = Path(path)
        self.job = job
        self.finished: dict[int, dict[str, Any]] = {}  # request line -> output record
        self.attempts = 0
        if self.path.exists():
            self._load()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")
        self._last_sync = time.monotonic()

    def _load(self) -> None:
        for n, raw in enumerate(self.path.read_text(encoding="utf-8").splitlines(), start=1):
            try:
                entry = json.loads(raw)
            except json.JSONDecodeError:  # a torn last line after a crash: everything before it counts
                _log.warning("%s line %d is incomplete; ignoring it", self.path, n)
                continue
            if entry.get("type") == "start":
                if entry.get("job") != self.job:
                    raise UserError(
                        f"{self.path}: this run directory holds the journal of another job (different request "
                        "file or model); give a new --run-dir, or delete the journal to start over"
                    )
                self.attempts += 1
            elif entry.get("type") == "finished":
                rec = entry["record"]
                self.finished[int(rec["line"])] = rec
        if self.finished:
            _log.info("%s: resuming attempt %d with %d requests already finished", self.path, self.attempts + 1,
                      len(self.finished))

    def start(self, accepted: list[tuple[int, str]]) -> None:
        self._append({"type": "start", "job": self.job, "time": time.time(), "attempt": self.attempts + 1})
        self._append({"type": "accepted", "requests": [[line, rid] for line, rid in accepted]})
        self._sync(force=True)

    def finish(self, record: dict[str, Any]) -> None:
        self.finished[int(record["line"])] = record
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
