"""The stage runner computes; it never decides. One step plan in, activations or sampled ids out."""
from __future__ import annotations

import time

import torch

from .. import log
from .attn_meta import SeqSlice, build_attn_meta
from .decode_graphs import DecodeGraphs
from .kv_cache import KVCache
from .plan import SeqState, StepPlan, StepResult
from .sampler import sample
from ..ft.replica import step_slots
from .split import StageSpec
from .swap import Swapper

_log = log.get(__name__)


class DeviceWait:
    """Waits for the device with the GIL released, and counts the time spent waiting: reading a result
    back (``tolist``, ``cpu``) would hold the GIL through the whole step's kernels, while the stage's
    receiver and replica threads need it."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` once the device has computed it."""
        if t.is_cuda:
            t0 = time.perf_counter()
            torch.cuda.current_stream(t.device).synchronize()
            self.seconds += time.perf_counter() - t0
        return t

    def host_list(self, t: torch.Tensor) -> list:
        return self(t).tolist()

    def stacked_to_host(self, layers: list[int], ids_RTK: torch.Tensor, w_RTK: torch.Tensor) -> list:
        """Every MoE layer's (ids, weights), stacked over layers, to the host in one copy each."""
        ids, w = self(ids_RTK).cpu(), w_RTK.cpu()
        return [(layer, ids[j], w[j]) for j, layer in enumerate(layers)]

    def routing_to_host(self, routing: list) -> list:
        """An eager step's routing, as the MoE layers reported it one by one."""
        if not routing:
            return []
        return self.stacked_to_host([layer for layer, _, _ in routing], torch.stack([i for _, i, _ in routing]),
                                    torch.stack([x for _, _, x in routing]))

    def record_to_host(self, record) -> list:
        """A graph step's routing, stacked in the graph."""
        if record.ids_RBK is None:
            return []
        return self.stacked_to_host(record.layers, record.ids_RBK, record.weights_RBK)


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
        self.routing: list = []
        self.slots: list[int] = []
        self.phys_slots: list[int] = []
        self.step_kv: torch.Tensor | None = None
        """A decode step from the graphs: its new K/V of every layer [2, L, B, K, D] (device; the next
        step overwrites it), what the replica needs without gathering it back from the cache."""
        self._scratch: dict[int, int] = {}
        self._routing_dev: list = []
        self.wait = DeviceWait()
        """Time this stage's thread spent waiting for its steps' kernels (the rest of a step is host work)."""

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
        """Hidden states [T, D] for the next stage, or (last stage) the sampled tokens."""
        self._apply(plan)
        if self.spec.has_embed:
            x = torch.tensor(plan.input_ids, dtype=torch.long, device=self.device)
        elif x is None:
            raise RuntimeError(f"stage {self.spec.index} got plan {plan.step} without activations")
        if self.swapper is not None:
            self.swapper.ensure(plan.mb)  # the microbatch's KV partition is on the device
        self._routing_dev = []
        self._scratch = {sid: -(-(st + n) // self.block_size) for sid, st, n in
                         zip(plan.seq_ids, plan.start_pos, plan.num_tokens) if sid in set(plan.scratch_seqs)}
        static = self._static_ok(plan)
        if plan.forced is not None:
            self.model.routing_override = {layer: (torch.as_tensor(ids), torch.as_tensor(w)) for layer, ids, w in plan.forced}
        try:
            out = self._decode_static(plan, x) if static else self._eager(plan, x)
        finally:
            self.model.routing_override = None
        if self.record_routing:
            record = self.graphs.last_record(len(plan.seq_ids)) if static else None
            self.step_kv = None if record is None else record.kv_2LBKD
            self.routing = (self.wait.routing_to_host(self._routing_dev) if record is None
                            else self.wait.record_to_host(record))
            tables = [self._table(s) if s in self._scratch else self.seqs[s].block_table  # virtual ids
                      for s in plan.seq_ids]
            self.slots = step_slots(tables, plan.start_pos, plan.num_tokens, self.block_size)
            self.phys_slots = (self.slots if self.swapper is None else step_slots(
                [self._table(s) for s in plan.seq_ids], plan.start_pos, plan.num_tokens, self.block_size))
        if self.swapper is not None:
            self.swapper.prefetch((plan.mb + 1) % self.swapper.P)  # overlaps the next microbatch's turn
        if not self.spec.has_head or plan.replay_until is not None:  # a replayed step samples nothing
            return out
        return self._sample(plan, out)

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

    def _sample(self, plan: StepPlan, logits_SV: torch.Tensor) -> StepResult:
        rows = [i for i, want in enumerate(plan.wants_token) if want]
        sids = [plan.seq_ids[i] for i in rows]
        states = [self.seqs[s] for s in sids]
        dev = logits_SV.device
        if all(s.temperature == 0 for s in states):  # greedy: no per-row tensors, no device sync
            return StepResult(plan.mb, plan.step, sids, self.wait.host_list(logits_SV.argmax(dim=1)))
        ids = sample(
            logits_SV,
            torch.tensor([s.temperature for s in states], dtype=torch.float32, device=dev),
            torch.tensor([s.top_p for s in states], dtype=torch.float32, device=dev),
            torch.tensor([s.top_k for s in states], dtype=torch.long, device=dev),
            torch.tensor([s.seed for s in states], dtype=torch.long, device=dev),
            torch.tensor([plan.start_pos[i] + plan.num_tokens[i] for i in rows], dtype=torch.long, device=dev),
            all_greedy=False,
            any_filter=any(s.top_k > 0 or s.top_p < 1 for s in states),
        )
        return StepResult(plan.mb, plan.step, sids, self.wait.host_list(ids))
