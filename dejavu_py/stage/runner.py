"""The stage runner computes; it never decides. One step plan in, activations or sampled ids out."""
from __future__ import annotations

import collections
from dataclasses import dataclass, field

import torch

from dejavu_py import log
from dejavu_py.models.attn_meta import SeqSlice, build_attn_meta, step_slots
from dejavu_py.models.kv_cache import KVCache
from dejavu_py.protocol.plan import SeqState, StepPlan, StepResult
from dejavu_py.protocol.routing import EMPTY, RoutingRecord, compact
from dejavu_py.protocol.split import StageSpec
from dejavu_py.stage.decode_graphs import DecodeGraphs, stack_routing
from dejavu_py.stage.host_buffers import HostBuffers
from dejavu_py.stage.host_copies import (
    DeferredCopy,
    DeviceWait,
    queue_copies,
    record_event,
)
from dejavu_py.stage.sampler import sample
from dejavu_py.stage.swap import Swapper

_log = log.get(__name__)


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list on the device without waiting for the kernels queued before (a blocking copy would)."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


INLINE_COPY_BYTES = 256 << 10
"""A graph step's K/V up to this size (a few tokens' worth) goes to the host right behind its kernels, on
its stream, as its other copies do: the next step waits a few microseconds for it, less than the host
time a deferred copy costs a small batch, whose stages are host-bound. Above it, it goes out later, on the
copy stream, while the next step computes (``DeferredCopy``)."""


@dataclass
class StepFT:
    """What fault tolerance keeps of a finished step: its checkpoint's routing and its replica chunk."""

    routing: RoutingRecord
    slots: list[int]
    """The cache slots the step wrote (sequence-table ids: what the replica mirrors)."""
    phys_slots: list[int]
    """The same slots on the device (differ from ``slots`` with KV swapping)."""
    step_kv: torch.Tensor | None
    """A graph step's new K/V [2, L, B, K, D] on the host (None: read it back from the cache)."""
    kv_ready: DeferredCopy | None
    """Wait on it (``synchronize``) before reading ``step_kv`` (CUDA, a deferred copy; None: it holds its bytes)."""


@dataclass
class Launched:
    """A step whose kernels are queued: what finishing it needs (device tensors until then)."""

    plan: StepPlan
    out: torch.Tensor
    """The stage's output rows (activations, or logits of the last stage)."""
    sids: list[int] = field(default_factory=list)
    ids: torch.Tensor | None = None
    """Last stage: the sampled token of each of ``sids`` (host, filled when ``event`` is done)."""
    routing: tuple = ([], None)
    """FT: (MoE layers, ids and weights [2, R, T, K] float32) on the host, filled when ``event`` is done (a
    buffer of ``StageRunner.host``)."""
    small_record: tuple | None = None
    """FT, a graph step whose record is small (``INLINE_COPY_BYTES``): (the graph's ``StepRecord``, a host
    copy of its whole buffer), filled when ``event`` is done: one copy at launch instead of two, and no
    slicing on the device; ``ft_record`` takes it apart into ``routing`` and ``step_kv``."""
    step_kv: torch.Tensor | None = None
    """FT, a graph step: its new K/V [2, L, B, K, D] on the host, filled when ``event`` is done (see
    StageRunner.step_kv)."""
    tables: list[list[int]] = field(default_factory=list)
    """FT: its sequences' block tables (sequence-table ids) as launched: its written slots are worked out
    from them off the pipeline's chain (``StageRunner.ft_record``)."""
    phys_tables: list[list[int]] | None = None
    """The same on the device, when they differ (KV swapping)."""
    kv_copy: DeferredCopy | None = None
    """CUDA: how ``step_kv`` gets filled (its event, once queued, says when)."""
    record: StepFT | None = None
    """FT: what the step recorded, once taken (``StageRunner.ft_record``)."""
    sources: list[torch.Tensor] = field(default_factory=list)
    """CUDA: the device tensors its copies to the host read, kept until it is finished."""
    event: torch.cuda.Event | None = None
    """Recorded after the step's kernels and copies to the host (CUDA): waited for, not the stream."""
    forwarded: bool = False
    """Its output (or sampled ids) already left at launch (asynchronous scheduling)."""


