"""Every key of the job's store, built in one place: who writes a key and who reads it meet here.

All keys live under the run's prefix (comm.store.StoreAddress.prefix).
"""
from __future__ import annotations

DONE = "done"
"""Rank 0's end of the job: {"code"}; every supervisor stops when it appears."""
DONE_LEFT = "done/left"
"""Counts the ranks that have seen DONE: the rank hosting the store waits for all before it exits."""
EXIT_COUNT = "exit_count"
"""Counts the exit reports (``exit_``): watchers look for new ones only when it grows."""
RECOVERED = "recovered"
"""{"generation"} of the latest recovery whose pipeline produced again: supervisors refill standbys then."""


def member(name: str) -> str:
    """A stage worker's announcement: pid, rank, role, generation, host, device, state (loading, ready)."""
    return f"member/{name}"


def error(name: str) -> str:
    """A worker's one-line user error (e.g. a checkpoint it cannot read): rank 0 reports it."""
    return f"error/{name}"


def exit_(name: str, generation: int) -> str:
    """A supervisor's report of how a member's worker of ``generation`` ended: pid, code, how, time."""
    return f"exit/{name}/gen{generation}"


def supervisor(rank: int) -> str:
    """A rank's supervisor: pid, host, local rank."""
    return f"supervisor/{rank}"


def ft_stats(name: str) -> str:
    """A stage's fault-tolerance and loop figures, written when it stops."""
    return f"ft_stats/{name}"


def heartbeat(name: str) -> str:
    """A worker's last beat: "<generation> <unix time>"."""
    return f"hb/{name}"


def replica_file(holder: str) -> str:
    """Where ``holder`` keeps its replica (a shared-memory file on its host), or {} for pinned memory."""
    return f"replica_shm/{holder}"


def standby(standby_id: str) -> str:
    """A warm standby process: pid, state, the stage it preloaded."""
    return f"standby/{standby_id}"


def assign(standby_id: str) -> str:
    """A supervisor's order to a standby: the member and generation it becomes."""
    return f"assign/{standby_id}"


def command_count(rank: int) -> str:
    """Commands posted to ``rank``'s supervisor so far (a counter)."""
    return f"cmd/{rank}/n"


def command(rank: int, n: int) -> str:
    """The ``n``-th command to ``rank``'s supervisor (JSON)."""
    return f"cmd/{rank}/{n}"


def command_error(rank: int, n: int) -> str:
    """Why ``rank``'s supervisor could not carry out its ``n``-th command."""
    return f"cmd_error/{rank}/{n}"


def edge(a: str, b: str, channel: str, generation: int) -> str:
    """The prefix of the process group between members ``a`` and ``b`` (order-free) on ``channel``."""
    lo, hi = sorted((a, b))
    return f"edge/{lo}~{hi}/{channel}/gen{generation}"
