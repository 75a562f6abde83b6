"""The front-end's end of the link to the coordinator, for asyncio: submit a request and read its tokens
as an async iterator, cancel it, and see the engine's latest state.

The link's reader thread hands every message to the event loop (``call_soon_threadsafe``); each request
has its own asyncio queue. Token messages carry the index of their first token: a token whose index was
already delivered is dropped (the coordinator may send it twice, after a recovery or a reconnect), and a
token after a gap waits until the gap is filled, so every token is delivered exactly once, in order.
A request's ``Finished`` record lists all its output ids and fills any gap left.

When the link drops, the coordinator cancels nothing: a link's requests go on being served without
it. The client connects again for ``reconnect_s`` and submits its open requests again (same ids, same
seeds); the coordinator re-attaches each one it still holds, ended ones included, to the new link and
streams it there again from its first token (those already delivered are dropped by index), so nothing
is served twice. If no coordinator comes back, every open request fails and ``on_gone`` is called (the
process exits).
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dejavu_py import log
from dejavu_py.comm.local_link import Link, LinkAddress, connect
from dejavu_py.protocol.serving import (
    Cancel,
    EngineState,
    Finished,
    ServerInfo,
    Submit,
    Tokens,
)

_log = log.get(__name__)

LINK_GONE = "the link to the coordinator closed and did not come back"


class EngineRequestError(Exception):
    """The coordinator could not finish a request (its record was an error, or the link is gone)."""


@dataclass(frozen=True)
class TokenBatch:
    """New output tokens of one request, in order, each delivered once."""

    token_ids: list[int]
    time: float
    """Unix time the coordinator had them."""


class RequestStream:
    """One request's tokens as an async iterator; ``record`` is its output record once it finished."""

    def __init__(self, submit: Submit) -> None:
        self.submit = submit
        self.delivered = 0
        """Output tokens handed to the reader so far (the index the next token must have)."""
        self.record: dict[str, Any] | None = None
        self._queue: asyncio.Queue[TokenBatch | BaseException | None] = asyncio.Queue()
        self._pending: dict[int, tuple[list[int], float]] = {}
        self.ended = False

    @property
    def request_id(self) -> str:
        return self.submit.request_id

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> TokenBatch:
        item = await self._queue.get()
        if item is None:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def feed(self, index: int, tokens: list[int], t: float) -> None:
        """Tokens starting at output index ``index``: duplicates dropped, a gap waited for."""
        if self.ended:
            return
        held = self._pending.get(index)
        if held is None or len(tokens) > len(held[0]):
            self._pending[index] = (list(tokens), t)
        while self._pending:
            first = min(self._pending)
            if first > self.delivered:
                return
            toks, when = self._pending.pop(first)
            fresh = [int(x) for x in toks[self.delivered - first :]]
            if fresh:
                self.delivered += len(fresh)
                self._queue.put_nowait(TokenBatch(fresh, when))

    def finish(self, record: dict[str, Any]) -> None:
        """The request ended: deliver what its record adds, then end the iteration (or raise its error)."""
        if self.ended:
            return
        if "error" in record:
            self.fail(EngineRequestError(str(record["error"])))
            return
        self.feed(0, list(record.get("output_ids", [])), time.time())
        if self._pending:
            _log.warning("request %s finished with tokens from index %d missing", self.request_id, self.delivered)
        self.record = record
        self.ended = True
        self._queue.put_nowait(None)

    def fail(self, error: BaseException) -> None:
        if not self.ended:
            self.ended = True
            self._queue.put_nowait(error)


