"""A receiver thread per edge: everything a peer sends goes into one inbox, and a broken edge
becomes one ``EdgeBroken`` event there (the coordinator's and every stage's loops read the same)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EdgeBroken:
    """Put in an inbox by a receiver thread whose edge failed (the peer died or the link broke)."""

    peer: str
    error: str
    generation: int = 0
    """Generation of the edge that broke (a stale edge of a replaced member is no news)."""
