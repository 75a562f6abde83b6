"""Rendezvous: who this rank is, and the key-value store every process of the job shares.

Under torchrun the store is the agent's (it outlives every worker); under a plain ``python -m
dejavu_py`` rank 0 hosts it on a free port. Workers are told the address and connect as clients.
All keys of a run live under ``dejavu/<run id>/``.
"""
from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist


@dataclass(frozen=True)
class RankInfo:
    """This process's place in the job, from the launcher's environment."""

    rank: int
    """Global rank (one per pipeline member process)."""
    world_size: int
    """Number of rank processes."""
    local_rank: int
    """Rank on this host (picks the GPU)."""
    local_world_size: int
    """Rank processes on this host."""
    launcher: str
    """'torchrun' (or any launcher setting RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT: the deepspeed
    launcher too), 'mpirun' or 'single'."""

    @staticmethod
    def from_env() -> "RankInfo":
        env = os.environ
        if "RANK" in env and "WORLD_SIZE" in env:
            return RankInfo(
                int(env["RANK"]),
                int(env["WORLD_SIZE"]),
                int(env.get("LOCAL_RANK", 0)),
                int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])),
                "torchrun",
            )
        if "OMPI_COMM_WORLD_RANK" in env:
            return RankInfo(
                int(env["OMPI_COMM_WORLD_RANK"]),
                int(env["OMPI_COMM_WORLD_SIZE"]),
                int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)),
                int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", env["OMPI_COMM_WORLD_SIZE"])),
                "mpirun",
            )
        return RankInfo(0, 1, 0, 1, "single")


@dataclass(frozen=True)
class StoreAddress:
    """Where the job's store is and how to reach it; picklable, handed to every worker."""

    host: str
    """Host name or address of the store server."""
    port: int
    """TCP port of the store server."""
    prefix: str
    """Key prefix of this run (``dejavu/<run id>/``)."""
    timeout_s: float
    """How long a blocking store call (get, wait) may take before it fails."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def resolve_address(info: RankInfo, timeout_s: float) -> tuple[StoreAddress, bool]:
    """The store address for this job and whether this process must host the server."""
    env = os.environ
    if info.launcher == "torchrun":
        run_id = env.get("TORCHELASTIC_RUN_ID", "run")
        restart = env.get("TORCHELASTIC_RESTART_COUNT", "0")
        # torchrun's agent hosts the store; under other launchers (deepspeed) rank 0 does, at MASTER_PORT
        host_it = env.get("TORCHELASTIC_USE_AGENT_STORE", "False") != "True" and info.rank == 0
        prefix = f"dejavu/{run_id}/{restart}/"
        return StoreAddress(env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", "29500")), prefix,
                            timeout_s), host_it
    if info.launcher == "mpirun":
        from dejavu_py.comm.mpi import (
            share_store_address,  # mpi4py only when launched by mpirun
        )

        return share_store_address(info, timeout_s)
    return StoreAddress("127.0.0.1", free_port(), f"dejavu/{uuid.uuid4().hex[:8]}/", timeout_s), True


def connect(addr: StoreAddress, host_server: bool = False) -> dist.Store:
    """A client (or the server, for the hosting rank) of the job's store, scoped to the run prefix.

    A client serialises its calls: one thread blocked in a waiting call (a rendezvous, ``wait``)
    stalls every other thread using that client. Blocking rendezvous therefore take a client of
    their own (``connect`` again); the shared one only serves quick calls."""
    tcp = dist.TCPStore(
        addr.host,
        addr.port,
        is_master=host_server,
        timeout=timedelta(seconds=addr.timeout_s),
        wait_for_workers=False,
        use_libuv=True,
    )
    return dist.PrefixStore(addr.prefix, tcp)


def put_json(store: dist.Store, key: str, value: Any) -> None:
    store.set(key, json.dumps(value))


def get_json(store: dist.Store, key: str, timeout_s: float | None = None) -> Any:
    """Wait for ``key`` (at most ``timeout_s``) and decode it."""
    if timeout_s is not None:
        store.wait([key], timedelta(seconds=timeout_s))
    return json.loads(store.get(key).decode())


def has(store: dist.Store, key: str) -> bool:
    return store.check([key])


def wait_any(store: dist.Store, keys: list[str], timeout_s: float, poll_s: float = 0.02) -> str:
    """Block until one of ``keys`` exists; returns it. Raises TimeoutError naming the keys."""
    deadline = time.monotonic() + timeout_s
    while True:
        for k in keys:
            if store.check([k]):
                return k
        if time.monotonic() > deadline:
            raise TimeoutError(f"none of {keys} appeared within {timeout_s:.0f}s")
        time.sleep(poll_s)


def address_dict(addr: StoreAddress) -> dict:
    return asdict(addr)