class EngineClient:
    """Requests to the coordinator and their streams back, over one link (re-established if it drops)."""

    def __init__(self, address: LinkAddress, reconnect_s: float, on_gone: Callable[[], None] | None = None) -> None:
        self.address = address
        self.reconnect_s = reconnect_s
        self.on_gone = on_gone
        self.info: ServerInfo | None = None
        self.state: EngineState | None = None
        self.state_listeners: list[Callable[[EngineState], None]] = []
        self._streams: dict[str, RequestStream] = {}
        self._link: Link | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._early: list[Any] = []
        self._lock = threading.Lock()
        self._got_info = threading.Event()
        self._closing = False
        self.gone = False

    # --- connecting (any thread) ------------------------------------------------------------------

    def open(self, timeout_s: float) -> ServerInfo:
        """Connect and wait for ServerInfo (blocking; call before the event loop serves)."""
        self._start_link(connect(self.address, timeout_s), timeout_s)
        assert self.info is not None
        return self.info

    def _start_link(self, link: Link, timeout_s: float) -> None:
        """Read ``link``; it becomes the client's link once it has said ServerInfo, else it is closed."""
        ended = threading.Event()

        def on_closed() -> None:
            ended.set()
            with self._lock:
                current = link is self._link
            if current and not self._closing:
                self._reconnect()

        self._got_info.clear()
        link.start_reading(self._deliver, on_closed, "serve-link-reader")
        deadline = time.monotonic() + timeout_s
        while not self._got_info.wait(0.05):
            if ended.is_set() or time.monotonic() > deadline:
                link.close()
                why = "closed the link" if ended.is_set() else f"said nothing within {timeout_s:.0f}s"
                raise ConnectionError(f"the coordinator at {self.address} {why} before its ServerInfo")
        with self._lock:
            if ended.is_set():
                raise ConnectionError(f"the coordinator at {self.address} closed the link after its ServerInfo")
            self._link = link

    def _deliver(self, msg: Any) -> None:
        """On the reader thread: ServerInfo is taken at once; everything goes on to the event loop."""
        if isinstance(msg, ServerInfo):
            self.info = msg
            self._got_info.set()
        with self._lock:
            if self._loop is None:
                self._early.append(msg)
                return
            self._post(self._handle, msg)

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            assert self._loop is not None
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start handing messages to ``loop`` (once; those that came before are handed now)."""
        with self._lock:
            if self._loop is loop:
                return
            self._loop = loop
            early, self._early = self._early, []
            for msg in early:
                self._post(self._handle, msg)

    def _reconnect(self) -> None:
        """On the reader thread of the link that ended: connect again for ``reconnect_s``, or give up."""
        _log.warning("the link to the coordinator at %s closed; reconnecting for %gs", self.address, self.reconnect_s)
        deadline = time.monotonic() + self.reconnect_s
        while not self._closing:
            left = max(deadline - time.monotonic(), 0.0)
            try:
                self._start_link(connect(self.address, left), max(left, 0.5))
            except Exception as e:  # refused, timed out, closed again, or authentication failed
                if time.monotonic() >= deadline:
                    _log.error("no coordinator at %s (%s): the front-end stops", self.address, e)
                    break
                time.sleep(0.1)
                continue
            _log.info("the link to the coordinator is back; submitting the open requests again")
            with self._lock:
                if self._loop is not None:
                    self._post(self._resubmit)
            return
        if self._closing:
            return
        with self._lock:
            if self._loop is None:
                self._gone()
            else:
                self._post(self._gone)

    # --- on the event loop ------------------------------------------------------------------------

    def _handle(self, msg: Any) -> None:
        if isinstance(msg, Tokens):
            for rid, index, tokens in msg.items:
                stream = self._streams.get(rid)
                if stream is not None:
                    stream.feed(int(index), tokens, msg.time)
        elif isinstance(msg, Finished):
            stream = self._streams.pop(msg.request_id, None)
            if stream is not None:
                stream.finish(msg.record)
        elif isinstance(msg, EngineState):
            self.state = msg
            for listener in self.state_listeners:
                listener(msg)
        elif not isinstance(msg, ServerInfo):
            _log.warning("ignored an unknown message from the coordinator: %r", type(msg).__name__)

    def _resubmit(self) -> None:
        for stream in list(self._streams.values()):
            self._send(stream.submit)

    def _gone(self) -> None:
        self.gone = True
        self.state = EngineState(serving=False)
        for listener in self.state_listeners:
            listener(self.state)
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.fail(EngineRequestError(LINK_GONE))
        if self.on_gone is not None:
            self.on_gone()

    def _send(self, msg: Any) -> bool:
        link = self._link
        return link is not None and link.send(msg)

    @property
    def serving(self) -> bool:
        """The coordinator said it can serve (no EngineState yet counts as not serving)."""
        return not self.gone and self.state is not None and self.state.serving

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet ended."""
        return len(self._streams)

    def submit(self, submit: Submit) -> RequestStream:
        """Send a request; its tokens come through the returned stream (call on the event loop)."""
        if self.gone:
            raise EngineRequestError(LINK_GONE)
        if submit.request_id in self._streams:
            raise ValueError(f"request id {submit.request_id!r} is already in flight")
        self.attach(asyncio.get_running_loop())
        stream = RequestStream(submit)
        self._streams[submit.request_id] = stream
        self._send(submit)  # while the link is down, the reconnect submits it
        return stream

    def cancel(self, request_id: str, reason: str = "abort") -> None:
        """End a request early; its stream gets nothing more."""
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.fail(EngineRequestError(f"request {request_id} was cancelled ({reason})"))
            self._send(Cancel(request_id, reason))

    def close(self) -> None:
        """Close the link for good (the server is shutting down)."""
        self._closing = True
        if self._link is not None:
            self._link.close()
