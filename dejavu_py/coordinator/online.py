"""The coordinator's side of online serving: front-end processes (the HTTP server, the Python API)
connect over a local link (comm/local_link.py) and speak protocol/serving.py.

:class:`FrontEnds` accepts the links and greets each with ``ServerInfo``; :class:`OnlineSource` turns
their ``Submit`` messages into requests for the serving loop (and their ``Cancel`` messages into the
coordinator's cancellations); :class:`StreamSink` streams tokens and ends back to the link that
submitted each request. A link that goes away cancels nothing: a front-end may connect again and
submit its open requests again (the same ids); they stream to it again from their first token (a
front-end keeps one copy of each token by its index), and are not served twice.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dejavu_py import log
from dejavu_py.comm.local_link import Link, LinkAddress, LinkServer
from dejavu_py.coordinator.engine_state import EngineStateView, StatePublisher
from dejavu_py.coordinator.output import error_record
from dejavu_py.coordinator.request import Request, RequestLimits, online_request
from dejavu_py.coordinator.stream_sink import Claim, StreamSink
from dejavu_py.protocol.serving import Cancel, EngineState, Finished, ServerInfo, Submit

if TYPE_CHECKING:
    from dejavu_py.config import RunConfig

_log = log.get(__name__)


def server_info(cfg: RunConfig, model_cfg: Any, limits: RequestLimits) -> ServerInfo:
    """What the front-end checks requests against, from the model, the cache and the run."""
    eos = () if cfg.generation.ignore_eos else tuple(model_cfg.eos_token_ids)
    return ServerInfo(
        model=cfg.serve.served_model_name or Path(cfg.model).resolve().name,
        vocab_size=limits.vocab_size,
        max_model_len=limits.max_model_len,
        max_prompt_tokens=limits.longest - 1,  # room for one new token
        eos_token_ids=eos,
        default_max_tokens=limits.default_max_new_tokens,
        run_seed=limits.run_seed,
    )


class FrontEnds:
    """The link server and the front-end links connected to it. Each link hears ``ServerInfo`` before
    anything else; then every message it sends goes to ``deliver`` (on its reader thread)."""

    def __init__(self, info: ServerInfo, deliver: Callable[[Link, object], None],
                 on_connect: Callable[[Link], None]) -> None:
        self.info, self._deliver, self._on_connect = info, deliver, on_connect
        self._lock = threading.Lock()
        self.links: list[Link] = []
        self._closed = False
        self.ending = False
        """Serving is over: front-ends that go away now are expected to."""
        self.server = LinkServer(self._accepted)

    def _accepted(self, link: Link) -> None:
        with self._lock:  # a connection the listener took while it was closing is not served
            if self._closed or not link.send(self.info):
                link.close()
                return
            self.links.append(link)
        _log.info("a front-end connected (%d linked)", len(self.links))
        self._on_connect(link)
        link.start_reading(lambda msg: self._handle(link, msg), lambda: self._gone(link), "frontend-link")

    def _handle(self, link: Link, msg: object) -> None:
        try:
            self._deliver(link, msg)
        except Exception:  # a message that cannot be handled must not take its link down
            _log.exception("a front-end's message could not be handled: %.200r", msg)

    def _gone(self, link: Link) -> None:
        with self._lock:
            if link not in self.links:
                return  # closed here, at the end
            self.links.remove(link)
        if not self.ending:
                _log.warning("a front-end link closed; its requests go on, for a front-end that connects again and "
                         "claims them")

    def broadcast(self, msg: object) -> None:
        with self._lock:
            links = list(self.links)
        for link in links:
            link.send(msg)

    def close(self) -> None:
        self.server.close()
        with self._lock:
            self._closed = True
            links, self.links = self.links, []
        for link in links:
            link.close()


class OnlineSource:
    """A RequestSource (coordinator/source.py) fed by front-ends: a ``Submit`` is checked and clamped
    like a request file's line, then handed out at the next poll (the loop is woken for it); one over
    the limits is answered with an error at once and never scheduled. Never exhausted until closed."""

    def __init__(self, limits: RequestLimits, sink: StreamSink, cancel: Callable[[Cancel], None],
                 max_waiting: int, waiting: Callable[[], int]) -> None:
        """``cancel``: the coordinator's (any thread); ``waiting``: requests queued in the scheduler."""
        self.limits, self.sink, self._cancel = limits, sink, cancel
        self.max_waiting, self._waiting = max_waiting, waiting
        self._lock = threading.Lock()
        self._pending: list[Request] = []
        self._closed = False
        self._t0: float | None = None
        self._wake: Callable[[], None] = lambda: None

    # -- from the front-ends (their reader threads) ------------------------------------------------
    def deliver(self, link: Link, msg: object) -> None:
        if isinstance(msg, Submit):
            self.submit(link, msg)
        elif isinstance(msg, Cancel) and isinstance(msg.request_id, str) and isinstance(msg.reason, str):
            self._cancel(msg)
        else:
            _log.warning("a front-end sent %.200r; expected a Submit or a Cancel", msg)

    def submit(self, link: Link, msg: Submit) -> None:
        try:
            self._accept(link, msg)
        except (ValueError, TypeError) as e:  # TypeError: a field of a type the checks do not take
            link.send(Finished(msg.request_id, error_record(None, msg.request_id, str(e))))

    def _accept(self, link: Link, msg: Submit) -> None:
        if self._closed:
            raise ValueError("the server is shutting down")
        queued = self._waiting() + len(self._pending)
        if queued >= self.max_waiting:
            raise ValueError(f"the server is overloaded: {queued} requests are waiting (--max-waiting); retry later")
        req = online_request(msg.request_id, self._fields(msg), self.limits)
        claim = self.sink.claim(req.id, link)
        if claim is Claim.ATTACHED:  # its front-end reconnected: it streams there again, from the start
            return
        if claim is Claim.TAKEN:
            raise ValueError(f"request id {req.id!r} is being served already: give every request an id of its own")
        with self._lock:  # with close(): a request is either refused or served before the loop ends
            closed = self._closed
            if not closed:
                self._pending.append(req)
        if closed:
            self.sink.unroute(req.id)
            raise ValueError("the server is shutting down")
        self._wake()

    def _fields(self, msg: Submit) -> dict[str, Any]:
        """The request file's fields for ``msg`` (its checks then apply as they are)."""
        ids = list(msg.prompt_ids) if isinstance(msg.prompt_ids, (list, tuple)) else msg.prompt_ids
        fields: dict[str, Any] = {
            "input_ids": ids, "temperature": msg.temperature, "top_p": msg.top_p, "top_k": msg.top_k,
            "stop_token_ids": list(msg.stop_token_ids), "ignore_eos": msg.ignore_eos}
        if msg.max_tokens is not None:  # else the run's default
            fields["max_new_tokens"] = msg.max_tokens
        if msg.seed is not None:
            fields["seed"] = msg.seed
        if self._t0 is not None:  # queued_s counts from now (before serving began: from its start)
            fields["arrival_s"] = max(time.monotonic() - self._t0, 0.0)
        return fields

    # -- RequestSource ------------------------------------------------------------------------------
    def start(self, t0: float, wake: Callable[[], None]) -> None:
        self._t0, self._wake = t0, wake
        wake()  # requests that came while the stages were loading

    def poll(self, now: float) -> list[Request]:
        with self._lock:
            out, self._pending = self._pending, []
        return out

    def next_arrival(self) -> float | None:
        return None

    def exhausted(self) -> bool:
        with self._lock:
            return self._closed and not self._pending

    def expected(self) -> int | None:
        return None

    def close(self) -> None:
        """Shutting down (any thread): new requests are refused; the loop ends once those in flight end."""
        with self._lock:
            self._closed = True
        self._wake()


