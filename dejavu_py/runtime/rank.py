"""What one rank process does: validate, fork its zygote, start its workers, supervise; rank 0 also
runs the coordinator. Returns the exit code."""
from __future__ import annotations

import sys
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


def run_rank(cfg: RunConfig, info: RankInfo, report: Callable[[UserError], None]) -> int:
    """``report``: says a user's mistake found once workers started: on rank 0 before the other ranks
    learn that the run is over (they exit then, and the launcher stops rank 0 when one does), on the
    others as they learn it, since the launcher may see one of them fail first (user_errors.py)."""
    model_cfg, layout = prepare(cfg, info.world_size, info.rank)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    level = cfg.runtime.log_level
    log.setup(level, cfg.logs_dir / f"rank{info.rank}-supervisor.log", console_level=level if info.rank == 0 else "WARNING")
    log.set_identity("coord" if info.rank == 0 else "sup", "-", info.rank)
    coordinator = None
    if info.rank == 0:
        from dejavu_py.coordinator.coordinator import Coordinator

        coordinator = Coordinator(cfg, layout, model_cfg, store=None)
        source = coordinator.load_requests()  # whole-file mistakes fail here, before any worker starts
    sys.stdout.flush()
    sys.stderr.flush()
    zygote = Zygote.start()  # still single-threaded: safe to fork
    addr, host_server = resolve_address(info, cfg.runtime.startup_timeout_s)
    store = connect(addr, host_server)
    sup = Supervisor(cfg, info.rank, info.local_rank, store, addr, zygote, layout)
    try:
        sup.start_workers()
        if coordinator is None:
            code = sup.wait_done()
            error = get_json(store, keys.DONE).get("error")
            if error:
                report(UserError(error))
        else:
            coordinator.store, coordinator.addr = store, addr
            code = _coordinate(coordinator, source, store, sup, report)
        if host_server:  # the other ranks still need the store to learn that the run is over
            sup.wait_ranks_left(info.world_size - 1, cfg.runtime.comm_timeout_s)
        return code
    finally:
        sup.shutdown()


def _coordinate(coordinator, source, store, sup: Supervisor, report: Callable[[UserError], None]) -> int:
    code, error = 1, None
    try:
        code = coordinator.run(source)
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
