"""Where the coordinator's requests come from: a :class:`RequestSource`.

The serving loop asks its source for the requests that have arrived, sleeps no longer than until the
next known arrival (or until the source wakes it), and ends once the source is exhausted and nothing
is in flight. The request file is one source (:class:`FileSource`); an online front-end is another:
it hands over requests as clients send them, calls ``wake`` so that an idle loop polls at once, and
says it is exhausted when it is closed.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from dejavu_py.coordinator.request import Request


class RequestSource(Protocol):
    def start(self, t0: float, wake: Callable[[], None]) -> None:
        """Serving begins at ``t0`` (time.monotonic()); a request's ``arrival_s`` counts from there.
        ``wake`` may be called from any thread when a request arrives unannounced."""

    def poll(self, now: float) -> list[Request]:
        """The requests that arrived by ``now`` and were not handed out yet, in arrival order."""

    def next_arrival(self) -> float | None:
        """When (time.monotonic()) the next request known in advance arrives; None when none is."""

    def exhausted(self) -> bool:
        """True once every request was handed out and no more will come."""

    def expected(self) -> int | None:
        """How many requests it hands out in all, when known in advance (for the progress bar)."""


class FileSource:
    """The request file's good lines, each released at its ``arrival_s`` after serving begins (all at
    once for a plain batch); lines arriving together keep the file's order."""

    def __init__(self, requests: list[Request]) -> None:
        self._todo = sorted(requests, key=lambda r: r.arrival_s)  # stable: file order among equals
        self._next = 0
        self._t0: float | None = None

    def start(self, t0: float, wake: Callable[[], None]) -> None:
        self._t0 = t0

    def poll(self, now: float) -> list[Request]:
        if self._t0 is None:
            raise RuntimeError("FileSource.poll before start(): serving has not begun")
        first = self._next
        while self._next < len(self._todo) and self._t0 + self._todo[self._next].arrival_s <= now:
            self._next += 1
        return self._todo[first : self._next]

    def next_arrival(self) -> float | None:
        if self._t0 is None or self._next == len(self._todo):
            return None
        return self._t0 + self._todo[self._next].arrival_s

    def exhausted(self) -> bool:
        return self._next == len(self._todo)

    def expected(self) -> int:
        return len(self._todo)
