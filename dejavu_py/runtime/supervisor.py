"""The supervisor: what each rank process is. It starts its members' workers (through the zygote),
sees them exit, reports that in the store, and carries out the coordinator's commands; it never
computes.

Store keys it writes: ``supervisor/<rank>`` (pid, host, local rank, zygote pid) and
``exit/<member>/gen<g>`` (a worker's exit, the moment the zygote reports it), counted in
``exit_count``. The first rank of each host also keeps that host's warm standbys (``--standby``) and
answers ``replace`` commands: a standby takes the member over, or a fresh worker is forked.
It ends when the coordinator writes ``done``.
"""
from __future__ import annotations

import os
import signal
import socket
import threading
import time

from dejavu_py import log
from dejavu_py.comm.commands import CommandReader
from dejavu_py.comm.store import StoreAddress, get_json, has, put_json
from dejavu_py.config import RunConfig
from dejavu_py.protocol import keys
from dejavu_py.protocol.layout import Layout, Member
from dejavu_py.runtime.standby import StandbySpec
from dejavu_py.runtime.zygote import Zygote
from dejavu_py.stage import replica_shm
from dejavu_py.stage.worker import WorkerSpec

_log = log.get(__name__)



def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


class Supervisor:
    def __init__(self, cfg: RunConfig, rank: int, local_rank: int, store, addr: StoreAddress, zygote: Zygote,
                 layout: Layout) -> None:
        self.cfg, self.rank, self.local_rank = cfg, rank, local_rank
        self.store, self.addr, self.zygote, self.layout = store, addr, zygote, layout
        self.workers: dict[int, tuple[Member, int]] = {}  # pid -> (member, generation)
        self.standbys: dict[int, int] = {}  # pid -> standby id
        self._next_standby = 0
        self._lock = threading.Lock()
        self.exited = threading.Event()
        self.host = socket.gethostname()
        zygote.on_exit(self._on_exit)
        put_json(store, keys.supervisor(rank), {"pid": os.getpid(), "host": self.host, "local_rank": local_rank,
                                              "zygote_pid": zygote.pid})

    @property
    def host_leader(self) -> bool:
        return self.local_rank == 0

    # -- starting --------------------------------------------------------------------------------
    def start_workers(self) -> None:
        for member in self.layout.on_rank(self.rank):
            self.start(member, generation=0)
        if self.host_leader:
            for _ in range(self.cfg.ft.standby):
                self.start_standby()
        threading.Thread(target=self._serve_commands, name="commands", daemon=True).start()

    def start(self, member: Member, generation: int) -> int:
        spec = WorkerSpec(member, self.layout, self.cfg, self.addr, member.rank, self._local_rank_of(member), generation)
        pid = self.zygote.spawn("dejavu_py.stage.worker", "main", spec)
        with self._lock:
            self.workers[pid] = (member, generation)
        _log.info("started worker of %s (pid %d, generation %d)", member.name, pid, generation)
        return pid

    def _local_rank_of(self, member: Member) -> int:
        if member.rank == self.rank:
            return self.local_rank
        return get_json(self.store, keys.supervisor(member.rank), timeout_s=30)["local_rank"]

    def start_standby(self, preload: Member | None = None) -> None:
        """A warm process for this host; with --standby-preload it loads ``preload`` or, by default, the
        host's stages in turn."""
        sid = self._next_standby
        self._next_standby += 1
        mine = [m for m in self.layout.members if self._same_host(m.rank)]
        if preload is None:
            preload = mine[sid % len(mine)] if self.cfg.ft.standby_preload and mine else None
        spec = StandbySpec(f"{self.rank}.{sid}", self.layout, self.cfg, self.addr, self.rank,
                           self._local_rank_of(preload) if preload else self.local_rank, preload)
        pid = self.zygote.spawn("dejavu_py.runtime.standby", "main", spec)
        with self._lock:
            self.standbys[pid] = sid
        _log.info("started standby %s (pid %d, preloading %s)", spec.standby_id, pid, preload.name if preload else "nothing")

    def _same_host(self, rank: int) -> bool:
        return rank == self.rank or get_json(self.store, keys.supervisor(rank), timeout_s=30)["host"] == self.host

    # -- commands --------------------------------------------------------------------------------
    def _serve_commands(self) -> None:
        reader = CommandReader(self.store, self.rank)
        while True:
            try:
                if has(self.store, keys.DONE):
                    return
                cmds = reader.poll()
            except Exception as e:  # a store hiccup must not end the only thread that starts replacements
                _log.error("reading commands: %s", e)
                time.sleep(0.2)
                continue
            for cmd in cmds:
                _log.info("command %s", cmd)
                try:
                    self._run(cmd)
                except Exception as e:  # a command that cannot be carried out is reported, not fatal here
                    _log.error("command %s failed: %s", cmd, e)
                    put_json(self.store, keys.command_error(self.rank, reader.seen), str(e))
            time.sleep(0.02)

    def _run(self, cmd: dict) -> None:
        if cmd["op"] == "kill":
            with self._lock:
                ours = int(cmd["pid"]) in self.workers  # never a pid we did not start (it may be reused)
            if ours:
                _log.warning("killing pid %d (%s)", cmd["pid"], cmd.get("why", ""))
                try:
                    os.kill(int(cmd["pid"]), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        elif cmd["op"] == "replace":
            self.replace(self.layout.by_name(cmd["member"]), int(cmd["generation"]))
        else:
            raise ValueError(f"unknown command {cmd['op']!r}")

    def replace(self, member: Member, generation: int) -> None:
        """Hand ``member`` to a ready standby (the one preloaded with it first), else fork a new worker."""
        ready = self._ready_standbys()
        if not ready:
            self.start(member, generation)
            return
        pid, sid, info = next(((p, s, i) for p, s, i in ready if i.get("preload") == member.name), ready[0])
        with self._lock:
            del self.standbys[pid]
            self.workers[pid] = (member, generation)
        put_json(self.store, keys.assign(f"{self.rank}.{sid}"), {"member": member.name, "generation": generation,
                                                              "local_rank": self._local_rank_of(member)})
        _log.info("standby %s.%d (pid %d) takes over %s at generation %d", self.rank, sid, pid, member.name, generation)
        preload = self.layout.by_name(info["preload"]) if info.get("preload") else None
        threading.Thread(target=self._refill, args=(preload, generation), daemon=True).start()

    def _refill(self, preload: Member | None, generation: int) -> None:
        """A standby like the one just taken, started once that recovery is over: loading it meanwhile
        would compete with the replacement for the device, host memory bandwidth and cores."""
        deadline = time.monotonic() + self.cfg.ft.recovery_timeout_s
        while time.monotonic() < deadline and not has(self.store, keys.DONE):
            if has(self.store, keys.RECOVERED) and get_json(self.store, keys.RECOVERED)["generation"] >= generation:
                break
            time.sleep(0.05)
        self.start_standby(preload)

    def _ready_standbys(self) -> list[tuple[int, int, dict]]:
        out = []
        with self._lock:
            items = list(self.standbys.items())
        for pid, sid in items:
            key = keys.standby(f"{self.rank}.{sid}")
            if has(self.store, key) and get_json(self.store, key).get("state") == "ready":
                out.append((pid, sid, get_json(self.store, key)))
        return out

    # -- exits -----------------------------------------------------------------------------------
    def _on_exit(self, pid: int, code: int) -> None:
        with self._lock:
            entry = self.workers.pop(pid, None)
            standby = self.standbys.pop(pid, None)
        if standby is not None:
            _log.warning("standby %s.%d (pid %d) %s", self.rank, standby, pid, describe_exit(code))
            return
        if entry is None:
            return
        member, gen = entry
        how = describe_exit(code)
        (_log.info if code == 0 else _log.error)("worker of %s (pid %d, generation %d) %s", member.name, pid, gen, how)
        if code != 0:
            put_json(self.store, keys.exit_(member.name, gen), {"pid": pid, "code": code, "how": how, "time": time.time()})
            self.store.add(keys.EXIT_COUNT, 1)  # one counter for the coordinator to poll
        with self._lock:
            if not self.workers:
                self.exited.set()

    def wait_done(self) -> int:
        """Block until the coordinator says the run is over, then until our workers have exited."""
        while not has(self.store, keys.DONE):
            time.sleep(0.05)
        code = int(get_json(self.store, keys.DONE)["code"])
        self.wait_workers(self.cfg.runtime.comm_timeout_s)
        self.store.add(keys.DONE_LEFT, 1)
        return code

    def wait_ranks_left(self, others: int, timeout_s: float) -> None:
        """The store's host: until the ``others`` ranks have seen the end (they poll the store for it)."""
        deadline = time.monotonic() + timeout_s
        while self.store.add(keys.DONE_LEFT, 0) < others and time.monotonic() < deadline:
            time.sleep(0.02)

    def wait_workers(self, timeout_s: float) -> None:
        with self._lock:
            pending = bool(self.workers)
        if pending and not self.exited.wait(timeout_s):
            _log.warning("workers %s still running after %.0fs: killing them", sorted(self.workers), timeout_s)
            for pid in list(self.workers):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def shutdown(self) -> None:
        for pid in list(self.standbys):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.zygote.stop()
        replica_shm.remove_all(self.cfg.ft.shm_dir, self.cfg.run_dir)
