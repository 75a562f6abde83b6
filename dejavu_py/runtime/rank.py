"""What one rank process does: validate, fork its zygote, start its workers, supervise; rank 0 also
runs the coordinator, and when serving online its front-end process. Returns the exit code."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable

from dejavu_py import log
from dejavu_py.comm.store import RankInfo, connect, get_json, put_json, resolve_address
from dejavu_py.config import RunConfig
from dejavu_py.errors import PipelineError, UserError
from dejavu_py.protocol import keys
from dejavu_py.runtime.prepare import prepare
from dejavu_py.runtime.supervisor import Supervisor
from dejavu_py.runtime.zygote import Zygote

_log = log.get(__name__)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def run_rank(cfg: RunConfig, info: RankInfo, report: Callable[[UserError], None]) -> int:
    """``report``: says a user's mistake found once workers started: on rank 0 before the other ranks
    learn that the run is over (they exit then, and the launcher stops rank 0 when one does), on the
    others as they learn it, since the launcher may see one of them fail first (user_errors.py)."""
    model_cfg, layout = prepare(cfg, info.world_size, info.rank)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    level = cfg.runtime.log_level
    log.setup(level, cfg.logs_dir / f"rank{info.rank}-supervisor.log", console_level=level if info.rank == 0 else "WARNING")
    log.set_identity("coord" if info.rank == 0 else "sup", "-", info.rank)
    coordinator = source = None
    if info.rank == 0:
        from dejavu_py.coordinator.coordinator import Coordinator

        coordinator = Coordinator(cfg, layout, model_cfg, store=None)
        if not cfg.serve.enabled:
            source = coordinator.load_requests()  # whole-file mistakes fail here, before any worker starts
    sys.stdout.flush()
    sys.stderr.flush()
    zygote = Zygote.start()  # still single-threaded: safe to fork
    addr, host_server = resolve_address(info, cfg.runtime.startup_timeout_s)
    store = connect(addr, host_server)
    sup = Supervisor(cfg, info.rank, info.local_rank, store, addr, zygote, layout)
    online = None
    try:
        if coordinator is not None and cfg.serve.enabled:  # up while the workers load: it says so
            online = OnlineFrontEnd(coordinator)
        sup.start_workers()
        if coordinator is None:
            code = sup.wait_done()
            error = get_json(store, keys.DONE).get("error")
            if error:
                report(UserError(error))
        else:
            coordinator.store, coordinator.addr = store, addr
            code = _coordinate(coordinator, source, online, store, sup, report)
        if host_server:  # the other ranks still need the store to learn that the run is over
            sup.wait_ranks_left(info.world_size - 1, cfg.runtime.comm_timeout_s)
        return code
    finally:
        if online is not None:
            online.close()
        sup.shutdown()


def _coordinate(coordinator, source, online, store, sup: Supervisor, report: Callable[[UserError], None]) -> int:
    code, error = 1, None
    try:
        if online is None:
            code = coordinator.run(source)
        else:
            code = online.outcome(coordinator.run(online.source, online.sink))
        return code
    except UserError as e:
        report(e)
        code, error = e.exit_code, str(e)
        return code
    except PipelineError as e:
        _log.error("%s", e)
        return 1
    finally:
        put_json(store, keys.DONE, {"code": code, "error": error})
        sup.wait_workers(coordinator.cfg.runtime.comm_timeout_s)


class OnlineFrontEnd:
    """Rank 0 serving online: the coordinator's link for front-ends (coordinator/online.py), the HTTP
    front-end process connected to it, and the signals that stop serving. SIGTERM or SIGINT: new
    requests are refused, those in flight finish, and the run ends with code 0 (a second signal acts as
    it would without this). The front-end process dying ends serving the same way, with code 1."""

    def __init__(self, coordinator) -> None:
        from dejavu_py.coordinator.online import OnlineService

        self.cfg = coordinator.cfg
        self.service = OnlineService(coordinator)
        self.source, self.sink = self.service.source, self.service.sink
        self.failed = False
        self._stopping = False
        self.proc = self._spawn()
        threading.Thread(target=self._watch, name="frontend-watch", daemon=True).start()
        self._handlers = {}
        if threading.current_thread() is threading.main_thread():
            self._handlers = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}

    def _spawn(self) -> subprocess.Popen:
        serve, path = self.cfg.serve, self.cfg.logs_dir / "frontend.log"
        cmd = [sys.executable, "-m", serve.frontend_module, "--link", str(self.service.address), "--host", serve.host,
               "--port", str(serve.port), "--checkpoint", str(self.cfg.model), "--max-waiting", str(serve.max_waiting),
               "--log-level", self.cfg.runtime.log_level.lower()]
        if serve.served_model_name:
            cmd += ["--served-model-name", serve.served_model_name]
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as out:  # its own session: a terminal's Ctrl-C reaches rank 0, which stops it last
            proc = subprocess.Popen(cmd, env={**os.environ, **self.service.child_env()}, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        _log.info("serving at http://%s:%d (front-end pid %d, its log %s)", serve.host, serve.port, proc.pid, path)
        return proc

    def _watch(self) -> None:
        code = self.proc.wait()
        if not self._stopping:
            self.failed = True
            _log.error("the front-end process exited with code %s (see %s): serving stops", code,
                       self.cfg.logs_dir / "frontend.log")
            self.source.close()

    def _on_signal(self, signum: int, _frame) -> None:
        for sig, old in self._handlers.items():  # a second signal acts as it would have
            signal.signal(sig, old)
        # the inbox's lock may be held by this very thread: close the source from another one
        threading.Thread(target=self._stop_serving, args=(signal.Signals(signum).name,), daemon=True).start()

    def _stop_serving(self, why: str) -> None:
        _log.warning("%s: serving stops once the requests in flight are done; new ones are refused", why)
        self.source.close()

    def outcome(self, code: int) -> int:
        """The run's exit code: a front-end that died fails a run that would have succeeded."""
        return 1 if code == 0 and self.failed else code

    def close(self) -> None:
        """After serving: the last words to the front-ends, then the front-end process stops (while its
        link is still up: it would try to connect again), then the link."""
        self._stopping = True
        if threading.current_thread() is threading.main_thread():
            for sig, old in self._handlers.items():
                signal.signal(sig, old)
        self.service.finish()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(self.cfg.serve.frontend_stop_timeout_s)
            except subprocess.TimeoutExpired:
                _log.warning("the front-end process did not stop in %.0fs: killing it", self.cfg.serve.frontend_stop_timeout_s)
                self.proc.kill()
                self.proc.wait()
        self.service.close()
