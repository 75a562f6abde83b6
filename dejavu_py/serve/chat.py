"""POST /v1/chat/completions: messages in (rendered by the checkpoint's chat template), one assistant
message out, whole or streamed (a first chunk with the role, then the content as it comes)."""
from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request

from dejavu_py.serve.api_errors import bad_request
from dejavu_py.serve.chat_template import message_dicts
from dejavu_py.serve.context import ServeContext
from dejavu_py.serve.generation import Event
from dejavu_py.serve.params import check_request, check_token_ids
from dejavu_py.serve.prompts import Prompt
from dejavu_py.serve.responses import choice, chunk_choice, chunks, collect, usage
from dejavu_py.serve.schemas import ChatCompletionRequest
from dejavu_py.serve.streaming import event_stream, unless_disconnected

router = APIRouter()


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Any:
    ctx: ServeContext = request.app.state.serve
    ctx.check_model(body.model)
    check_request(body, ctx.defaults, ctx.info)
    ids = await ctx.chat.render(message_dicts(body.messages), body.add_generation_prompt,
                                body.continue_final_message, body.chat_template_kwargs)
    if not ids:
        raise bad_request("field 'messages': the chat template renders them to no tokens", "messages")
    check_token_ids(ids, ctx.info, "messages")
    rid, gens = ctx.generations("chatcmpl", body, [Prompt(ids)], "messages")
    ctx.admit(len(gens))
    head = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": ctx.model_name}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return event_stream(chunks(head, gens, include_usage, lambda e: _chunk_choice(e, body.return_token_ids),
                                   first=[role]))

    async def whole() -> dict[str, Any]:
        (r,) = await collect(gens)
        message = {"message": {"role": "assistant", "content": r.text}}
        out = {**head, "object": "chat.completion", "choices": [choice(r, message, body.return_token_ids)],
               "usage": usage(gens)}
        if body.return_token_ids:
            out["prompt_token_ids"] = ids
        return out

    return await unless_disconnected(request, whole())


def _chunk_choice(event: Event, with_ids: bool) -> dict[str, Any] | None:
    return chunk_choice(event, {"delta": {"content": event.text} if event.text else {}}, with_ids)
