"""A stage worker: the child process that owns one stage's weights and KV cache and runs its steps.

It is forked by its rank's zygote (or is a standby taking over), announces itself in the store
(``member/<name>``), loads its layers, beats its heart, and hands over to the serving loop
(``stage.loop.Worker``), which builds its edges and serves until told to stop.
"""
from __future__ import annotations

import gc
import os
import sys
import time
from dataclasses import dataclass

import torch

from dejavu_py import log
from dejavu_py.comm.heartbeat import beat_interval, start_beating
from dejavu_py.comm.store import StoreAddress, connect, put_json
from dejavu_py.config import RunConfig
from dejavu_py.errors import PipelineError, UserError
from dejavu_py.protocol import keys
from dejavu_py.protocol.layout import Layout, Member
from dejavu_py.stage.devices import placement, resolve_device
from dejavu_py.stage.loop import Worker
from dejavu_py.stage.runner import StageRunner
from dejavu_py.stage.stage_load import load_runner

_log = log.get(__name__)

GIL_SWITCH_S = 1e-4
"""The interpreter's switch interval in a worker. The stage's thread lets the GIL go at every torch call;
a background thread (replica sender and receiver, edge receivers) that takes it then keeps it until it
blocks or this interval ends. Python's default, 5 ms, is longer than a decode step's whole launch."""


@dataclass
class WorkerSpec:
    """What a forked worker needs to become a stage (picklable: it crosses the zygote pipe)."""

    member: Member
    layout: Layout
    cfg: RunConfig
    store: StoreAddress
    rank: int
    local_rank: int
    generation: int = 0
    """Incremented each time the member is replaced; keys its edges."""


def main(spec: WorkerSpec) -> int:
    """Entry point in the forked child; returns the exit code."""
    store = connect(spec.store)
    return run_member(spec, store, None)


def run_member(spec: WorkerSpec, store, runner: StageRunner | None, takeover: bool = False) -> int:
    """Become ``spec.member`` (loading its stage unless ``runner`` has it) and serve until stopped."""
    m, cfg = spec.member, spec.cfg
    log.setup(cfg.runtime.log_level, cfg.logs_dir / f"rank{spec.rank}-{m.name}.log", console_level="WARNING")
    log.set_identity(m.role, m.name, spec.rank)
    torch.set_num_threads(cfg.pipeline.threads)
    sys.setswitchinterval(GIL_SWITCH_S)
    beating = start_beating(store, m.name, spec.generation, beat_interval(cfg.ft.hang_timeout_s))
    t0 = time.monotonic()
    try:
        device = resolve_device(cfg.pipeline, spec.local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        info = {"pid": os.getpid(), "zygote_pid": os.getppid(), "rank": spec.rank, "role": m.role, "stage": m.stage.index,
                "generation": spec.generation, "takeover": takeover, **placement(device)}
        put_json(store, keys.member(m.name), {**info, "state": "loading"})
        if runner is None:
            runner, _ = load_runner(spec, device)
    except UserError as e:
        put_json(store, keys.error(m.name), str(e))  # rank 0 reports it as the run's error
        _log.info("cannot start: %s", e)
        return 2
    put_json(store, keys.member(m.name), {**info, "state": "ready", "load_s": time.monotonic() - t0})
    worker = Worker(spec, store, runner, device)
    worker.connect()
    gc.freeze()  # the model and everything loading made: a full collection mid-run would walk it all
    _log.info("%s ready at generation %d: layers %d..%d on %s", m.name, spec.generation, m.stage.first_layer,
              m.stage.layers[-1], device)
    try:
        steps = worker.serve()
    except PipelineError as e:  # cannot go on (fault tolerance off, or the coordinator is gone)
        _log.warning("stopping: %s", e)
        return 1
    finally:
        beating.set()
    worker.close()
    _log.info("stopped after %d steps%s", steps, f"; swapping {runner.swapper.stats()}" if runner.swapper else "")
    return 0
