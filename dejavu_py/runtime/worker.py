"""A stage worker: the child process that owns one stage's weights and KV cache and runs its steps.

It is forked by its rank's zygote, announces itself in the store (``member/<name>``), loads its
layers, connects the edges to its neighbours and then loops: receive a plan (and activations),
compute, pass on. A ``Stop`` plan travels down the pipeline and ends every worker in turn.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from .. import log
from ..comm.edge import Edge
from ..comm.store import StoreAddress, connect, get_json, put_json
from ..config import RunConfig
from ..engine.decode_graphs import DecodeGraphs, capturable
from ..engine.kv_cache import CacheSpec, KVCache
from ..engine.plan import StepResult, Stop
from ..engine.runner import StageRunner
from ..errors import UserError
from .devices import data_backend, placement, resolve_device, resolve_dtype
from .layout import COORD, Member

_log = log.get(__name__)


@dataclass
class WorkerSpec:
    """What a forked worker needs to become a stage (picklable: it crosses the zygote pipe)."""

    member: Member
    cfg: RunConfig
    store: StoreAddress
    rank: int
    local_rank: int
    generation: int = 0
    """Incremented each time the member is replaced; keys its edges."""


def member_key(name: str) -> str:
    return f"member/{name}"


def main(spec: WorkerSpec) -> int:
    """Entry point in the forked child; returns the exit code."""
    m, cfg = spec.member, spec.cfg
    log.setup(cfg.runtime.log_level, cfg.logs_dir / f"rank{spec.rank}-{m.name}.log", console_level="WARNING")
    log.set_identity(m.role, m.stage.index, spec.rank)
    torch.set_num_threads(cfg.pipeline.threads)
    store = connect(spec.store)
    try:
        device = resolve_device(cfg.pipeline, spec.local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        info = {"pid": os.getpid(), "rank": spec.rank, "role": m.role, "stage": m.stage.index, **placement(device)}
        put_json(store, member_key(m.name), {**info, "state": "loading", "generation": spec.generation})
        runner, load_s = _load(spec, device)
    except UserError as e:
        put_json(store, f"error/{m.name}", str(e))  # rank 0 reports it as the run's error
        _log.info("cannot start: %s", e)
        return 2
    put_json(store, member_key(m.name), {**info, "state": "ready", "generation": spec.generation, "load_s": load_s})
    in_edge, out_edge = _connect_edges(spec, store, device)
    _log.info("stage %d ready: layers %d..%d on %s", m.stage.index, m.stage.first_layer, m.stage.layers[-1], device)
    steps = _serve(runner, in_edge, out_edge, cfg.runtime.comm_timeout_s)
    _log.info("stopped after %d steps", steps)
    return 0


def _load(spec: WorkerSpec, device: torch.device) -> tuple[StageRunner, float]:
    from ..models.config import load_model_config
    from ..models.loader import load_stage

    t0 = time.monotonic()
    cfg, stage = spec.cfg, spec.member.stage
    mcfg = load_model_config(cfg.model)
    dtype = resolve_dtype(cfg.pipeline, device)
    model = load_stage(cfg.model, stage, dtype, device)
    cache = CacheSpec(cfg.cache.num_blocks, cfg.cache.block_size, mcfg.num_kv_heads, mcfg.head_dim)
    kv = KVCache(cache, stage.layers, dtype, device)
    load_s = time.monotonic() - t0
    _log.info("loaded %d layers (%s) and a %d-token KV cache in %.2fs", stage.num_layers, dtype, cache.capacity_tokens, load_s)
    graphs = None
    if cfg.pipeline.cuda_graphs == "on" or (cfg.pipeline.cuda_graphs == "auto" and device.type == "cuda"):
        max_len = min(cfg.cache.max_model_len or mcfg.max_position_embeddings, cache.capacity_tokens)
        graphs = DecodeGraphs(model, kv, cfg.cache.block_size, cfg.scheduler.max_batch_size, max_len,
                              capture=device.type == "cuda" and capturable(mcfg, dtype))
        graphs.capture_all()
    return StageRunner(model, kv, stage, cfg.cache.block_size, device, graphs), load_s


def _edge_to(spec: WorkerSpec, store, peer: str, device: torch.device) -> Edge:
    timeout = spec.cfg.runtime.comm_timeout_s
    if peer == COORD:
        return Edge(store, spec.member.name, peer, spec.generation, timeout)
    me = get_json(store, member_key(spec.member.name))
    other = get_json(store, member_key(peer), timeout_s=spec.cfg.runtime.startup_timeout_s)
    backend = data_backend(me, other)
    return Edge(store, spec.member.name, peer, spec.generation, timeout, data_backend=backend, device=device)


def _connect_edges(spec: WorkerSpec, store, device: torch.device) -> tuple[Edge, Edge]:
    """In-edge first, then out-edge: along the ring every join finds its peer, so nobody deadlocks."""
    m = spec.member
    in_edge = _edge_to(spec, store, m.prev, device)
    out_edge = in_edge if m.next == m.prev else _edge_to(spec, store, m.next, device)
    return in_edge, out_edge


def _serve(runner: StageRunner, in_edge: Edge, out_edge: Edge, timeout_s: float) -> int:
    steps = 0
    while True:
        msg, x = in_edge.recv(timeout_s)
        if isinstance(msg, Stop):
            out_edge.send(msg)
            out_edge.flush()
            return steps
        out = runner.step(msg, x)
        if isinstance(out, StepResult):
            out_edge.send(out)
        else:
            out_edge.send(msg, out)
        steps += 1
