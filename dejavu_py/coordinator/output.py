"""The output file: one JSON record per request line, in the request file's line order.

Success::

    {"line": 1, "id": "q1", "output_ids": [5, 9, 2], "text": "...", "finish_reason": "stop",
     "num_prompt_tokens": 7, "timings": {"queued_s": 0.01, "first_token_s": 0.2, "total_s": 0.9}}

("text" only when the checkpoint has a tokenizer; "text_note" beside it says why the text leaves out
some ids, e.g. ids outside the tokenizer's vocabulary.) Failure::

    {"line": 3, "id": "q3", "error": "requests.jsonl line 3: field 'top_p': expected ..."}

"id" identifies the request; "line" is its 1-based line in the request file: the output file's sort
key, and the way back to a line whose id could not be read (its "id" is null).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from dejavu_py import log
from dejavu_py.errors import UserError

if TYPE_CHECKING:
    from dejavu_py.coordinator.request import Request, RequestError
    from dejavu_py.coordinator.sequence import Sequence as Seq
    from dejavu_py.tokenizer import Tokenizer

_log = log.get(__name__)

FINISH_REASONS = ("stop", "length", "abort")
"""Why generation ended: a stop id, the length limit, or its client cancelled it (online serving)."""


@dataclass(frozen=True)
class Timings:
    """Seconds from the request's arrival (the run's start for a request file) to each event."""

    queued_s: float
    """Until the request was admitted to a batch (its prefill began)."""
    first_token_s: float
    """Until its first generated token was known."""
    total_s: float
    """Until it finished."""

    def as_dict(self) -> dict[str, float]:
        return {"queued_s": _sec(self.queued_s), "first_token_s": _sec(self.first_token_s), "total_s": _sec(self.total_s)}


def _sec(x: float) -> float:
    x = float(x)
    if not math.isfinite(x) or x < 0:
        raise ValueError(f"a timing must be a finite number of seconds >= 0, got {x!r}")
    return round(x, 6)


def success_record(
    request: Request,
    output_ids: Sequence[int],
    finish_reason: str,
    timings: Timings,
    tokenizer: Tokenizer | None = None,
    extra_timings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The record of a request that generated ``output_ids``; "text" is added when a tokenizer is given;
    ``extra_timings`` (e.g. the KV transfer of a disaggregated prefill) join "timings"."""
    if finish_reason not in FINISH_REASONS:
        raise ValueError(f"finish_reason must be one of {FINISH_REASONS}, got {finish_reason!r}")
    ids = [int(t) for t in output_ids]
    rec: dict[str, Any] = {"line": request.line, "id": request.id, "output_ids": ids}
    if tokenizer is not None:
        rec.update(decode_text(ids, tokenizer))
    rec["finish_reason"] = finish_reason
    rec["num_prompt_tokens"] = len(request.input_ids)
    rec["timings"] = {**timings.as_dict(), **(extra_timings or {})}
    return rec


_warned: set[str] = set()
"""Text problems already warned of in this process (a run warns once of each, not per request)."""


def decode_text(ids: Sequence[int], tokenizer: Tokenizer) -> dict[str, str]:
    """{"text"} of ``ids``, with "text_note" when some ids have no token in the tokenizer (a tokenizer
    smaller than the model's vocabulary): those are left out of the text, and the note says so."""
    size = tokenizer.vocab_size
    known = [t for t in ids if 0 <= t < size]
    out = {"text": tokenizer.decode(known)}
    missing = len(ids) - len(known)
    if missing:
        out["text_note"] = (f"{missing} of the output ids are outside the tokenizer's vocabulary ({size} tokens): "
                            "the text leaves them out")
        _warn_once("vocab", f"some output ids are outside the tokenizer's vocabulary ({size} tokens), so their "
                            "text is left out (see text_note); give the checkpoint a tokenizer that covers the "
                            "model's vocab_size")
    return out


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        _log.warning("%s", message)


def sequence_record(seq: Seq, tokenizer: Tokenizer | None = None) -> dict[str, Any]:
    """The record of a finished sequence, its timings counted from its arrival."""
    t0 = seq.t_arrival
    timings = Timings(
        queued_s=max((seq.t_admitted or t0) - t0, 0.0),
        first_token_s=max((seq.t_first_token or t0) - t0, 0.0),
        total_s=max((seq.t_finish or t0) - t0, 0.0),
    )
    extra = None
    if seq.t_kv_ready is not None:
        extra = {
            "kv_bytes": seq.kv_bytes,
            "kv_transfer_s": round(seq.t_kv_ready - (seq.t_admitted or t0), 6),
            "kv_after_prefill_s": round(max(seq.t_kv_ready - (seq.t_prefilled or t0), 0.0), 6),
        }
    return success_record(seq.request, seq.output_ids, seq.finish_reason or "length", timings, tokenizer, extra)


def error_record(line: int | None, request_id: str | None, error: str) -> dict[str, Any]:
    """The record of a request that failed (a bad line, or a request the run could not finish);
    ``line`` is None for a request that came from no file."""
    return {"line": None if line is None else int(line), "id": request_id, "error": str(error)}


def request_error_record(err: RequestError) -> dict[str, Any]:
    """The record of a bad request line; the message names the file and the line."""
    return error_record(err.line, err.id, str(err))


def _line_of(rec: dict[str, Any]) -> int:
    line = rec.get("line")
    if not isinstance(line, int) or isinstance(line, bool):
        raise ValueError(f"output record without an integer 'line' (use the builders of this module): {rec!r:.200}")
    return line


def write_outputs(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """Write ``records`` as JSONL sorted by line, atomically (temp file beside it, then os.replace)."""
    path = Path(path)
    ordered = sorted(records, key=_line_of)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise UserError(f"output file {path}: cannot create it ({e.strerror or e}); choose a writable path") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise UserError(f"output file {path}: cannot write it ({e.strerror or e}); choose a writable path") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _log.info("wrote %d records to %s", len(ordered), path)


def read_outputs(path: Path) -> list[dict[str, Any]]:
    """The records of an output file, in file order (blank lines skipped)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"output file {path}: cannot read it ({e})") from None
    out: list[dict[str, Any]] = []
    for lineno, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError as e:
            raise UserError(f"output file {path} line {lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict):
            raise UserError(f"output file {path} line {lineno}: expected a JSON object")
        out.append(rec)
    return out
