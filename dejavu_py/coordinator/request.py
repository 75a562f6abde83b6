"""The request file: JSONL, one request per line, checked line by line.

A line looks like::

    {"id": "q1", "prompt": "Hello", "max_new_tokens": 32, "temperature": 0.7, "top_p": 0.9, "seed": 7}

A bad line becomes a :class:`RequestError` for that line alone (the run answers it with an error
record); only whole-file problems (missing, unreadable, not UTF-8, empty) raise :class:`UserError`.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dejavu_py import log
from dejavu_py.errors import UserError
from dejavu_py.protocol.sampling import (
    SamplingParams,
    expected_if_invalid,
    is_int,
    is_number,
)

if TYPE_CHECKING:
    from dejavu_py.tokenizer import Tokenizer

_log = log.get(__name__)


KNOWN_FIELDS = (
    "id",
    "input_ids",
    "prompt",
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop_token_ids",
    "ignore_eos",
    "arrival_s",
)

_EXAMPLE = '{"id": "q1", "prompt": "Hello", "max_new_tokens": 16}'


@dataclass
class Request:
    """One checked request, ready for the scheduler. Its id identifies it everywhere (journal, output
    sink, an online client's stream); ``line`` only says where a request file had it."""

    id: str
    """The request's id, unique in its source (integer ids are turned into strings)."""
    input_ids: list[int]
    """Prompt tokens, all in the model's vocabulary; never empty."""
    max_new_tokens: int
    """Tokens to generate at most, already clamped so that the sequence fits the model and the KV cache."""
    sampling: SamplingParams
    """Sampling parameters; the seed is always set (given, or derived from the run seed and the id)."""
    stop_token_ids: tuple[int, ...] = ()
    """Generation stops (finish_reason "stop") after emitting one of these."""
    ignore_eos: bool = False
    """Generation goes on past the model's end-of-sequence ids (its own ``stop_token_ids`` still end it)."""
    prompt: str | None = None
    """The prompt text when the request gave one (input_ids are then its encoding)."""
    max_new_tokens_requested: int | None = None
    """max_new_tokens before clamping (same as max_new_tokens when not clamped)."""
    arrival_s: float = 0.0
    """Seconds after the pipeline starts serving at which the request arrives (open-loop traces)."""
    line: int | None = None
    """1-based physical line of the request file (orders the output file); None for a request that
    came from no file."""

    def __post_init__(self) -> None:
        if self.max_new_tokens_requested is None:
            self.max_new_tokens_requested = self.max_new_tokens

    @property
    def clamped(self) -> bool:
        """True when max_new_tokens was lowered to fit the model or the cache."""
        return self.max_new_tokens < (self.max_new_tokens_requested or 0)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class RequestError:
    """A request line that could not be used; the run answers it with an error record."""

    line: int
    """1-based physical line of the request file."""
    id: str | None
    """The line's id when it had a usable one, else None."""
    message: str
    """What is wrong and what to change, one line."""
    source: str = ""
    """The request file's name as the user gave it (prefix of ``str()``)."""

    def __str__(self) -> str:
        where = f"{self.source} line {self.line}" if self.source else f"line {self.line}"
        return f"{where}: {self.message}"


@dataclass(frozen=True)
class RequestLimits:
    """What the model, the cache and the run allow; defaults for absent fields."""

    vocab_size: int
    """Token ids must be in [0, vocab_size)."""
    max_model_len: int
    """Longest sequence (prompt + generated) the model may see: max_position_embeddings or a user cap."""
    kv_capacity_tokens: int
    """Tokens of KV cache a single sequence may use."""
    default_max_new_tokens: int
    """max_new_tokens of a request that gives none."""
    run_seed: int = 0
    """The run's seed: a request without "seed" gets ``derive_seed(run_seed, id)``."""

    @property
    def longest(self) -> int:
        """The longest sequence (prompt + generated) a request may make."""
        return _length_limit(self)[0]


def derive_seed(run_seed: int, request_id: str) -> int:
    """A stable 63-bit seed from the run seed and a request id (same on every machine and run)."""
    digest = hashlib.sha256(f"dejavu-seed:{int(run_seed)}:{request_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class _LineError(Exception):
    """A problem of one request line (internal: becomes a RequestError)."""


def _show(v: Any, limit: int = 60) -> str:
    """A value as the user wrote it in JSON, shortened."""
    try:
        s = json.dumps(v, ensure_ascii=False)
    except (TypeError, ValueError):
        s = repr(v)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _bad(name: str, expected: str, got: Any) -> _LineError:
    return _LineError(f"field '{name}': expected {expected}, got {_show(got)}")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _LineError(f"field '{k}' is given twice")
        out[k] = v
    return out


def _parse_json(text: str) -> dict[str, Any]:
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise _LineError(f"invalid JSON: {e.msg} at column {e.colno}; each line must be one JSON object, e.g. {_EXAMPLE}")
    if not isinstance(obj, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(obj), "a number")
        raise _LineError(f"expected a JSON object like {_EXAMPLE}, got {kind}")
    return obj


def _check_fields(obj: dict[str, Any]) -> None:
    for key in obj:
        if key not in KNOWN_FIELDS:
            close = difflib.get_close_matches(key, KNOWN_FIELDS, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise _LineError(f"unknown field '{key}'; {hint}known fields: {', '.join(KNOWN_FIELDS)}")


def _parse_id(obj: dict[str, Any]) -> str:
    if "id" not in obj:
        raise _LineError("field 'id' is missing; every request needs a unique string or integer id")
    v = obj["id"]
    if is_int(v):
        return str(v)
    if isinstance(v, str) and v:
        return v
    raise _bad("id", "a non-empty string or an integer", v)


def _token_list(name: str, v: Any, vocab_size: int, allow_empty: bool) -> list[int]:
    what = "a list of token ids" if allow_empty else "a non-empty list of token ids"
    if not isinstance(v, list) or (not v and not allow_empty):
        raise _bad(name, what, v)
    for i, t in enumerate(v):
        if not is_int(t):
            raise _LineError(f"field '{name}': item {i} is {_show(t)}, expected an integer token id")
        if not 0 <= t < vocab_size:
            raise _LineError(f"field '{name}': item {i} is {t}, outside the vocabulary [0, {vocab_size})")
    return list(v)


def _parse_input_ids(obj: dict[str, Any], vocab_size: int, tokenizer: Tokenizer | None) -> tuple[list[int], str | None]:
    has_ids, has_prompt = "input_ids" in obj, "prompt" in obj
    if has_ids == has_prompt:
        which = "both" if has_ids else "neither"
        raise _LineError(f"give exactly one of 'input_ids' (token ids) or 'prompt' (text), got {which}")
    if has_ids:
        return _token_list("input_ids", obj["input_ids"], vocab_size, allow_empty=False), None
    prompt = obj["prompt"]
    if not isinstance(prompt, str):
        raise _bad("prompt", "a string", prompt)
    if tokenizer is None:
        raise _LineError("field 'prompt': this checkpoint has no tokenizer.json; give 'input_ids' instead")
    ids = tokenizer.encode(prompt)
    if not ids:
        raise _LineError("field 'prompt': the text encodes to no tokens; give a non-empty prompt")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise _LineError(
            f"field 'prompt': the tokenizer gives token {bad[0]}, outside the model's vocabulary [0, {vocab_size})"
        )
    return ids, prompt


def _parse_sampling(obj: dict[str, Any], seed: int) -> SamplingParams:
    values = {"temperature": obj.get("temperature", 0.0), "top_p": obj.get("top_p", 1.0),
              "top_k": obj.get("top_k", 0), "seed": seed}
    for name, value in values.items():
        expected = expected_if_invalid(name, value)
        if expected is not None:
            raise _bad(name, expected, value)
    return SamplingParams(**values)


def _parse_max_new_tokens(obj: dict[str, Any], default: int) -> int:
    v = obj.get("max_new_tokens", default)
    if not is_int(v) or v < 1:
        raise _bad("max_new_tokens", "a positive integer", v)
    return v


def _parse_ignore_eos(obj: dict[str, Any]) -> bool:
    v = obj.get("ignore_eos", False)
    if not isinstance(v, bool):
        raise _bad("ignore_eos", "true or false", v)
    return v


def _parse_arrival(obj: dict[str, Any]) -> float:
    v = obj.get("arrival_s", 0.0)
    if not is_number(v) or not math.isfinite(v) or v < 0:
        raise _bad("arrival_s", "a number of seconds >= 0", v)
    return float(v)


def _length_limit(limits: RequestLimits) -> tuple[int, str]:
    """The longest sequence allowed and a phrase saying what sets it."""
    if limits.max_model_len <= limits.kv_capacity_tokens:
        return limits.max_model_len, f"the model's maximum length ({limits.max_model_len} tokens)"
    cap = limits.kv_capacity_tokens
    return cap, f"the KV cache capacity per sequence ({cap} tokens; give the cache more memory or shorten the prompt)"


def _parse_line(obj: dict[str, Any], rid: str, line: int, limits: RequestLimits, tok: Tokenizer | None) -> Request:
    input_ids, prompt = _parse_input_ids(obj, limits.vocab_size, tok)
    requested = _parse_max_new_tokens(obj, limits.default_max_new_tokens)
    seed = obj.get("seed", derive_seed(limits.run_seed, rid))
    sampling = _parse_sampling(obj, seed)
    stop = tuple(_token_list("stop_token_ids", obj.get("stop_token_ids", []), limits.vocab_size, allow_empty=True))
    limit, what = _length_limit(limits)
    n = len(input_ids)
    if n + 1 > limit:
        raise _LineError(f"prompt has {n} tokens; with one new token it needs {n + 1}, more than {what}")
    return Request(
        id=rid,
        input_ids=input_ids,
        max_new_tokens=min(requested, limit - n),
        sampling=sampling,
        stop_token_ids=stop,
        ignore_eos=_parse_ignore_eos(obj),
        prompt=prompt,
        max_new_tokens_requested=requested,
        arrival_s=_parse_arrival(obj),
        line=line,
    )


def online_request(rid: str, fields: dict[str, Any], limits: RequestLimits) -> Request:
    """A request an online client sent, checked and clamped exactly as a request file's line
    (``fields``: that line's fields, ``input_ids`` given); raises ValueError saying what is wrong."""
    if not isinstance(rid, str) or not rid:
        raise ValueError(f"request id {_show(rid)}: expected a non-empty string")
    try:
        _check_fields(fields)
        return _parse_line(fields, rid, None, limits, None)
    except _LineError as e:
        raise ValueError(f"request {rid}: {e}") from None


def _read_text(path: Path) -> str:
    name = f"requests file {path}"
    if not path.exists():
        raise UserError(f"{name}: no such file")
    if path.is_dir():
        raise UserError(f"{name}: is a directory; give a JSONL file with one request per line")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{name}: cannot read it ({e.strerror or e})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(f"{name}: not UTF-8 text (invalid byte 0x{data[e.start]:02x} on line {line}); save it as UTF-8") from None


def load_requests(
    path: Path, limits: RequestLimits, tokenizer: Tokenizer | None
) -> tuple[list[Request], list[RequestError]]:
    """Read and check a request file: the good requests and one error per bad line, each in line order."""
    path = Path(path)
    text = _read_text(path)
    source = str(path)
    requests: list[Request] = []
    errors: list[RequestError] = []
    first_line_of: dict[str, int] = {}
    n_lines = 0
    for lineno, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        n_lines += 1
        rid: str | None = None
        try:
            obj = _parse_json(raw)
            _check_fields(obj)
            rid = _parse_id(obj)
            if rid in first_line_of:
                raise _LineError(f"duplicate id {_show(rid)}: line {first_line_of[rid]} already has it")
            first_line_of[rid] = lineno
            requests.append(_parse_line(obj, rid, lineno, limits, tokenizer))
        except _LineError as e:
            errors.append(RequestError(line=lineno, id=rid, message=str(e), source=source))
    if n_lines == 0:
        raise UserError(f"requests file {path}: no requests (every line is blank); write one JSON object per line, e.g. {_EXAMPLE}")
    clamped = sum(r.clamped for r in requests)
    _log.info(
        "%s: %d requests, %d bad lines, %d with max_new_tokens clamped to fit", source, len(requests), len(errors), clamped
    )
    return requests, errors
