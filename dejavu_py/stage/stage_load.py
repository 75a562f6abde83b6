"""Building a stage: its layers, KV cache, replica buffers, compiled kernels and decode graphs."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch

from dejavu_py import log
from dejavu_py.models.kv_cache import CacheSpec, KVCache
from dejavu_py.stage.decode_graphs import DecodeGraphs, capturable
from dejavu_py.stage.devices import resolve_dtype
from dejavu_py.stage.runner import StageRunner
from dejavu_py.stage.stage_ft import host_reservation, replica_store_for
from dejavu_py.stage.swap import Swapper

if TYPE_CHECKING:
    from dejavu_py.stage.worker import WorkerSpec

_log = log.get(__name__)


def load_runner(spec: WorkerSpec, device: torch.device) -> tuple[StageRunner, float]:
    from dejavu_py.models.config import load_model_config
    from dejavu_py.models.loader import load_stage

    t0 = time.monotonic()
    cfg, stage = spec.cfg, spec.member.stage
    mcfg = load_model_config(cfg.model)
    dtype = resolve_dtype(cfg.pipeline, device)
    swap = cfg.cache.swap and spec.member.role != "prompt"
    blocks = cfg.cache.swap_resident * cfg.cache.partition_blocks if swap else cfg.cache.num_blocks
    cache = CacheSpec(blocks, cfg.cache.block_size, mcfg.num_kv_heads, mcfg.head_dim)
    with ThreadPoolExecutor(1) as pool:  # pinning GBs of host memory for the replica overlaps the weights' load
        replica = pool.submit(replica_store_for, cfg, spec.layout, spec.member, cache, device, dtype)
        model = load_stage(cfg.model, stage, dtype, device, cfg.kernels)
        kv = KVCache(cache, stage.layers, dtype, device)
        replica_store = replica.result()
    swapper = Swapper(kv, cfg.swap_partitions, cfg.cache.swap_resident, cfg.cache.partition_blocks) if swap else None
    load_s = time.monotonic() - t0
    _log.info("loaded %d layers (%s) and a %d-token KV cache in %.2fs", stage.num_layers, dtype, cache.capacity_tokens, load_s)
    runner = StageRunner(model, kv, stage, cfg.cache.block_size, device, None, swapper)
    runner.replica_store = replica_store
    if device.type == "cuda":
        # FT's pinned buffers now: a page-locked allocation while serving stalls the stage (see HostBuffers)
        runner.host.reserve(host_reservation(cfg, spec.layout, spec.member, mcfg, cache, stage.layers, dtype))
        # compile the fused MoE kernels for every block-size regime now
        runner.warmup(sorted({1, 16, min(256, cfg.scheduler.max_batch_tokens), cfg.scheduler.max_batch_tokens}))
    graphs = None
    decodes = spec.member.role != "prompt"
    if decodes and (cfg.pipeline.cuda_graphs == "on" or (cfg.pipeline.cuda_graphs == "auto" and device.type == "cuda")):
        max_len = min(cfg.cache.max_model_len or mcfg.max_position_embeddings, cache.capacity_tokens)
        graphs = DecodeGraphs(model, kv, cfg.cache.block_size, cfg.scheduler.max_batch_size, max_len,
                              capture=device.type == "cuda" and capturable(mcfg, dtype), record=cfg.ft.enabled)
        graphs.capture_all()
    runner.graphs = graphs
    return runner, load_s
