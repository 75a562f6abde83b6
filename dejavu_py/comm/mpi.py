"""Launching under ``mpirun``: ranks come from Open MPI's environment; the store address is chosen by
rank 0 and shared with one MPI broadcast. MPI is initialised only for that exchange and finalised
right after, so no MPI state is ever inherited by a forked process (the zygote is forked before)."""
from __future__ import annotations

import socket
import uuid

from dejavu_py.comm.store import RankInfo, StoreAddress, free_port


def share_store_address(info: RankInfo, timeout_s: float) -> tuple[StoreAddress, bool]:
    try:
        import mpi4py

        mpi4py.rc.finalize = False
        from mpi4py import MPI
    except ImportError:
        from dejavu_py.errors import UserError

        raise UserError("launched by mpirun but mpi4py is not installed: pip install mpi4py") from None
    comm = MPI.COMM_WORLD
    addr = None
    if info.rank == 0:
        addr = StoreAddress(socket.gethostname(), free_port(), f"dejavu/{uuid.uuid4().hex[:8]}/", timeout_s)
    addr = comm.bcast(addr, root=0)
    MPI.Finalize()
    return addr, info.rank == 0
