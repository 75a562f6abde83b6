"""The FastAPI application: the OpenAI endpoints (serve/completions.py, serve/chat.py) and the
operational ones: /health (200 while the engine serves, else 503), /v1/models, /version, /metrics."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from dejavu_py import __version__
from dejavu_py.serve import api_errors, chat, completions
from dejavu_py.serve.context import ServeContext


def build_app(ctx: ServeContext) -> FastAPI:
    """The server over ``ctx``; the engine client is bound to the app's event loop when it starts."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        ctx.engine.attach(asyncio.get_running_loop())
        yield

    app = FastAPI(title="dejavu_py", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.serve = ctx
    api_errors.install(app)
    app.include_router(completions.router)
    app.include_router(chat.router)

    @app.get("/health")
    async def health() -> JSONResponse:
        state = ctx.engine.state
        body = {"serving": ctx.engine.serving, "recovering": bool(state and state.recovering)}
        if ctx.engine.serving:
            return JSONResponse(body)
        headers = {"Retry-After": str(ctx.config.retry_after_s)}
        return JSONResponse({**body, **api_errors.APIError(503, "the engine is not serving").body()}, 503, headers)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": ctx.model_name, "object": "model", "created": ctx.created, "owned_by": "dejavu_py",
                "root": ctx.info.model, "parent": None, "max_model_len": ctx.info.max_model_len}
        return {"object": "list", "data": [card]}

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics(_: Request) -> Response:
        return Response(ctx.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return app
