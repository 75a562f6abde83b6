"""A stage worker: the child process that owns one stage's weights and KV cache and runs its steps.

It is forked by its rank's zygote, announces itself in the store (``member/<name>``), loads its
layers, builds its edges (in the layout's global order) and then serves one inbox, fed by a receiver
thread per inbound edge: plans (with activations) from its predecessor, KV chunks from prompt stages
(token stages), and ``Stop``, which travels down the pipeline and ends every worker in turn.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass

import torch

from .. import log
from ..comm.edge import Edge
from ..comm.store import StoreAddress, connect, get_json, put_json
from ..config import RunConfig
from ..engine.decode_graphs import DecodeGraphs, capturable
from ..engine.kv_cache import CacheSpec, KVCache
from ..engine.kv_stream import KVReceiver, KVStreamer
from ..engine.plan import EdgeBroken, KVAck, KVChunk, StepPlan, StepResult, Stop
from ..engine.runner import StageRunner
from ..engine.swap import Swapper
from ..errors import PipelineError, UserError
from .devices import data_backend, placement, resolve_device, resolve_dtype
from .layout import COORD, Layout, Member

_log = log.get(__name__)

IDLE_TIMEOUT_S = 7 * 24 * 3600.0
"""A receiver thread waits this long for its peer's next message; a dead peer is reported sooner by
the transport or by the peer's supervisor."""


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


def member_key(name: str) -> str:
    return f"member/{name}"


def main(spec: WorkerSpec) -> int:
    """Entry point in the forked child; returns the exit code."""
    m, cfg = spec.member, spec.cfg
    log.setup(cfg.runtime.log_level, cfg.logs_dir / f"rank{spec.rank}-{m.name}.log", console_level="WARNING")
    log.set_identity(m.role, m.name, spec.rank)
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
    worker = Worker(spec, store, runner, device)
    worker.connect()
    _log.info("%s ready: layers %d..%d on %s", m.name, m.stage.first_layer, m.stage.layers[-1], device)
    try:
        steps = worker.serve()
    except PipelineError as e:  # a neighbour is gone: say so in one line and let the supervisor report
        _log.warning("stopping: %s", e)
        return 1
    worker.close()
    _log.info("stopped after %d steps%s", steps, f"; swapping {runner.swapper.stats()}" if runner.swapper else "")
    return 0


def _load(spec: WorkerSpec, device: torch.device) -> tuple[StageRunner, float]:
    from ..models.config import load_model_config
    from ..models.loader import load_stage

    t0 = time.monotonic()
    cfg, stage = spec.cfg, spec.member.stage
    mcfg = load_model_config(cfg.model)
    dtype = resolve_dtype(cfg.pipeline, device)
    model = load_stage(cfg.model, stage, dtype, device)
    swap = cfg.cache.swap and spec.member.role != "prompt"
    blocks = cfg.cache.swap_resident * cfg.cache.partition_blocks if swap else cfg.cache.num_blocks
    cache = CacheSpec(blocks, cfg.cache.block_size, mcfg.num_kv_heads, mcfg.head_dim)
    kv = KVCache(cache, stage.layers, dtype, device)
    swapper = Swapper(kv, cfg.swap_partitions, cfg.cache.swap_resident, cfg.cache.partition_blocks) if swap else None
    load_s = time.monotonic() - t0
    _log.info("loaded %d layers (%s) and a %d-token KV cache in %.2fs", stage.num_layers, dtype, cache.capacity_tokens, load_s)
    graphs = None
    decodes = spec.member.role != "prompt"
    if decodes and (cfg.pipeline.cuda_graphs == "on" or (cfg.pipeline.cuda_graphs == "auto" and device.type == "cuda")):
        max_len = min(cfg.cache.max_model_len or mcfg.max_position_embeddings, cache.capacity_tokens)
        graphs = DecodeGraphs(model, kv, cfg.cache.block_size, cfg.scheduler.max_batch_size, max_len,
                              capture=device.type == "cuda" and capturable(mcfg, dtype))
        graphs.capture_all()
    return StageRunner(model, kv, stage, cfg.cache.block_size, device, graphs, swapper), load_s


