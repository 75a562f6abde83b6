"""A stage worker's message handling: a table from message type to handler.

The worker's core, running ahead and fault tolerance each register the messages they handle, so the
loop knows none of them by name; a part added later (a per-expert health check, say) plugs in the same
way. The loop finds a message's handler with one dict lookup by its type: a step plan, its most
frequent message, costs no more than the first test of a chain of ``isinstance``.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

Handler = Callable[[Any, Any], int]
"""(message, its tensor or ring read, or None) -> the steps it launched (0 but for plans and ids)."""


class Route(NamedTuple):
    """A message type's handler and what the loop does before calling it."""

    handle: Handler
    finishes_steps: bool
    """A control message: every launched step is finished (its output sent, its copies queued) first."""
    waits_for_restore: bool
    """A replacement stashes it until its Restore (and its KV from the replica) are in, then serves it."""


class MessageTable:
    """Message type -> ``Route``. A type has one handler: registering a second one is an error."""

    def __init__(self) -> None:
        self.routes: dict[type, Route] = {}
        """Read by the loop directly (its hot path); filled through ``register``."""

    def register(self, kind: type, handle: Handler, *, finishes_steps: bool = True,
                 waits_for_restore: bool = False) -> None:
        if kind in self.routes:
            raise ValueError(f"{kind.__name__} has a handler already ({self.routes[kind].handle.__qualname__}); "
                             f"one type, one handler: register {handle.__qualname__} for another type")
        self.routes[kind] = Route(handle, finishes_steps, waits_for_restore)

    def lookup(self, kind: type) -> Route | None:
        """The route of ``kind``, or of its nearest base class that has one (None: no handler)."""
        for base in kind.__mro__:
            route = self.routes.get(base)
            if route is not None:
                return route
        return None
