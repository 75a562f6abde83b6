"""What a stage worker's parts may use of the worker: the port fault tolerance (``StageFT``) and running
ahead (``RunAhead``) are given instead of the worker itself.

They send to peers and to the coordinator, post events to the loop's inbox, look up an edge, and read
the stage's place and configuration. The worker's loop, stash and recovery are not theirs to touch: the
worker may change without them, and a test may drive them with a stand-in.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from dejavu_py.comm.edge import Edge
    from dejavu_py.comm.store import StoreAddress
    from dejavu_py.config import RunConfig
    from dejavu_py.protocol.layout import Layout, Member


class StagePort(Protocol):
    """The worker as its parts see it (``Worker`` implements it)."""

    me: Member
    """The member this stage is."""
    layout: Layout
    cfg: RunConfig
    store: Any
    """The run's store, a client shared for quick calls."""
    store_address: StoreAddress
    """Where the store is: a part that blocks on a rendezvous connects a client of its own."""
    edges: dict[str, Edge]
    """The stage's main edges by peer: a failed peer's is removed, its rebuilt one put in its place."""
    closing: bool
    """Set once the worker shuts down: a receiver whose edge breaks then reports nothing."""

    def send_to(self, peer: str, msg: object, tensor: torch.Tensor | None = None, fast: bool = False,
                ring: tuple | None = None) -> None:
        """Send on the main edge to ``peer``; a broken edge is reported to the loop, not raised."""
        ...

    def send_coord(self, msg: object) -> None:
        """Send to the coordinator."""
        ...

    def post(self, peer: str, msg: object, x: object = None) -> None:
        """Put ``msg`` (from ``peer``, with its tensor ``x``) into the loop's inbox; from any thread."""
        ...
