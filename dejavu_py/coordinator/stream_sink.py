"""An OutputSink (coordinator/sink.py) that streams to online front-ends: each request's tokens and
its end go to the link that submitted it, as ``Tokens`` and ``Finished`` messages (protocol/serving.py).

The serving loop only appends to a queue (``on_tokens`` is on the pipeline's critical path); a sender
thread wakes on it, waits ``flush_s`` so that the other tokens of the same step result join, and sends
one ``Tokens`` message per link with every request's new tokens and the index of the first. A
request's ``Finished`` always follows its last ``Tokens``.

A link that goes away cancels nothing. Its requests go on, and stream to a front-end again when it
submits the same request id again (``claim``: a front-end that reconnected resubmits its open
requests): from their first token, since a front-end keeps one copy of each token by its index. An end
that found no link waits for its claim the same way.
"""
from __future__ import annotations

import collections
import enum
import threading
import time
from collections.abc import Sequence
from typing import Any

from dejavu_py import log
from dejavu_py.comm.local_link import Link
from dejavu_py.protocol.serving import Finished, Tokens

_log = log.get(__name__)

_TOKENS, _FINISH, _ATTACH, _STOP = range(4)


class Claim(enum.Enum):
    NEW = "new"
    """No request of that id is being served: serve it."""
    ATTACHED = "attached"
    """It is being served (or ended) for a link that went away: it streams to the claiming link now."""
    TAKEN = "taken"
    """Another live link's request has that id."""


class StreamSink:
    def __init__(self, flush_s: float) -> None:
        self.flush_s = flush_s
        self._queue: collections.deque[tuple] = collections.deque()
        self._kick = threading.Event()
        self._lock = threading.Lock()  # guards _owner and _unsent (the front-ends' threads read them)
        self._owner: dict[str, Link] = {}  # request id -> the link it streams to, until its end is sent
        self._unsent: dict[str, dict[str, Any]] = {}  # ends that found their link gone
        self._told: dict[str, list[int]] = {}  # sender thread: every token of a request not ended
        self._sent: dict[str, int] = {}  # sender thread: of which its link was sent this many
        self._dirty: set[str] = set()  # sender thread: requests with tokens not sent yet
        self._thread = threading.Thread(target=self._run, name="stream-sender", daemon=True)
        self._thread.start()

    # -- the front-ends' side (reader and accept threads) -------------------------------------------
    def claim(self, request_id: str, link: Link) -> Claim:
        """``link`` submitted ``request_id``: a new request, one of a link that went away, or taken."""
        with self._lock:
            owner = self._owner.get(request_id)  # kept until its end is sent
            if owner is None:
                self._owner[request_id] = link
                return Claim.NEW
            if owner is not None and owner is not link and not owner.closed:
                return Claim.TAKEN
            self._owner[request_id] = link
        self._put((_ATTACH, request_id, link))
        return Claim.ATTACHED

    def unroute(self, request_id: str) -> None:
        """A new request refused after all (it will hear nothing from here)."""
        with self._lock:
            self._owner.pop(request_id, None)

    # -- OutputSink (the serving loop) ---------------------------------------------------------------
    def on_tokens(self, request_id: str, token_ids: Sequence[int]) -> None:
        self._put((_TOKENS, request_id, token_ids))

    def on_finish(self, record: dict[str, Any]) -> None:
        self._put((_FINISH, record))

    def close(self) -> None:
        """Send what is queued, then stop the sender (idempotent)."""
        if self._thread.is_alive():
            self._put((_STOP,))
            self._thread.join(timeout=30)

    def _put(self, event: tuple) -> None:
        self._queue.append(event)
        if not self._kick.is_set():  # after the append: a sender clearing it now still drains the event
            self._kick.set()

    # -- the sender thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            self._kick.wait()
            time.sleep(self.flush_s)  # the rest of the step's tokens join this message
            self._kick.clear()
            try:
                if not self._drain():
                    return
            except Exception:  # a bug here must not silence every stream without a word
                _log.exception("the token sender failed")

    def _drain(self) -> bool:
        """Handle every queued event in order; False once the stop event is reached."""
        queue = self._queue
        while queue:
            event = queue.popleft()
            kind = event[0]
            if kind == _TOKENS:
                rid = event[1]
                self._told.setdefault(rid, []).extend(event[2])
                self._dirty.add(rid)
            elif kind == _FINISH:
                self._flush()
                self._finish(event[1])
            elif kind == _ATTACH:
                self._attach(event[1], event[2])
            else:
                self._flush()
                return False
        self._flush()
        return True

    def _flush(self) -> None:
        """One Tokens message per link with the unsent tokens of its requests."""
        if not self._dirty:
            return
        items: dict[Link, list[tuple[str, int, list[int]]]] = {}
        with self._lock:
            owners = {rid: self._owner.get(rid) for rid in self._dirty}
        for rid, link in owners.items():
            if link is None or link.closed:
                continue  # its link has gone: sent when a front-end claims it
            told, sent = self._told.get(rid, []), self._sent.get(rid, 0)
            if len(told) > sent:
                items.setdefault(link, []).append((rid, sent, told[sent:]))
                self._sent[rid] = len(told)
        self._dirty.clear()
        now = time.time()
        for link, batch in items.items():
            link.send(Tokens(batch, now))

    def _finish(self, record: dict[str, Any]) -> None:
        rid = record.get("id")
        with self._lock:
            link = self._owner.get(rid) if isinstance(rid, str) else None
        if link is not None and (link.closed or not link.send(Finished(rid, record))):
            with self._lock:
                self._unsent[rid] = record  # until a front-end claims it (_attach, after this)
            return
        with self._lock:
            self._owner.pop(rid, None)
        if link is None:
            _log.warning("the end of request %r has no front-end to go to", rid)
        self._told.pop(rid, None)
        self._sent.pop(rid, None)

    def _attach(self, rid: str, link: Link) -> None:
        """``rid`` streams to ``link`` from its first token (and ends there if it has ended)."""
        with self._lock:
            record = self._unsent.pop(rid, None)
            if record is not None:
                self._owner.pop(rid, None)
        if record is None:
            self._sent[rid] = 0
            self._dirty.add(rid)
            self._flush()
            return
        tokens = self._told.pop(rid, [])
        self._sent.pop(rid, None)
        if tokens:
            link.send(Tokens([(rid, 0, tokens)], time.time()))
        link.send(Finished(rid, record))