class StageRunner:
    """Runs one stage's layers for a plan, keeping the per-sequence state the plans announced."""

    def __init__(
        self,
        model: torch.nn.Module,
        kv: KVCache,
        spec: StageSpec,
        block_size: int,
        device: torch.device,
        graphs: DecodeGraphs | None = None,
        swapper: Swapper | None = None,
    ) -> None:
        self.model = model
        self.kv = kv
        self.spec = spec
        self.block_size = block_size
        self.device = device
        self.graphs = graphs
        self.swapper = swapper
        self.replica_store = None
        """Host buffers of the fault-tolerance replica this stage holds for a peer, made with the stage."""
        self.seqs: dict[int, SeqState] = {}
        self.record_routing = False
        """Fault tolerance on: keep each step's MoE routing (``routing``) and written slots (``slots``)."""
        self.routing: RoutingRecord = EMPTY
        """The last finished step's MoE routing (FT)."""
        self.host = HostBuffers(reuse=device.type == "cuda")
        """Pinned buffers for what goes to the host every step: sampled ids, routing, a graph step's K/V
        (given back by the replica sender once written)."""
        self.slots: list[int] = []
        self.phys_slots: list[int] = []
        self.step_kv: torch.Tensor | None = None
        """A decode step from the graphs: its new K/V of every layer [2, L, B, K, D], copied to the host
        behind the step (the graphs' buffer is overwritten by the next one): what the replica needs,
        without gathering it back from the cache, and without a copy on the device first."""
        self._scratch: dict[int, int] = {}
        self._routing_dev: list = []
        self.sampled: dict[int, torch.Tensor] = {}
        """The last few steps' sampled ids on the device, by step: the inputs of plans that follow them
        (sampled here, or, first of several stages, sent by the last)."""
        self.wait = DeviceWait()
        """Time this stage's thread spent waiting for its steps' kernels (the rest of a step is host work)."""
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        """A graph step's K/V over ``INLINE_COPY_BYTES`` goes to the host here (``DeferredCopy``)."""
        self._copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._deferred_kv: DeferredCopy | None = None
        """The last graph step's K/V copy, until the next step is launched (or ``flush_deferred_copies``)."""
        self._deferred_asked: collections.deque[DeferredCopy] = collections.deque()
        """Copies other threads asked for (``defer_copy``), queued the same way."""
        self._staging: list[list] = []
        """Two [device buffer, the DeferredCopy that last read it] for graph steps' K/V, in turn."""

    def enable_recording(self) -> None:
        self.record_routing = True
        if getattr(self.model.cfg, "is_moe", False):
            self.model.routing_sink = lambda layer, ids, w: self._routing_dev.append((layer, ids, w))

    def _apply(self, plan: StepPlan) -> None:
        for sid in plan.release:
            self.seqs.pop(sid, None)
        self.seqs.update(plan.new_seqs)

    @torch.inference_mode()
    def step(self, plan: StepPlan, x: torch.Tensor | None) -> torch.Tensor | StepResult:
        """Hidden states [T, D] for the next stage, or (last stage) the sampled tokens; with recording
        on, the step's FT record is taken too (``routing``, ``slots``, ``step_kv``)."""
        done = self.launch(plan, x)
        out = self.finish(done)
        if self.record_routing:
            self.ft_record(done)
        return out

    @torch.inference_mode()
    def launch(self, plan: StepPlan, x: torch.Tensor | None) -> Launched:
        """Queue the step's kernels (sampling included) without waiting for them (another step may be
        launched before this one is finished: what it records for FT is copied out behind it)."""
        self._apply(plan)
        deferred = self._take_deferred()  # the last step's K/V (and others'): copied out while this one computes
        if self.spec.has_embed:
            x = self._input_ids(plan)
        elif x is None:
            raise RuntimeError(f"stage {self.spec.index} got plan {plan.step} without activations")
        if self.swapper is not None:
            self.swapper.ensure(plan.mb)  # the microbatch's KV partition is on the device
        self._routing_dev = []
        scratch = set(plan.scratch_seqs)
        self._scratch = {sid: -(-(st + n) // self.block_size) for sid, st, n in
                         zip(plan.seq_ids, plan.start_pos, plan.num_tokens) if sid in scratch}
        static = self._static_ok(plan)
        if plan.forced is not None:
            self.model.routing_override = {layer: (torch.as_tensor(ids), torch.as_tensor(w)) for layer, ids, w in plan.forced}
        start = record_event() if deferred else None  # this step's kernels begin here
        try:
            out = self._decode_static(plan, x) if static else self._eager(plan, x)
        finally:
            self.model.routing_override = None
        done = Launched(plan, out)
        if self.record_routing:
            rec = self.graphs.last_record() if static else None
            if rec is not None and rec.flat.is_cuda and rec.flat.numel() <= INLINE_COPY_BYTES:
                done.small_record = (rec, self._to_host(rec.flat, copy=True))  # one copy; taken apart later
            elif rec is not None:
                rec = rec.rows(len(plan.seq_ids))
                kv = rec.kv_2LBKD
                if kv.is_cuda and kv.numel() * kv.element_size() > INLINE_COPY_BYTES:
                    done.step_kv, done.kv_copy = self._defer_kv_copy(kv)
                else:
                    done.step_kv = self._to_host(kv, copy=True)
                done.routing = self._routing_to_host(rec.layers, rec.routing_2RBK)
            elif self._routing_dev:  # an eager step: as the MoE layers reported it one by one
                r = self._routing_dev
                done.routing = self._routing_to_host([layer for layer, _, _ in r], stack_routing(r))
            done.tables = [self._table(s) if s in self._scratch else self.seqs[s].block_table  # virtual ids
                           for s in plan.seq_ids]
            if self.swapper is not None:  # the partitions' places now
                done.phys_tables = [self._table(s) for s in plan.seq_ids]
        if self.swapper is not None:
            self.swapper.prefetch((plan.mb + 1) % self.swapper.P)  # overlaps the next microbatch's turn
        if self.spec.has_head and plan.replay_until is None:  # a replayed step samples nothing
            done.sids, ids = self._sample(plan, out)
            self.sampled[plan.step] = ids
            done.ids = self._to_host(ids)
            self.trim_sampled()
        if self.device.type == "cuda":
            if deferred:
                self._queue_deferred(deferred, start)
            done.event = queue_copies(self._copies)  # right behind the step, on its stream
            done.sources = [src for src, _ in self._copies]  # alive until the step is finished: the copies read them
            self._copies = []
        return done

    def defer_copy(self, src: torch.Tensor, dst: torch.Tensor, after: torch.cuda.Event | None = None) -> DeferredCopy:
        """From any thread: copy device tensor ``src`` into pinned ``dst`` with this stage's next step, as a
        graph step's deferred K/V goes (the pieces of a prompt's replica: a copy of this context started
        between steps would hold up the stages sharing the GPU). Wait on the DeferredCopy returned."""
        copy = DeferredCopy(src, dst, after=after)
        self._deferred_asked.append(copy)
        return copy

    def _take_deferred(self) -> list[DeferredCopy]:
        deferred = [] if self._deferred_kv is None else [self._deferred_kv]
        self._deferred_kv = None
        while self._deferred_asked:
            deferred.append(self._deferred_asked.popleft())
        return deferred

    def _queue_deferred(self, deferred: list[DeferredCopy], start: torch.cuda.Event | None) -> None:
        """Deferred copies to the host on the copy stream: from ``start`` on (the next step's kernels begin),
        or behind everything the step's stream holds now (None)."""
        side, main = self.copy_stream, torch.cuda.current_stream(self.device)
        with torch.cuda.stream(side):
            if start is not None:
                side.wait_event(start)
            else:
                side.wait_stream(main)
            for copy in deferred:
                if copy.after is not None:
                    side.wait_event(copy.after)
            event = queue_copies([(copy.src, copy.dst) for copy in deferred], blocking=True)  # waited for off the chain
        for copy in deferred:
            copy.event = event
            copy.queued.set()

    def flush_deferred_copies(self) -> None:
        """Queue the deferred copies now: no step is about to be launched behind them."""
        deferred = self._take_deferred()
        if deferred:
            self._queue_deferred(deferred, None)

    def finish(self, done: Launched) -> torch.Tensor | StepResult:
        """Wait for a launched step; what ``step`` returns. Its FT record is taken apart (``ft_record``):
        off the pipeline's chain."""
        self.wait(done.event)
        done.sources = []
        if done.ids is None:
            return done.out
        plan = done.plan
        ids = done.ids.tolist()
        self.host.give(done.ids)
        return StepResult(plan.mb, plan.step, done.sids, ids)

    def ft_record(self, done: Launched) -> StepFT:
        """The FT record of a finished step (taken once: its host buffers go back), for the checkpoint and
        the replica; also kept as the runner's last one (``routing``, ``slots``, ``phys_slots``, ``step_kv``)."""
        if done.record is None:
            if done.small_record is not None:  # one host buffer: it goes back with the K/V (the replica's)
                rec, flat = done.small_record
                done.step_kv, routing_2RBK = rec.on_host(flat, len(done.plan.seq_ids))
                routing = compact((rec.layers, routing_2RBK), copy=True)
            else:
                routing = compact(done.routing, copy=self.host.reuse)
                for t in done.routing[1:]:
                    if t is not None:
                        self.host.give(t)
            plan, bs = done.plan, self.block_size
            slots = step_slots(done.tables, plan.start_pos, plan.num_tokens, bs)
            phys = slots if done.phys_tables is None else step_slots(done.phys_tables, plan.start_pos, plan.num_tokens, bs)
            done.record = StepFT(routing, slots, phys, done.step_kv, done.kv_copy)
            r = done.record
            self.routing, self.slots, self.phys_slots, self.step_kv = r.routing, r.slots, r.phys_slots, r.step_kv
        return done.record

    def _defer_kv_copy(self, kv: torch.Tensor) -> tuple[torch.Tensor, DeferredCopy]:
        """A graph step's K/V [2, L, B, K, D] (on the device, over ``INLINE_COPY_BYTES``) for the host: a
        pinned buffer filled by a ``DeferredCopy`` from a device copy (the next step overwrites the record)."""
        if not self._staging or self._staging[0][0].numel() < kv.numel():
            self._staging = [[torch.empty(kv.numel(), dtype=kv.dtype, device=kv.device), None] for _ in range(2)]
        self._staging.reverse()  # the other one: the step before's is still to be copied out
        buf, last = self._staging[0]
        if last is not None and last.event is not None:  # queued at the step after it: long done, as a rule
            torch.cuda.current_stream(self.device).wait_event(last.event)
        src = buf[:kv.numel()].view(kv.shape).copy_(kv)
        self._deferred_kv = self._staging[0][1] = DeferredCopy(src, self.host.take(tuple(kv.shape), kv.dtype))
        return self._deferred_kv.dst, self._deferred_kv

    def _to_host(self, t: torch.Tensor, copy: bool = False) -> torch.Tensor:
        """A host copy of device tensor ``t`` (a pinned buffer of ``host``, valid once the step's event is
        done: the copy is queued at the end of ``launch``). On CPU ``t`` itself, or with ``copy`` a clone
        (``t`` is a buffer the next step overwrites)."""
        if t.is_cuda:
            dst = self.host.take(tuple(t.shape), t.dtype)
            self._copies.append((t, dst))
            return dst
        return t.clone() if copy else t

    def _routing_to_host(self, layers: list[int], routing_2RTK: torch.Tensor | None) -> tuple:
        """Every MoE layer's ids and weights (``stack_routing``): one queued copy (checkpoints.compact reads it)."""
        return layers, None if routing_2RTK is None else self._to_host(routing_2RTK, copy=True)

    def trim_sampled(self, keep: int = 16) -> None:
        """Keep the last ``keep`` steps' ids (a plan follows a step at most two per microbatch back)."""
        while len(self.sampled) > keep:
            del self.sampled[next(iter(self.sampled))]

    def _input_ids(self, plan: StepPlan) -> torch.Tensor:
        """The plan's tokens on the device; placeholders (``plan.follows``) from that step's sampled ids,
        which never leave the device. Copies are asynchronous: the previous step may still be running."""
        ids = plan.input_ids
        if plan.follows is None:
            return _to_device(ids, torch.long, self.device)
        prev = self.sampled.get(plan.follows)
        if prev is None:
            raise RuntimeError(f"plan {plan.step} follows step {plan.follows}, which this stage did not sample")
        rows = [i for i, t in enumerate(ids) if t < 0]
        src = [-ids[i] - 1 for i in rows]
        if len(rows) == len(ids) and src == list(range(len(prev))):
            return prev.clone()  # every sequence goes on, in order: the common decode step
        x = _to_device([max(t, 0) for t in ids], torch.long, self.device)
        x[_to_device(rows, torch.long, self.device)] = prev[_to_device(src, torch.long, self.device)]
        return x

    @torch.inference_mode()
    def warmup(self, token_counts: list[int]) -> None:
        """Run eager prefills of these sizes into the scratch block, so that kernels compiled on first use
        (the fused MoE's Triton kernels) compile now rather than inside the first request's time."""
        for n in token_counts:
            table = [self.kv.scratch_block] * -(-n // self.block_size)
            meta = build_attn_meta([SeqSlice(0, n, table, True)], self.block_size, self.device)
            if self.spec.has_embed:
                x = torch.zeros(n, dtype=torch.long, device=self.device)
            else:
                x = torch.zeros(n, self.model.cfg.hidden_size, dtype=self.model.dtype, device=self.device)
            self.model(x, meta, self.kv)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _table(self, sid: int) -> list[int]:
        if sid in self._scratch:
            return [self.kv.scratch_block] * self._scratch[sid]
        table = self.seqs[sid].block_table
        return self.swapper.translate(table) if self.swapper is not None else table

    def _static_ok(self, plan: StepPlan) -> bool:
        if self.graphs is None or any(n != 1 for n in plan.num_tokens) or not all(plan.wants_token):
            return False
        return self.graphs.fits(len(plan.seq_ids), max(plan.start_pos) + 1)

    def _decode_static(self, plan: StepPlan, x: torch.Tensor) -> torch.Tensor:
        """A replay runs its bucket's step without the graph (it may force recorded routing), on shapes
        the graphs compiled and planned kernels for: an odd batch would compile new ones mid-recovery."""
        tables = [self._table(sid) for sid in plan.seq_ids]
        return self.graphs.run(tables, [s + 1 for s in plan.start_pos], x, eager=plan.replay_until is not None)

    def _eager(self, plan: StepPlan, x: torch.Tensor) -> torch.Tensor:
        slices = [
            SeqSlice(start, n, self._table(sid), want)
            for sid, start, n, want in zip(plan.seq_ids, plan.start_pos, plan.num_tokens, plan.wants_token)
        ]
        meta = build_attn_meta(slices, self.block_size, self.device)
        return self.model(x, meta, self.kv)

    def _sample(self, plan: StepPlan, logits_SV: torch.Tensor) -> tuple[list[int], torch.Tensor]:
        """(sequences that sample, their next token ids on the device): queued, not waited for."""
        rows = [i for i, want in enumerate(plan.wants_token) if want]
        sids = [plan.seq_ids[i] for i in rows]
        states = [self.seqs[s] for s in sids]
        dev = logits_SV.device
        if all(s.temperature == 0 for s in states):  # greedy: no per-row tensors
            return sids, logits_SV.argmax(dim=1)
        ids = sample(
            logits_SV,
            _to_device([s.temperature for s in states], torch.float32, dev),
            _to_device([s.top_p for s in states], torch.float32, dev),
            _to_device([s.top_k for s in states], torch.long, dev),
            _to_device([s.seed for s in states], torch.long, dev),
            _to_device([plan.start_pos[i] + plan.num_tokens[i] for i in rows], torch.long, dev),
            all_greedy=False,
            any_filter=any(s.top_k > 0 or s.top_p < 1 for s in states),
        )
        return sids, ids