class Worker:
    """One stage's serving loop."""

    def __init__(self, spec: WorkerSpec, store, runner: StageRunner, device: torch.device) -> None:
        self.spec, self.store, self.runner, self.device = spec, store, runner, device
        self.me = spec.member
        self.edges: dict[str, Edge] = {}
        self.inbox: queue.Queue = queue.Queue()
        self._closing = False
        self.streamer: KVStreamer | None = None
        self.receiver: KVReceiver | None = None
        if self.me.role == "prompt":
            owner = lambda layer: spec.layout.owner_of_layer("token", layer).name  # noqa: E731
            self.streamer = KVStreamer(self._send_kv, owner)
            runner.kv.on_update = self.streamer.on_update
        elif self.me.role == "token":
            self.receiver = KVReceiver(runner.kv, spec.cfg.cache.block_size, runner.swapper)

    # -- edges ---------------------------------------------------------------------------------
    def connect(self) -> None:
        for peer in self.spec.layout.peers_of(self.me.name):
            self.edges[peer] = self._make_edge(peer)
        self.listen(self.me.prev)
        if self.me.prev != COORD:
            self.listen(COORD)  # control messages
        for src in self.spec.layout.kv_sources(self.me):
            self.listen(src.name)

    def _make_edge(self, peer: str) -> Edge:
        timeout = self.spec.cfg.runtime.comm_timeout_s
        gen = self.spec.generation
        if peer == COORD:
            return Edge(self.store, self.me.name, peer, gen, timeout)
        mine = get_json(self.store, member_key(self.me.name))
        other = get_json(self.store, member_key(peer), timeout_s=self.spec.cfg.runtime.startup_timeout_s)
        return Edge(self.store, self.me.name, peer, gen, timeout, data_backend(mine, other), self.device)

    def listen(self, peer: str) -> None:
        """A daemon thread moving everything ``peer`` sends into the inbox."""
        edge = self.edges[peer]

        def pump() -> None:
            while True:
                try:
                    msg, t = edge.recv(IDLE_TIMEOUT_S)
                except Exception as e:  # the peer died or the link broke: the loop decides what that means
                    if not self._closing:
                        self.inbox.put((peer, EdgeBroken(peer, str(e).splitlines()[0][:300]), None))
                    return
                self.inbox.put((peer, msg, t))
                if isinstance(msg, Stop):
                    return

        threading.Thread(target=pump, name=f"recv-{peer}", daemon=True).start()

    # -- serving -------------------------------------------------------------------------------
    def serve(self) -> int:
        steps = 0
        while True:
            peer, msg, x = self.inbox.get()
            if isinstance(msg, StepPlan):
                self._step(msg, x)
                steps += 1
            elif isinstance(msg, KVChunk):
                self._take_kv(msg, x)
            elif isinstance(msg, Stop):
                self._stop(msg)
                return steps
            elif isinstance(msg, EdgeBroken):
                self._broken(msg)
            else:
                raise PipelineError(f"{self.me.name}: unexpected {type(msg).__name__} from {peer}")

    def _step(self, plan: StepPlan, x: torch.Tensor | None) -> None:
        if self.streamer is not None:
            seqs = {**self.runner.seqs, **plan.new_seqs}
            self.streamer.begin(plan, seqs)
        if self.receiver is not None and plan.release:
            self.receiver.forget(plan.release)
        out = self.runner.step(plan, x)
        nxt = self.edges[self.me.next]
        if isinstance(out, StepResult):
            nxt.send(out)
        else:
            nxt.send(plan, out)

    def _send_kv(self, owner: str, chunk: KVChunk, kv_2TKD: torch.Tensor) -> None:
        self.edges[owner].send(chunk, kv_2TKD)

    def _take_kv(self, chunk: KVChunk, kv_2TKD: torch.Tensor | None) -> None:
        assert self.receiver is not None and kv_2TKD is not None
        done = self.receiver.apply(chunk, kv_2TKD)
        if done:
            self.edges[COORD].send(KVAck(self.me.name, [s for s, _ in done], [b for _, b in done]))

    def _stop(self, msg: Stop) -> None:
        if not msg.forward:
            _log.info("told to stop: %s", msg.reason)
            return
        for name, edge in self.edges.items():
            if name != self.me.next:
                edge.flush()  # KV still on its way to token stages
        nxt = self.edges[self.me.next]
        nxt.send(msg)
        nxt.flush()

    def close(self) -> None:
        """Abort every edge so that receiver threads blocked on them return."""
        self._closing = True
        for edge in self.edges.values():
            edge.close()

    def _broken(self, msg: EdgeBroken) -> None:
        if self.me.role == "token" and msg.peer in {p.name for p in self.spec.layout.kv_sources(self.me)}:
            _log.warning("KV edge from %s broke (%s); its prefills will be redone", msg.peer, msg.error)
            return
        raise PipelineError(f"{self.me.name}: edge to {msg.peer} broke: {msg.error}")
