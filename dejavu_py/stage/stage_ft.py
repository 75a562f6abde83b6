"""Fault tolerance inside a decode-pipeline stage worker (colocated or token stage).

Per step: wait if the KV replica lags too far (back-pressure); once the step is finished and its
output on its way, keep its MoE routing for the coordinator (it rides down the pipeline with the next
plan this stage sends on; the last stage's with its next result), record its token-state checkpoint and
stream its K/V to the replica holder, in the worker's idle time. On
the replica edges a receiver thread keeps the replica of the ring predecessor and passes
acknowledgements back. At recovery it answers the coordinator: ship a replica to a
replacement, re-replicate to a replaced holder, tell which steps it can feed a replay from, feed it;
and, on a replacement, restore its KV from the replica and count the replayed steps, checking their routing.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import socket
from typing import TYPE_CHECKING, Protocol

import torch

from dejavu_py import log
from dejavu_py.comm.receiver import start_receiver
from dejavu_py.comm.store import get_json, has, put_json
from dejavu_py.protocol import keys
from dejavu_py.protocol.plan import KVChunk, StepPlan, StepResult, StepRouting
from dejavu_py.protocol.recovery import (
    Replayed,
    ReplayHave,
    ReplayQuery,
    ReplaySteps,
    ReplicaQuery,
    Rereplicate,
)
from dejavu_py.protocol.replica import ReplicaAck, ReplicaChunk, ReplicaCoverage
from dejavu_py.stage import replica_shm
from dejavu_py.stage.checkpoints import TokenStateRing, routing_mismatches
from dejavu_py.stage.ft_off import FTOff
from dejavu_py.stage.kv_restore import restore_into_cache
from dejavu_py.stage.port import StagePort
from dejavu_py.stage.replica_sender import PIECE_BYTES, ReplicaSender
from dejavu_py.stage.replica_shm import ReplicaShm
from dejavu_py.stage.replica_store import ReplicaStore, covered_slots

if TYPE_CHECKING:
    from dejavu_py.config import RunConfig
    from dejavu_py.models.kv_cache import CacheSpec
    from dejavu_py.protocol.layout import Layout, Member
    from dejavu_py.stage.dispatch import MessageTable
    from dejavu_py.stage.runner import Launched, StageRunner

_log = log.get(__name__)

ATTACHED_ROUTING_BYTES = 64 << 10
"""A step's routing record up to this size (a decode step's, a few KB) rides
to the coordinator with the pipeline's next messages. A larger one (a batch of prompts': MBs) goes to the
coordinator on its own, from the idle time: riding along, its pickling and unpickling at every hop
lengthened the first decode step after the prompts."""


def ft_applies(cfg: RunConfig, me: Member) -> bool:
    """Whether the stage keeps fault tolerance: FT is on and it decodes (a prompt stage's work is redone
    from the prompt instead)."""
    return cfg.ft.enabled and me.role in ("stage", "token")


def fault_tolerance(port: FTPort, runner: StageRunner) -> StageFT | FTOff:
    """The stage's fault tolerance, or (``ft_applies`` false) the object that does nothing in its place."""
    return StageFT(port, runner) if ft_applies(port.cfg, port.me) else FTOff(port.cfg, runner)


def replica_store_for(cfg: RunConfig, layout: Layout, me: Member, spec: CacheSpec, device: torch.device,
                      dtype: torch.dtype) -> ReplicaStore | None:
    """Host buffers for the replica ``me`` holds of its ring predecessor's cache (None when it holds none)."""
    source = layout.replica_source(me.name) if ft_applies(cfg, me) else None
    if source is None:
        return None
    blocks = cfg.swap_partitions * cfg.cache.partition_blocks if cfg.cache.swap else cfg.cache.num_blocks
    shm_dir = cfg.ft.shm_dir
    path = replica_shm.replica_path(shm_dir, cfg.run_dir, me.name) if shm_dir else None
    return ReplicaStore(source, layout.by_name(source).stage.layers, (blocks + 1) * spec.block_size, spec.num_kv_heads,
                        spec.head_dim, dtype, device.type == "cuda", path)


