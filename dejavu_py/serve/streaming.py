"""Server-sent events and client disconnects: several choices merged into one event stream, the SSE
framing ("data: {json}" lines, then "data: [DONE]"), and a non-streaming request dropped, and its
requests cancelled, as soon as its client goes away.

A streaming response's generator is cancelled by the framework when the client disconnects (or closed
when a write fails); every Generation cancels its request from its ``finally``, so nothing here has to
notice the disconnect for streams.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from dejavu_py import log
from dejavu_py.serve.generation import Event, Generation

_log = log.get(__name__)

DONE = "data: [DONE]\n\n"
T = TypeVar("T")


def sse(payload: dict[str, Any]) -> str:
    """One server-sent event carrying ``payload`` as JSON."""
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def event_stream(body: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def merged(gens: list[Generation]) -> AsyncIterator[Event]:
    """The events of every choice as they come; leaving early cancels every choice still running."""
    if len(gens) == 1:
        async with aclosing(gens[0].events()) as events:
            async for event in events:
                yield event
        return
    queue: asyncio.Queue[Event | BaseException | None] = asyncio.Queue()

    async def pump(gen: Generation) -> None:
        try:
            async with aclosing(gen.events()) as events:
                async for event in events:
                    queue.put_nowait(event)
            queue.put_nowait(None)
        except Exception as e:  # the choice failed: the response fails with it
            queue.put_nowait(e)

    tasks = [asyncio.create_task(pump(g)) for g in gens]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T | Response:
    """``work``'s result, or, once the client has gone, cancel it (its requests are cancelled) and
    answer nothing anyone will read."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this handler was cancelled (the server is stopping)
        task.cancel()
        raise
    finally:
        watch.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    _log.info("client of %s went away; its request is cancelled", request.url.path)
    return Response(status_code=499)