class OnlineService:
    """Everything rank 0 needs to serve online: the link for front-ends (``address``, with the key a
    child process gets from ``child_env``), the loop's source and sink, and the engine's state sent to
    every front-end a few times a second and at once when the coordinator's health changes."""

    def __init__(self, coordinator: Any) -> None:
        cfg = coordinator.cfg
        limits = coordinator.request_limits()
        self.sink = StreamSink(cfg.serve.stream_flush_s)
        self.source = OnlineSource(limits, self.sink, coordinator.cancel, cfg.serve.max_waiting,
                                   lambda: _waiting(coordinator))
        self.fronts: FrontEnds | None = None
        self.state = StatePublisher(EngineStateView(coordinator).snapshot, self._broadcast, cfg.serve.state_interval_s)
        coordinator.on_state_change = self.state.kick
        # last: a front-end may connect the moment it listens, and finds the rest ready
        self.fronts = FrontEnds(server_info(cfg, coordinator.model_cfg, limits), self.source.deliver, self._connected)

    @property
    def address(self) -> LinkAddress:
        return self.fronts.server.address

    def child_env(self) -> dict[str, str]:
        return self.fronts.server.child_env()

    def _connected(self, link: Link) -> None:
        self.state.kick()  # the engine's state, at once

    def _broadcast(self, state: EngineState) -> None:
        if self.fronts is not None:
            self.fronts.broadcast(state)

    def finish(self) -> None:
        """After serving: the last state, and every token and end sent (the links stay open)."""
        if self.fronts is not None:
            self.fronts.ending = True
        self.state.close()
        self.sink.close()

    def close(self) -> None:
        """Then the links close."""
        self.finish()
        self.fronts.close()


def _waiting(coordinator: Any) -> int:
    """Requests the coordinator's scheduler has queued (none before it has one)."""
    driver = coordinator.driver
    return driver.counts()[1] if driver is not None else 0