def host_reservation(cfg: RunConfig, layout: Layout, me: Member, mcfg, spec: CacheSpec, layers: list[int],
                     dtype: torch.dtype) -> list[int]:
    """The pinned host buffers (bytes) this stage's fault tolerance takes while serving, to be reserved
    when the stage is built (``HostBuffers.reserve``): a decode step's K/V at the largest batch, for every
    step the replica may lag and the few in flight; an eager step's routing (the prompts); and the pieces
    of a prompt's replica in flight. Empty when FT is off for the stage."""
    if not ft_applies(cfg, me):
        return []
    elem = dtype.itemsize
    step_kv = 2 * len(layers) * cfg.scheduler.max_batch_size * spec.num_kv_heads * spec.head_dim * elem
    moe = sum(mcfg.is_moe_layer(i) for i in layers)
    routing = 2 * moe * cfg.scheduler.max_batch_tokens * max(mcfg.num_experts_per_tok, 1) * 4 if moe else 0
    sizes = [step_kv] * (cfg.ft.replica_lag + 3) + [routing] * 2
    if layout.replica_holder(me.name) is not None:
        sizes += [PIECE_BYTES] * (ReplicaSender.AHEAD + 1)  # those copied ahead, and the one being written
    return sizes


class FTPort(StagePort, Protocol):
    """The worker as fault tolerance sees it: the stage's port, and the end of a replacement's wait."""

    def resume_after_restore(self) -> None:
        """This replacement's KV is back from the replica: if its Restore came too, serve what waited."""
        ...


