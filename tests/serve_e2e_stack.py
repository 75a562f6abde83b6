"""A real server for the end-to-end serving tests: ``python -m dejavu_py serve --nproc-per-node N`` as a
process tree (launcher, ranks, stage workers, the HTTP front-end), and its end, SIGKILL to every
process of the tree whatever session it runs in (the launcher starts each rank in a session of its own,
and rank 0 its front-end: killing one process group would leave the others running)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from e2e import ROOT, env, logs_of

from dejavu_py.comm.store import free_port

START_TIMEOUT_S = 120.0
"""Seconds a server has to answer /health with 200 (three stages loading the tiny checkpoint)."""


@dataclass
class Server:
    proc: subprocess.Popen
    run_dir: Path
    url: str
    model: str

    def console(self) -> str:
        path = self.run_dir / "console.txt"
        return (path.read_text()[-4000:] if path.exists() else "") + "\n" + logs_of(self.run_dir)


def _children() -> dict[int, list[int]]:
    """Every process's children, by parent pid (from /proc)."""
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        out.setdefault(ppid, []).append(int(entry))
    return out


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    children, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL to every process of the tree, read before the first kill (orphans change parents)."""
    for p in tree(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


@contextmanager
def serving(ckpt: Path, run_dir: Path, *extra: str, nproc: int = 3, name: str = "tiny") -> Iterator[Server]:
    """The server up (its /health 200) for the block; killed afterwards, also when the block fails."""
    port = free_port()
    run_dir.mkdir(parents=True)
    cmd = [sys.executable, "-m", "dejavu_py", "serve", "--nproc-per-node", str(nproc), "--config",
           str(ROOT / "configs/tiny-cpu.yaml"), "--model", str(ckpt), "--run-dir", str(run_dir), "--host", "127.0.0.1",
           "--port", str(port), "--served-model-name", name, "--no-progress", *extra]
    with open(run_dir / "console.txt", "w") as console:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=console, stderr=subprocess.STDOUT,
                                start_new_session=True)
    server = Server(proc, run_dir, f"http://127.0.0.1:{port}", name)
    try:
        _await_health(server)
        yield server
    finally:
        kill_tree(proc.pid)
        proc.wait(30)


def _await_health(server: Server) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        assert server.proc.poll() is None, f"the server exited with {server.proc.returncode}\n{server.console()}"
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"no healthy server after {START_TIMEOUT_S:.0f}s\n{server.console()}"
        time.sleep(0.25)


def stage_worker_pid(run_dir: Path, name: str) -> int:
    import json

    workers = json.loads((run_dir / "workers.json").read_text())["workers"]
    return next(w["pid"] for w in workers if w["name"] == name)
