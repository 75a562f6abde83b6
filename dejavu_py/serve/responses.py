"""What both endpoints answer, whatever their choice looks like: a whole response once every choice has
ended, or a stream of chunks as text comes, a usage chunk when asked, then ``data: [DONE]``.

An engine failure before the response starts is an error status; once a stream has started it is an
error event in the stream (as vLLM sends it), still followed by ``[DONE]``.
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from dejavu_py.serve.api_errors import APIError
from dejavu_py.serve.engine_client import LINK_GONE, EngineRequestError
from dejavu_py.serve.generation import Event, Generation
from dejavu_py.serve.streaming import DONE, merged, sse


def usage(gens: list[Generation]) -> dict[str, int]:
    prompt = sum(g.prompt_tokens for g in gens)
    completion = sum(len(g.output_ids) for g in gens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def engine_error(e: EngineRequestError) -> APIError:
    if str(e) == LINK_GONE:
        return APIError(503, f"the engine is gone: {e}", code="engine_unavailable")
    return APIError(500, f"the engine could not finish the request: {e}", code="engine_error")


def choice(event: Event, content: dict[str, Any], with_ids: bool) -> dict[str, Any]:
    """A choice of a whole response or of a chunk, as both endpoints shape it; ``content`` is the
    endpoint's text field (completions' "text", chat's "message" or "delta")."""
    out: dict[str, Any] = {"index": event.index, **content, "logprobs": None, "finish_reason": event.finish_reason,
                           "stop_reason": event.stop_reason}
    if with_ids:
        out["token_ids"] = event.token_ids
    return out


def chunk_choice(event: Event, content: dict[str, Any], with_ids: bool) -> dict[str, Any] | None:
    """A chunk's choice, or None when the event shows nothing (no text, no end, no ids asked for)."""
    if not event.text and event.finish_reason is None and not (with_ids and event.token_ids):
        return None
    return choice(event, content, with_ids)


async def collect(gens: list[Generation]) -> list[Event]:
    """Every choice, whole (one event each: all its text and ids, and its end), in index order."""
    results = [Event(g.index) for g in gens]
    try:
        async for e in merged(gens):
            r = results[e.index]
            r.text += e.text
            r.token_ids += e.token_ids
            if e.finish_reason is not None:
                r.finish_reason, r.stop_reason = e.finish_reason, e.stop_reason
    except EngineRequestError as e:
        raise engine_error(e) from None
    return results


ChunkChoice = Callable[[Event], "dict[str, Any] | None"]
"""An event as a chunk's choice, or None when the event shows nothing."""


async def chunks(head: dict[str, Any], gens: list[Generation], include_usage: bool, choice_of: ChunkChoice,
                 first: list[dict[str, Any]] | None = None) -> AsyncIterator[str]:
    """The SSE lines of a streaming response; ``first`` are choices sent before any text (chat's role)."""
    extra = {"usage": None} if include_usage else {}
    try:
        for c in first or []:
            yield sse({**head, "choices": [c], **extra})
        async for event in merged(gens):
            c = choice_of(event)
            if c is not None:
                yield sse({**head, "choices": [c], **extra})
        if include_usage:
            yield sse({**head, "choices": [], "usage": usage(gens)})
    except EngineRequestError as e:
        yield sse(engine_error(e).body())
    yield DONE