class StageFT:
    """A decode stage's fault tolerance, given the worker's port and the stage's runner (made only where
    ``ft_applies``; ``FTOff`` stands in elsewhere)."""

    def __init__(self, port: FTPort, runner: StageRunner) -> None:
        self.port, self.runner = port, runner
        ft, layout, me = port.cfg.ft, port.layout, port.me.name
        self.holder = layout.replica_holder(me)
        self.source = layout.replica_source(me)
        mcfg = runner.model.cfg
        self.ring = TokenStateRing(ft.checkpoint_policy, ft.checkpoint_interval, ft.max_checkpoints,
                                   mcfg.num_experts or 0)
        self.sender = ReplicaSender(me, runner.kv, ft.replica_lag, self._send_replica) if self.holder else None
        if self.sender is not None:
            self.sender.buffers = runner.host
            if runner.device.type == "cuda":
                self.sender.defer_copy, self.sender.flush_deferred = runner.defer_copy, runner.flush_deferred_copies
        self.store = None
        if self.source:  # made ahead with the stage (a preloaded standby has it), else now
            self.store = runner.replica_store or replica_store_for(port.cfg, layout, port.me, runner.kv.spec,
                                                                   runner.device, runner.model.dtype)
            if self.store.path is not None:  # a replica file of the worker we replace is stale now
                replica_shm.remove_stale(self.store.path.parent, port.cfg.run_dir, me)
            where = self.store.describe(me)  # published even when empty: it replaces a dead holder's
            put_json(port.store, keys.replica_file(me), dataclasses.asdict(where) if where else {})
        self.rep_edges: dict = {}
        self.unsent_routing: list[StepRouting] = []
        """This stage's routing records not yet sent on (``attach_routing``)."""
        self.replay_left = -1
        self.replayed = 0
        self.mismatches = 0
        self.awaiting_bookkeeping: collections.deque[tuple[Launched, object]] = collections.deque()
        """Finished steps (with their outputs) whose bookkeeping (``bookkeep``) waits for the worker's
        loop to be idle: off the chain of launches. With the steps the worker has launched and not
        finished, at most one, as many as an unfinished step would be: the coordinator's routing record
        and the replica lag the same."""
        self.restore_from: str | None = None
        """A replacement: the replica holder its KV comes from (set by its Restore)."""
        self.kv_restored = False
        runner.enable_recording()

    # -- edges -----------------------------------------------------------------------------------
    def connect(self, generation: int, peers: list[str] | None = None) -> tuple[dict, replica_shm.Replica | None, str | None]:
        """Replica edges (to the holder and from the source), built after the main edges, and the
        holder's replica file mapped when it is on this host (its edge is up: it has published it)."""
        from dejavu_py.comm.edge import Edge
        from dejavu_py.comm.store import connect

        wanted = self.port.layout.replica_peers_of(self.port.me.name)
        if peers is not None:
            wanted = [p for p in wanted if p in peers]
        edges = {p: Edge(connect(self.port.store_address), self.port.me.name, p, generation,
                         self.port.cfg.runtime.comm_timeout_s, channel="rep") for p in wanted}
        mapped, client = None, connect(self.port.store_address) if self.holder in edges else None
        where = get_json(client, keys.replica_file(self.holder)) if client is not None and has(client, keys.replica_file(self.holder)) else {}
        if where:
            mapped = replica_shm.attach(ReplicaShm(**where))
            _log.info("replica for %s: %s", self.holder, "its shared file" if mapped is not None else "over the replica edge")
        return edges, mapped, where.get("path") if mapped is not None else None

    def install(self, got: tuple[dict, replica_shm.Replica | None, str | None]) -> None:
        edges, mapped, path = got
        if self.sender is not None and self.holder in edges:
            self.sender.attach(mapped, path)
            if mapped is not None:  # a replacement's restore reads it all soon; steps write a new page each
                replica_shm.prefault(mapped.kv_2LNKD)
        for peer, edge in edges.items():
            old = self.rep_edges.pop(peer, None)
            if old is not None:
                old.close()
            self.rep_edges[peer] = edge
            start_receiver(edge, peer, self._deliver(peer, edge), functools.partial(self.port.post, peer),
                           lambda: self.port.closing)

    def drop(self, failed: list[str]) -> None:
        for peer in failed:
            edge = self.rep_edges.pop(peer, None)
            if edge is not None:
                edge.close()
        if self.sender is not None and self.holder in failed:
            self.sender.reset()  # a new holder starts empty: we re-replicate when told

    def _deliver(self, peer: str, edge):
        """What the replica edges' receiver does with a message: acknowledgements to the sender, our own
        KV coming back to the main loop, a remote source's chunk into the replica (and its acknowledgement)."""

        def deliver(msg: object, t: object) -> bool:
            if isinstance(msg, ReplicaAck) and self.sender is not None:
                self.sender.acked(msg)
            elif isinstance(msg, ReplicaChunk) and msg.source == self.port.me.name:
                self.port.post(peer, msg, t)  # our own KV coming back: the main loop writes it
            elif isinstance(msg, ReplicaChunk) and self.store is not None:  # from a source on another host
                self.store.apply(msg, t)
                if msg.acks():
                    try:
                        edge.send(ReplicaAck(msg.source, msg.acks()))
                    except Exception:  # the source died; its replacement will be told what we hold
                        pass
            return False

        return deliver

    def _send_replica(self, msg: ReplicaChunk, kv: torch.Tensor) -> None:
        edge = self.rep_edges.get(self.holder)
        if edge is not None and not edge.closed:
            try:
                edge.send(msg, kv)
            except Exception as e:
                _log.warning("replica edge to %s: %s", self.holder, str(e).splitlines()[0][:200])

    # -- per step --------------------------------------------------------------------------------
    def before_step(self, plan: StepPlan) -> None:
        if self.sender is not None and plan.replay_until is None and plan.mb >= 0:
            if not self.sender.wait_for(plan.mb, self.port.cfg.ft.hang_timeout_s):
                _log.warning("replica holder %s is %d steps behind on microbatch %d; going on", self.holder,
                             len(self.sender.unacked.get(plan.mb, [])), plan.mb)

    def after_step(self, done: Launched, out) -> bool:
        """What fault tolerance does on the pipeline's chain once a step is finished: the last stage's
        result takes the routing records relayed to it and its own of earlier steps (taking this step's
        record apart here would lengthen the chain). True when this stage ends a
        replay: the step is kept and its routing checked now, and nothing goes on. The rest waits for
        ``bookkeep``."""
        plan = done.plan
        if plan.replay_until != self.port.me.name:
            if isinstance(out, StepResult):
                out.relayed = plan.relayed + self.unsent_routing
                self.unsent_routing = []
            return False
        self.bookkeep(done, out)
        if plan.forced is not None:
            self.mismatches += routing_mismatches(plan, self.runner.ft_record(done).routing)
        self.replayed += 1
        self._maybe_done()
        return True

    def defer_bookkeeping(self, done: Launched, out) -> None:
        """A finished step whose output has gone on: its bookkeeping waits (``awaiting_bookkeeping``)."""
        self.awaiting_bookkeeping.append((done, out))

    def bookkeep_next(self) -> None:
        """The bookkeeping of the oldest step waiting for it."""
        self.bookkeep(*self.awaiting_bookkeeping.popleft())

    def bookkeep(self, done: Launched, out) -> None:
        """Off the chain (in the worker's idle time, see ``awaiting_bookkeeping``): keep the step's routing
        for the next plan this stage sends on (``attach_routing``; the last stage: its next result), or
        send a large one (a prompt's) to the coordinator now; then checkpoint the step's token state and
        send its K/V to the replica."""
        plan, rec = done.plan, self.runner.ft_record(done)
        if plan.replay_until != self.port.me.name:
            record = StepRouting(plan.mb, plan.step, self.port.me.name, rec.routing)
            if rec.routing.nbytes > ATTACHED_ROUTING_BYTES:
                self.port.send_coord(record)
            else:
                self.unsent_routing.append(record)
        self.ring.record(plan.mb, plan.step, plan.seq_ids, out if isinstance(out, torch.Tensor) else None, rec.routing)
        if self.sender is not None:
            self.sender.chunk(plan.mb, plan.step, plan.seq_ids, plan.start_pos, plan.num_tokens, rec.slots, rec.phys_slots,
                              rec.step_kv, rec.kv_ready)

    def attach_routing(self, plan: StepPlan) -> None:
        """Before ``plan`` goes on to the next stage: this stage's routing records go with it (a replay's
        plan ends before the last stage: nothing rides on it)."""
        if self.unsent_routing and plan.replay_until is None:
            plan.relayed = plan.relayed + self.unsent_routing
            self.unsent_routing = []

    def on_prompt_kv(self, chunk: KVChunk, kv_2TKD: torch.Tensor, slots: list[int]) -> None:
        """Token stage: the prompt KV that just arrived (written at ``slots``) goes on to the replica as it is."""
        if self.sender is None:
            return
        msg = ReplicaChunk(self.port.me.name, -1, -1, [chunk.layer], chunk.seq_ids, chunk.start_pos, chunk.num_tokens, slots)
        self.sender.forward(msg, kv_2TKD.unsqueeze(1))

    # -- recovery --------------------------------------------------------------------------------
    def register(self, table: MessageTable) -> None:
        """Its messages, all from recovery: the coordinator's questions and orders, and (a replacement)
        its own KV coming back from the replica holder."""
        table.register(ReplicaQuery, self._ship_replica)
        table.register(Rereplicate, self._rereplicate)
        table.register(ReplayQuery, self._answer_replay_query)
        table.register(ReplaySteps, self._feed_replay)
        table.register(ReplicaChunk, self._on_own_kv)

    def _on_own_kv(self, chunk: ReplicaChunk, kv: torch.Tensor | None) -> int:
        """A replacement's KV from the replica: once its Restore came too, it serves what waited."""
        self.restore_kv(chunk, kv)
        if self.restore_from is not None:
            self.port.resume_after_restore()
        return 0

    def expect_restore(self, replica_from: str | None, replay: int) -> bool:
        """A replacement's Restore: returns whether it can serve now (its replica KV, if any, is in)."""
        self.restore_from, self.replay_left = replica_from, replay
        self._maybe_done()
        return replica_from is None or self.kv_restored

    def restore_kv(self, chunk: ReplicaChunk, kv: torch.Tensor | None) -> None:
        """Our own KV from the replica holder (its bytes, or its file on this host), into the cache."""
        same_file = self.sender is not None and chunk.shm_path is not None and self.sender.shm_path == chunk.shm_path
        restore_into_cache(self.runner, chunk, kv, self.sender.shm if same_file else None)
        self.kv_restored = True
        _log.info("restored %d KV slots of %d sequences from their replica%s", len(chunk.slots), len(chunk.seq_ids),
                  " file" if chunk.shm_path else "")

    def _maybe_done(self) -> None:
        if self.replay_left >= 0 and self.replayed >= self.replay_left:
            self.port.send_coord(Replayed(self.port.me.name, self.replayed, self.mismatches))
            self.replay_left = -1

    def _answer_replay_query(self, msg: ReplayQuery, _: object = None) -> int:
        """Which of these steps this stage kept the output activations of (a replay can start here)."""
        have = [(mb, st) for mb, st in msg.steps if self.ring.has(st, mb)]
        self.port.send_coord(ReplayHave(self.port.me.name, have))
        return 0

    def _feed_replay(self, msg: ReplaySteps, _: object = None) -> int:
        """Send the replacement ``msg.until`` the plans to replay, with this stage's kept outputs."""
        for plan in msg.plans:
            cp = self.ring.get(plan.mb, plan.step)
            plan.replay_until = msg.until
            self.port.send_to(msg.until, plan, cp.out if cp is not None else None)
        return 0

    def _ship_replica(self, q: ReplicaQuery, _: object = None) -> int:
        """Tell the coordinator the coverage first (it plans the replay meanwhile), then ship the KV:
        the file's name to a replacement on this host, else the bytes."""
        bs = self.port.cfg.cache.block_size
        covered = self.store.coverage(q.tables, bs) if self.store is not None else {}
        slots = covered_slots(q.tables, covered, bs)
        nbytes = self.store.nbytes(len(slots), len(self.store.layers)) if slots else 0
        self.port.send_coord(ReplicaCoverage(q.source, covered, nbytes))
        if not slots:
            return 0
        sids = sorted(q.tables)
        chunk = ReplicaChunk(q.source, -1, -1, self.store.layers, sids, [0] * len(sids), [covered.get(s, 0) for s in sids], slots)
        if self.store.path is not None and self._same_host(q.to):
            self.rep_edges[q.to].send(dataclasses.replace(chunk, shm_path=str(self.store.path)))
        else:
            self.rep_edges[q.to].send(chunk, self.store.read(slots))
        return 0

    def _same_host(self, member: str) -> bool:

        key = keys.member(member)
        return has(self.port.store, key) and get_json(self.port.store, key).get("host") == socket.gethostname()

    def _rereplicate(self, msg: Rereplicate, _: object = None) -> int:
        sids = sorted(msg.tables)
        slots = covered_slots(msg.tables, msg.lengths, self.port.cfg.cache.block_size)
        kv = self.runner.kv
        if self.runner.swapper is not None:  # partitions may be on the device or at home on the host
            pairs = [self.runner.swapper.read(layer, slots) for layer in kv.layers]
        else:
            idx = torch.tensor(slots, dtype=torch.long, device=kv.device)
            pairs = [kv.read(layer, idx) for layer in kv.layers]
        data = torch.stack((torch.stack([k for k, _ in pairs]), torch.stack([v for _, v in pairs])))
        self.sender.forward(ReplicaChunk(self.port.me.name, -1, -1, list(kv.layers), sids, [0] * len(sids),
                                         [msg.lengths[s] for s in sids], slots), data)
        _log.info("re-replicated %d sequences to %s", len(sids), msg.to)
        return 0

    def stats(self) -> dict:
        out = {**self.ring.stats(), "host_buffers_allocated": self.runner.host.allocated}
        if self.sender is not None:
            out.update(self.sender.stats())
        if self.store is not None:
            out["replica_held_bytes"] = self.store.bytes
        return out
