"""From a request body to what the coordinator gets (``Submit``), with every check a client can fail
answered as a 400 that names the field.

Sampling ranges are the ones every front-end shares (protocol/sampling.py). Fields this engine cannot
honour (penalties, logit bias, log probabilities, beam search, tools, ...) are refused with a 400 unless
left at their neutral value: a silently ignored penalty would change the output without telling. ``user``
and ``parallel_tool_calls`` are ignored; unknown fields are logged and ignored, as vLLM does.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dejavu_py import log
from dejavu_py.protocol.sampling import expected_if_invalid
from dejavu_py.protocol.serving import ServerInfo, Submit
from dejavu_py.serve.api_errors import bad_request
from dejavu_py.serve.schemas import (
    ChatCompletionRequest,
    SamplingFields,
    ignored_fields,
)

_log = log.get(__name__)

_Neutral = Callable[[Any], bool]
_COMMON_REFUSED: dict[str, tuple[_Neutral, str]] = {
    "presence_penalty": (lambda v: v in (None, 0), "presence penalties"),
    "frequency_penalty": (lambda v: v in (None, 0), "frequency penalties"),
    "repetition_penalty": (lambda v: v in (None, 1), "repetition penalties"),
    "logit_bias": (lambda v: not v, "logit biases"),
    "min_tokens": (lambda v: v in (None, 0), "a minimum number of tokens"),
    "min_p": (lambda v: v in (None, 0), "min_p sampling"),
    "skip_special_tokens": (lambda v: v is True, "showing special tokens"),
    "use_beam_search": (lambda v: v is False, "beam search"),
    "prompt_logprobs": (lambda v: v is None, "prompt log probabilities"),
}
_COMPLETION_REFUSED: dict[str, tuple[_Neutral, str]] = {
    "logprobs": (lambda v: v is None, "log probabilities"),
    "best_of": (lambda v: v in (None, 1), "best_of other than 1"),
    "suffix": (lambda v: v is None, "a suffix"),
}
_CHAT_REFUSED: dict[str, tuple[_Neutral, str]] = {
    "logprobs": (lambda v: v is False, "log probabilities"),
    "top_logprobs": (lambda v: v in (None, 0), "log probabilities"),
    "echo": (lambda v: v is False, "echo in chat"),
    "response_format": (lambda v: v is None or v.get("type") == "text", "structured output (response_format)"),
    "tools": (lambda v: not v, "tools"),
    "tool_choice": (lambda v: v in (None, "none", "auto"), "forcing a tool call"),
}


@dataclass(frozen=True)
class SamplingDefaults:
    """Sampling of a request that leaves a field out."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


def sampling_defaults(ckpt_dir: Path, temperature: float) -> SamplingDefaults:
    """OpenAI's defaults, overridden by the checkpoint's generation_config.json where it sets
    temperature, top_p or top_k (as vLLM does): the model's authors chose them."""
    values: dict[str, Any] = {"temperature": temperature}
    path = Path(ckpt_dir) / "generation_config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        _log.warning("%s: not readable (%s); using OpenAI's sampling defaults", path, e)
        cfg = {}
    for name in ("temperature", "top_p", "top_k"):
        if isinstance(cfg, dict) and name in cfg and expected_if_invalid(name, cfg[name]) is None:
            values[name] = cfg[name]
    return SamplingDefaults(**values)


def refuse_unsupported(body: SamplingFields) -> None:
    """400 for a field this server cannot honour; a log line for fields nobody defines."""
    table = {**_COMMON_REFUSED, **(_CHAT_REFUSED if isinstance(body, ChatCompletionRequest) else _COMPLETION_REFUSED)}
    for name, (neutral, what) in table.items():
        if not neutral(getattr(body, name, None)):
            raise bad_request(f"field '{name}': this server does not support {what}; leave the field out", name)
    extra = ignored_fields(body)
    if extra:
        _log.warning("ignored request fields: %s", ", ".join(extra))
    if body.n != 1:
        raise bad_request(f"field 'n': only n=1 is supported (one choice per prompt), got {body.n}", "n")


