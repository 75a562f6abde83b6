"""POST /v1/completions: text (or token ids) in, text out, one choice per prompt, whole or streamed."""
from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request

from dejavu_py.serve.context import ServeContext
from dejavu_py.serve.generation import Event
from dejavu_py.serve.params import check_request
from dejavu_py.serve.prompts import completion_prompts
from dejavu_py.serve.responses import choice, chunk_choice, chunks, collect, usage
from dejavu_py.serve.schemas import CompletionRequest
from dejavu_py.serve.streaming import event_stream, unless_disconnected

router = APIRouter()


@router.post("/v1/completions")
async def create_completion(body: CompletionRequest, request: Request) -> Any:
    ctx: ServeContext = request.app.state.serve
    ctx.check_model(body.model)
    check_request(body, ctx.defaults, ctx.info)
    prompts = completion_prompts(body.prompt, ctx.tokenizer, ctx.info)
    rid, gens = ctx.generations("cmpl", body, prompts, "prompt", echo=body.echo)
    ctx.admit(len(gens))
    head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": ctx.model_name}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return event_stream(chunks(head, gens, include_usage, lambda e: _chunk_choice(e, body.return_token_ids)))

    async def whole() -> dict[str, Any]:
        with_ids = body.return_token_ids
        choices = [choice(r, {"text": r.text, **({"prompt_token_ids": gens[r.index].prompt.ids} if with_ids else {})},
                          with_ids) for r in await collect(gens)]
        return {**head, "choices": choices, "usage": usage(gens)}

    return await unless_disconnected(request, whole())


def _chunk_choice(event: Event, with_ids: bool) -> dict[str, Any] | None:
    return chunk_choice(event, {"text": event.text}, with_ids)
