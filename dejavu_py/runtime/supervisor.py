"""The supervisor: what each rank process is. It starts its members' workers (through the zygote),
sees them exit, and reports that in the store; it never computes.

Store keys it writes: ``supervisor/<rank>`` (its pid, host, zygote pid) and ``exit/<member>`` (a
worker's exit code, the moment the zygote reports it). It ends when the coordinator writes ``done``.
"""
from __future__ import annotations

import os
import socket
import threading
import time

from .. import log
from ..comm.store import StoreAddress, get_json, has, put_json
from ..config import RunConfig
from .layout import Layout, Member
from .worker import WorkerSpec
from .zygote import Zygote

_log = log.get(__name__)

DONE_KEY = "done"
EXIT_COUNT_KEY = "exit_count"


def exit_key(name: str) -> str:
    return f"exit/{name}"


def describe_exit(code: int) -> str:
    if code < 0:
        import signal

        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


class Supervisor:
    def __init__(
        self, cfg: RunConfig, rank: int, local_rank: int, store, addr: StoreAddress, zygote: Zygote, layout: Layout
    ) -> None:
        self.cfg, self.rank, self.local_rank = cfg, rank, local_rank
        self.store, self.addr, self.zygote, self.layout = store, addr, zygote, layout
        self.workers: dict[int, Member] = {}
        self.exited = threading.Event()
        zygote.on_exit(self._on_exit)
        put_json(store, f"supervisor/{rank}", {"pid": os.getpid(), "host": socket.gethostname(), "zygote_pid": zygote.pid})

    def start_workers(self) -> None:
        for member in self.layout.on_rank(self.rank):
            self.start(member, generation=0)

    def start(self, member: Member, generation: int) -> int:
        spec = WorkerSpec(member, self.layout, self.cfg, self.addr, self.rank, self.local_rank, generation)
        pid = self.zygote.spawn("dejavu_py.runtime.worker", "main", spec)
        self.workers[pid] = member
        _log.info("started worker of %s (pid %d, generation %d)", member.name, pid, generation)
        return pid

    def _on_exit(self, pid: int, code: int) -> None:
        member = self.workers.pop(pid, None)
        if member is None:
            return
        how = describe_exit(code)
        (_log.info if code == 0 else _log.error)("worker of %s (pid %d) %s", member.name, pid, how)
        if code != 0:
            put_json(self.store, exit_key(member.name), {"pid": pid, "code": code, "how": how, "time": time.time()})
            self.store.add(EXIT_COUNT_KEY, 1)  # one counter for the coordinator to poll
        if not self.workers:
            self.exited.set()

    def wait_done(self) -> int:
        """Block until the coordinator says the run is over, then until our workers have exited."""
        while not has(self.store, DONE_KEY):
            time.sleep(0.05)
        code = int(get_json(self.store, DONE_KEY)["code"])
        self.wait_workers(self.cfg.runtime.comm_timeout_s)
        return code

    def wait_workers(self, timeout_s: float) -> None:
        if self.workers and not self.exited.wait(timeout_s):
            _log.warning("workers %s still running after %.0fs: killing them", sorted(self.workers), timeout_s)
            for pid in list(self.workers):
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass

    def shutdown(self) -> None:
        self.zygote.stop()
