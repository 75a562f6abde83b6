"""Zygote: a fork of the rank process, taken before it starts any thread, that forks workers on request.

Importing torch costs seconds; forking a process that already imported it costs milliseconds. The
rank process (the supervisor) imports torch, forks the zygote while it is still single-threaded, and
from then on asks the zygote for workers: a stage worker at start, a replacement after a failure, a
warm standby. Workers are the zygote's children; it reports each one's exit to the supervisor at once
(SIGCHLD), so a dead worker is seen within milliseconds.

Both the zygote and its workers die with their parent (PR_SET_PDEATHSIG), so a killed supervisor
leaves nothing behind.
"""
from __future__ import annotations

import ctypes
import importlib
import os
import pickle
import queue
import select
import signal
import struct
import sys
import threading
import traceback
from typing import Any, Callable

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent exits (Linux; no-op elsewhere)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _write(fd: int, obj: Any) -> None:
    data = pickle.dumps(obj)
    os.write(fd, struct.pack("!I", len(data)) + data)


def _read_exact(fd: int, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise EOFError("pipe closed")
        buf += chunk
    return buf


def _read(fd: int) -> Any:
    (n,) = struct.unpack("!I", _read_exact(fd, 4))
    return pickle.loads(_read_exact(fd, n))


def _run_child(module: str, func: str, spec: Any, keep: set[int]) -> None:
    """In a freshly forked worker: drop the zygote's plumbing and run ``module.func(spec)``."""
    for fd in keep:
        os.close(fd)
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    die_with_parent()
    code = 1
    try:
        code = int(getattr(importlib.import_module(module), func)(spec) or 0)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # a crash of the worker: its traceback goes to the rank's stderr and log
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _serve(cmd_r: int, evt_w: int) -> None:
    """The zygote's loop: fork on 'spawn', report every child's exit."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when workers stop
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    while True:
        try:
            ready, _, _ = select.select([cmd_r, wake_r], [], [])
        except InterruptedError:
            continue
        if wake_r in ready:
            os.read(wake_r, 512)
            _reap(evt_w)
        if cmd_r in ready:
            try:
                msg = _read(cmd_r)
            except EOFError:
                os._exit(0)
            if msg[0] == "quit":
                os._exit(0)
            _, module, func, spec = msg
            pid = os.fork()
            if pid == 0:
                _run_child(module, func, spec, {cmd_r, evt_w, wake_r, wake_w})
            _write(evt_w, ("spawned", pid))


def _reap(evt_w: int) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _write(evt_w, ("exit", pid, os.waitstatus_to_exitcode(status)))


class Zygote:
    """The supervisor's handle on its zygote."""

    def __init__(self, pid: int, cmd_w: int, evt_r: int) -> None:
        self.pid = pid
        self._cmd_w, self._evt_r = cmd_w, evt_r
        self._spawned: queue.Queue[int] = queue.Queue()
        self._callbacks: list[Callable[[int, int], None]] = []
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None

    @staticmethod
    def start() -> "Zygote":
        """Fork the zygote. Call while the process has no other Python thread."""
        cmd_r, cmd_w = os.pipe()
        evt_r, evt_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(cmd_w)
            os.close(evt_r)
            try:
                _serve(cmd_r, evt_w)
            finally:
                os._exit(0)
        os.close(cmd_r)
        os.close(evt_w)
        return Zygote(pid, cmd_w, evt_r)

    def on_exit(self, callback: Callable[[int, int], None]) -> None:
        """``callback(pid, exit_code)`` for every worker that exits (negative code = killed by signal)."""
        self._callbacks.append(callback)

    def spawn(self, module: str, func: str, spec: Any, timeout_s: float = 30.0) -> int:
        """Fork a worker running ``module.func(spec)``; returns its pid."""
        self._ensure_reader()
        with self._lock:
            _write(self._cmd_w, ("spawn", module, func, spec))
            try:
                return self._spawned.get(timeout=timeout_s)
            except queue.Empty:
                raise RuntimeError(f"zygote {self.pid} did not fork a worker within {timeout_s:.0f}s") from None

    def stop(self) -> None:
        try:
            _write(self._cmd_w, ("quit",))
        except OSError:
            pass

    def _ensure_reader(self) -> None:
        if self._reader is None:
            self._reader = threading.Thread(target=self._read_events, name="zygote-events", daemon=True)
            self._reader.start()

    def _read_events(self) -> None:
        while True:
            try:
                msg = _read(self._evt_r)
            except (EOFError, OSError):
                return
            if msg[0] == "spawned":
                self._spawned.put(msg[1])
            else:
                for cb in self._callbacks:
                    cb(msg[1], msg[2])
