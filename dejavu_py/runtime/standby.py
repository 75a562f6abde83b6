"""A warm standby: a forked process with torch imported and its device context made (and, with
--standby-preload, one stage's weights, KV cache and decode graphs ready), waiting to be told which
failed member to become. Taking over then skips the process start and, when preloaded with that
stage, the weights too.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from dejavu_py import log
from dejavu_py.comm.store import StoreAddress, connect, get_json, has, put_json
from dejavu_py.config import RunConfig
from dejavu_py.protocol import keys
from dejavu_py.protocol.layout import Layout, Member
from dejavu_py.stage.devices import resolve_device

_log = log.get(__name__)






@dataclass
class StandbySpec:
    standby_id: str
    layout: Layout
    cfg: RunConfig
    store: StoreAddress
    rank: int
    """The host's first rank, whose supervisor keeps this standby."""
    local_rank: int
    """Picks the device whose context is made ahead."""
    preload: Member | None = None
    """The stage whose weights are loaded ahead, if any."""


def main(spec: StandbySpec) -> int:
    from dejavu_py.stage.stage_load import load_runner
    from dejavu_py.stage.worker import WorkerSpec, run_member

    cfg = spec.cfg
    log.setup(cfg.runtime.log_level, cfg.logs_dir / f"rank{spec.rank}-standby{spec.standby_id}.log", console_level="WARNING")
    log.set_identity("standby", spec.standby_id, spec.rank)
    torch.set_num_threads(cfg.pipeline.threads)
    store = connect(spec.store)
    device = resolve_device(cfg.pipeline, spec.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.empty(1, device=device)  # the context, made now rather than at takeover
    runner = None
    if spec.preload is not None:
        runner, _ = load_runner(WorkerSpec(spec.preload, spec.layout, cfg, spec.store, spec.preload.rank,
                                           spec.local_rank), device)
    put_json(store, keys.standby(spec.standby_id), {"pid": os.getpid(), "state": "ready",
                                                  "preload": spec.preload.name if spec.preload else None})
    _log.info("standby ready (device %s, preloaded %s)", device, spec.preload.name if spec.preload else "nothing")
    while not has(store, keys.assign(spec.standby_id)):
        time.sleep(0.005)
    a = get_json(store, keys.assign(spec.standby_id))
    member = spec.layout.by_name(a["member"])
    wspec = WorkerSpec(member, spec.layout, cfg, spec.store, member.rank, a["local_rank"], a["generation"])
    if runner is not None and (spec.preload is None or spec.preload.name != member.name):
        runner = None  # preloaded another stage: load this one
    _log.info("taking over %s at generation %d", member.name, wspec.generation)
    return run_member(wspec, store, runner, takeover=True)
