"""Errors in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with the HTTP status a
client's library maps to the right exception (400 BadRequestError, 404 NotFoundError, 429 RateLimitError).

Every error the server answers goes through here: our own checks raise :class:`APIError`; FastAPI's
validation errors (invalid JSON, a field of the wrong type) become one 400 naming the field; an unknown
route or method keeps its status in the same shape; anything unexpected is a 500 that says so.
"""
from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dejavu_py import log

_log = log.get(__name__)

_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error",
          413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
          500: "server_error", 503: "service_unavailable_error"}  # fmt: skip

_UNION_FIELDS = {
    "prompt": "a string, a list of strings, a list of token ids, or a list of token-id lists",
    "stop": "a string or a list of strings",
    "content": "a string or a list of content parts",
    "tool_choice": "a string or an object",
}
"""What a field whose type is a union must be (pydantic reports one error per alternative)."""


class APIError(Exception):
    """An answer other than success: status, message, and OpenAI's type, param and code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        kind = _TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def _show(value: Any, limit: int = 40) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _path(loc: tuple[Any, ...]) -> str:
    """``("messages", 0, "content")`` -> ``messages[0].content``; pydantic's union tags are dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool")) and out:
            continue  # an alternative of a union, e.g. "list[int]"
        else:
            out += f".{part}" if out else str(part)
    return out


def from_validation(exc: RequestValidationError) -> APIError:
    """One 400 for FastAPI's validation errors: the first field at fault, named as the client wrote it."""
    errors = list(exc.errors())
    if not errors:
        return bad_request("the request body is not valid")
    first = errors[0]
    kind, loc = first.get("type", ""), tuple(first.get("loc", ()))
    if kind == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "not JSON")
        return bad_request(f"the request body is not valid JSON ({reason})")
    loc = loc[1:] if loc and loc[0] == "body" else loc
    if not loc:
        if kind == "missing":
            return bad_request("the request needs a JSON object body")
        return bad_request(f"the request body must be a JSON object, got {_show(first.get('input'))}")
    param = str(loc[0])
    path = _path(loc)
    same_field = [e for e in errors if tuple(e.get("loc", ()))[:2] == ("body", loc[0])]
    leaf = next((p for p in reversed(loc) if isinstance(p, str) and p in _UNION_FIELDS), None)
    if kind == "missing":
        message = f"field '{path}' is required"
    elif len(same_field) > 1 and leaf is not None:
        message = f"field '{_path(loc[: loc.index(leaf) + 1])}' must be {_UNION_FIELDS[leaf]}, got {_show(first.get('input'))}"
    else:
        message = f"field '{path}': {first.get('msg', 'invalid value')}, got {_show(first.get('input'))}"
    return bad_request(message, param)


def install(app: FastAPI) -> None:
    """Answer every error of ``app`` in OpenAI's shape."""

    async def on_api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        return exc.response()

    async def on_validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return from_validation(exc).response()

    async def on_http(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return APIError(exc.status_code, str(exc.detail), headers=dict(exc.headers or {})).response()

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        _log.exception("%s %s failed", request.method, request.url.path)
        return APIError(500, f"the server failed on this request ({type(exc).__name__}: {exc})").response()

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)
