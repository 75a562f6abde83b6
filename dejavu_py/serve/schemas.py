"""The request bodies of /v1/completions and /v1/chat/completions, as OpenAI's API (and vLLM's extras
top_k, stop_token_ids, ignore_eos, include_stop_str_in_output, return_token_ids) define them.

Types are strict (a number given as a string is a 400, as with OpenAI). Ranges, lengths and the fields
this server refuses are checked by serve/params.py, which names the field in its 400. Fields nobody
defined are ignored with a warning in the log, as vLLM does.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Body):
    include_usage: bool = False
    """A last chunk with the usage of the whole request (and "usage": null in the others)."""
    continuous_usage_stats: bool = False
    """vLLM's usage in every chunk: accepted, not implemented (ignored)."""


class SamplingFields(_Body):
    """What both endpoints share."""

    model: str | None = None
    """Must be the served model's name; None = the served model (as vLLM allows)."""
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    """vLLM's extra (the openai client passes it through extra_body); 0 or -1 = off."""
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    return_token_ids: bool = False
    """vLLM's extra: each choice also gives "token_ids" (and the response "prompt_token_ids")."""
    user: str | None = None
    """Ignored (OpenAI uses it for abuse monitoring)."""
    # Refused unless left at their neutral value (serve/params.py): this engine cannot honour them.
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    min_tokens: int | None = None
    min_p: float | None = None
    skip_special_tokens: bool = True
    use_beam_search: bool = False
    prompt_logprobs: int | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    """Text, several texts (one choice each), token ids, or several token-id lists."""
    echo: bool = False
    """Each choice's text starts with its prompt."""
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class TextPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    """OpenAI's newer name for max_tokens; wins when both are given."""
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    """Extra variables for the chat template (vLLM's extra)."""
    logprobs: bool = False
    top_logprobs: int | None = None
    echo: bool = False
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    """Ignored (no tools)."""


def ignored_fields(body: BaseModel) -> list[str]:
    """Fields of a request that no model above defines (they are ignored)."""
    return sorted((body.model_extra or {}).keys())