def requested_max_tokens(body: SamplingFields) -> tuple[int | None, str]:
    """The output limit a request asks for and the field it came from (max_completion_tokens wins)."""
    if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
        value, name = body.max_completion_tokens, "max_completion_tokens"
    else:
        value, name = body.max_tokens, "max_tokens"
    if value is not None and value < 1:
        raise bad_request(f"field '{name}': must be at least 1, got {value}", name)
    return value, name


def stop_strings(body: SamplingFields) -> list[str]:
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if any(s == "" for s in stops):
        raise bad_request("field 'stop': a stop string must not be empty", "stop")
    return stops


def _sampling(body: SamplingFields, defaults: SamplingDefaults) -> dict[str, Any]:
    top_k = body.top_k
    values = {
        "temperature": defaults.temperature if body.temperature is None else body.temperature,
        "top_p": defaults.top_p if body.top_p is None else body.top_p,
        "top_k": defaults.top_k if top_k is None else (0 if top_k == -1 else top_k),
    }
    for name, value in values.items():
        expected = expected_if_invalid(name, value)
        if expected is not None:
            raise bad_request(f"field '{name}': must be {expected}, got {value!r}", name)
    if body.seed is not None:
        expected = expected_if_invalid("seed", body.seed)
        if expected is not None:
            raise bad_request(f"field 'seed': must be {expected}, got {body.seed}", "seed")
    return values


def check_token_ids(ids: list[int], info: ServerInfo, param: str) -> None:
    for i, t in enumerate(ids):
        if not 0 <= t < info.vocab_size:
            raise bad_request(f"field '{param}': token {t} (item {i}) is outside the vocabulary [0, {info.vocab_size})", param)


def build_submit(request_id: str, prompt_ids: list[int], max_tokens: int, body: SamplingFields,
                 defaults: SamplingDefaults, info: ServerInfo) -> Submit:
    """The coordinator's request; the caller has checked the prompt and the length."""
    stop_ids = tuple(body.stop_token_ids or ())
    check_token_ids(list(stop_ids), info, "stop_token_ids")
    return Submit(request_id=request_id, prompt_ids=list(prompt_ids), max_tokens=max_tokens,
                  seed=body.seed, stop_token_ids=stop_ids, ignore_eos=body.ignore_eos, **_sampling(body, defaults))


def check_request(body: SamplingFields, defaults: SamplingDefaults, info: ServerInfo) -> None:
    """Every check that does not depend on the prompt, before any tokenizing."""
    refuse_unsupported(body)
    requested_max_tokens(body)
    stop_strings(body)
    _sampling(body, defaults)
    check_token_ids(list(body.stop_token_ids or ()), info, "stop_token_ids")


def fit_max_tokens(prompt_len: int, body: SamplingFields, info: ServerInfo, prompt_param: str) -> int:
    """The output limit for a prompt of ``prompt_len`` tokens, or a 400 when prompt and output do not fit."""
    requested, _ = requested_max_tokens(body)
    if prompt_len > info.max_prompt_tokens:
        raise bad_request(f"the prompt has {prompt_len} tokens, more than the {info.max_prompt_tokens} this server's "
                          "KV cache takes for one sequence; shorten the prompt", prompt_param, "context_length_exceeded")
    room = info.max_model_len - prompt_len
    if requested is None:
        if room < 1:
            raise bad_request(f"This model's maximum context length is {info.max_model_len} tokens and the prompt "
                              f"has {prompt_len}: no room for output; shorten the prompt", prompt_param,
                              "context_length_exceeded")
        return min(info.default_max_tokens, room)
    if requested > room:
        raise bad_request(f"This model's maximum context length is {info.max_model_len} tokens. However, you requested "
                          f"{prompt_len + requested} tokens ({prompt_len} in the {prompt_param}, {requested} in the "
                          f"completion). Please reduce the length of the {prompt_param} or completion.", prompt_param,
                          "context_length_exceeded")
    return requested
