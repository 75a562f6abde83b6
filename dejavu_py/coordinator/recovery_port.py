"""What a recovery (coordinator/recovery.py) needs of the coordinator that owns it.

The coordinator provides it structurally. A recovery reads the owner's state and changes it only
through these methods (a replacement's generation, its edge), so that what a recovery may touch is
written in one place, and a test can hand a recovery a small fake instead of a whole coordinator.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch.distributed as dist

    from dejavu_py.comm.edge import Edge
    from dejavu_py.comm.receiver import EdgeBroken
    from dejavu_py.coordinator.driver import Driver
    from dejavu_py.coordinator.watch import MemberLost
    from dejavu_py.protocol.layout import Layout
    from dejavu_py.protocol.plan import StepCounter


class RecoveryPort(Protocol):
    # -- what the run is made of -----------------------------------------------------------------
    @property
    def store(self) -> dist.Store:
        """The job's store: member records, exit reports, heartbeats, supervisor commands. The coordinator
        connects to it after it was built (and built its recovery): read it when it is used."""
        ...

    @property
    def layout(self) -> Layout:
        ...

    @property
    def driver(self) -> Driver:
        """Built before serving starts, so before any recovery."""
        ...

    @property
    def steps(self) -> StepCounter:
        """The run's step numbers: survivors drop the plans in flight, those up to the current one."""
        ...

    # -- messages --------------------------------------------------------------------------------
    def send(self, member: str, msg: object) -> None:
        """A failed send becomes that member's loss in the inbox."""
        ...

    def next_message(self, timeout_s: float) -> tuple[str, object] | None:
        """The inbox's next (source, message), waiting up to ``timeout_s`` (0: not at all); None if none came."""
        ...

    def requeue(self, messages: list[tuple[str, object]]) -> None:
        """Messages a recovery set aside, back into the inbox (in order) for the serving loop."""
        ...

    # -- members ---------------------------------------------------------------------------------
    def generation_of(self, name: str) -> int:
        ...

    def set_generation(self, name: str, generation: int) -> None:
        """From now on only news of ``generation`` counts as this member's loss."""
        ...

    def make_edge(self, peer: str, generation: int) -> Edge:
        """Blocks until the member (its replacement) joins; safe to call from another thread."""
        ...

    def install_edge(self, peer: str, edge: Edge) -> None:
        """The edge to ``peer`` from now on, replacing (and closing) the old one, with its receiver."""
        ...

    def host_leader_of(self, rank: int) -> int:
        """The rank whose supervisor keeps the standbys of ``rank``'s host."""
        ...

    # -- failures --------------------------------------------------------------------------------
    def is_loss(self, msg: object) -> bool:
        """A failure of a member's current generation (older generations are already replaced)."""
        ...

    def member_of(self, msg: EdgeBroken | MemberLost) -> str:
        ...

    def why(self, msg: EdgeBroken | MemberLost) -> str:
        ...

    # -- reporting -------------------------------------------------------------------------------
    def write_progress(self) -> None:
        """progress.json now (it says whether a recovery is under way)."""
        ...

    def refresh_workers_file(self) -> None:
        """workers.json now (a replacement has a new process)."""
        ...
