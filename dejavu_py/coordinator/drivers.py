"""The driver a run needs (coordinator/driver.py): colocated, or disaggregated, with their schedulers
and KV block spaces sized from the run's configuration and where its stages run."""
from __future__ import annotations

from collections.abc import Callable

from dejavu_py.comm.store import get_json
from dejavu_py.config import RunConfig
from dejavu_py.coordinator.block_manager import BlockManager
from dejavu_py.coordinator.colocated import ColocatedDriver
from dejavu_py.coordinator.disagg import DisaggDriver
from dejavu_py.coordinator.driver import Driver
from dejavu_py.coordinator.prefill_scheduler import PrefillScheduler
from dejavu_py.coordinator.scheduler import Scheduler
from dejavu_py.protocol import keys
from dejavu_py.protocol.layout import Layout
from dejavu_py.protocol.plan import StepCounter


def build_driver(cfg: RunConfig, layout: Layout, eos_ids: tuple[int, ...], store, steps: StepCounter,
                 send: Callable[[str, object], None]) -> Driver:
    """``store``: where the members announced their devices (their microbatches follow from them)."""
    gen, cache, sc = cfg.generation, cfg.cache, cfg.scheduler
    stop_ids = frozenset() if gen.ignore_eos else frozenset(eos_ids)
    decode_pipe = layout.decode_pipeline
    mbs = microbatches(cfg, layout, decode_pipe, store)
    if cache.swap:  # one partition per decode microbatch, in a block space larger than the device's
        blocks = BlockManager(mbs * cache.partition_blocks, cache.block_size, partitions=mbs)
    else:
        blocks = BlockManager(cache.num_blocks, cache.block_size)
    depth = 2 if cfg.pipeline.async_scheduling and not cache.swap else 1
    decode = Scheduler(sc, blocks, mbs, stop_ids, steps, history=cfg.ft.max_checkpoints, depth=depth)
    if not layout.disaggregated:
        return ColocatedDriver(decode, decode_pipe, send)
    prompt_pipe = layout.pipeline("prompt")
    prefill = PrefillScheduler(sc, BlockManager(cache.num_blocks, cache.block_size), blocks,
                               microbatches(cfg, layout, prompt_pipe, store), stop_ids, steps)
    return DisaggDriver(prefill, decode, prompt_pipe, decode_pipe, send)


def microbatches(cfg: RunConfig, layout: Layout, pipeline, store) -> int:
    """One microbatch per stage keeps every stage busy when each has its own processor. Stages
    sharing a GPU take turns on it anyway, and each extra microbatch would read their weights
    once more per step: there, one microbatch per distinct GPU."""
    if cfg.cache.swap and pipeline == layout.decode_pipeline:
        return cfg.swap_partitions
    if cfg.pipeline.microbatches:
        return cfg.pipeline.microbatches
    places = [get_json(store, keys.member(m.name)) for m in pipeline]
    if all(p["device"] == "cpu" for p in places):
        return len(places)
    return len({(p["host"], p["device"]) for p in places})
