"""Decode steps replayed from CUDA graphs, one per (batch bucket, context bucket).

A decode step launches a few hundred small kernels; at batch 1 launching them costs more than running
them. So a pure decode step is captured once per bucket and replayed: its inputs live in static
buffers (token ids or hidden states, block tables, context lengths) and everything else, positions,
cache slots, the attention mask, is derived on the device inside the graph (``decode_meta``).

Padding rows (a batch of 5 runs in the bucket of 8) point every block at a scratch block that no
sequence owns, so they write their K/V there and attend to finite garbage that nobody reads.

On CPU the same static path runs eagerly (``capture=False``): the tests check it against the plain path.

With ``record`` (fault tolerance on) the step also stacks, inside the graph, what a stage's checkpoint and
KV replica need: every MoE layer's routing (routing_2RBK: expert ids, exact as float32, and weights) and
every layer's new K/V (kv_2LBKD), so that after a replay they are one copy each away from the host, with no
gather launched per layer.

Legend: B = batch rows (bucketed), M = blocks per row, W = context width (M * block size), D = hidden,
R = MoE layers of the stage, L = its layers, K = top-k (routing) or KV heads (cache), Dh = head dim.
"""
from __future__ import annotations

import bisect
import math
import time
from dataclasses import dataclass

import torch

from dejavu_py import log
from dejavu_py.models.attn_meta import decode_meta
from dejavu_py.models.kv_cache import KVCache

_log = log.get(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
MIN_WIDTH = 256


def capturable(model_cfg, dtype: torch.dtype) -> bool:
    """Whether a decode step of this model can be captured: its expert path must not read anything
    back to the host. The fused Triton kernel never does; torch's grouped GEMM needs bf16; the
    per-expert loop (the fallback) does, so such steps run the static path uncaptured."""
    if not model_cfg.is_moe:
        return True
    try:
        from dejavu_py.models import fused_moe

        if fused_moe.available():
            return True
    except ImportError:
        pass
    return dtype == torch.bfloat16


def _buckets(limit: int, base: tuple[int, ...]) -> list[int]:
    out = [b for b in base if b < limit]
    return out + [limit]


def width_buckets(max_len: int, block_size: int) -> list[int]:
    """Context widths: doubling from MIN_WIDTH (rounded to whole blocks) up to one covering max_len."""
    top = -(-max_len // block_size) * block_size
    w = -(-min(MIN_WIDTH, top) // block_size) * block_size
    out = []
    while w < top:
        out.append(w)
        w *= 2
    return out + [top]


def stack_routing(routed: list[tuple[int, torch.Tensor, torch.Tensor]], out: torch.Tensor | None = None) -> torch.Tensor:
    """(layer, ids_BK, weights_BK) of each MoE layer as one float32 tensor [2, R, B, K]: expert ids (exact
    in float32) then weights, in the layers' order (into ``out`` when given: three kernels in all)."""
    ids = torch.stack([i for _, i, _ in routed])
    weights = [w for _, _, w in routed]
    if out is None:
        return torch.stack((ids.to(torch.float32), torch.stack(weights).to(torch.float32)))
    out[0].copy_(ids)
    if weights[0].dtype == torch.float32:
        torch.stack(weights, out=out[1])
    else:
        out[1].copy_(torch.stack(weights))
    return out


@dataclass
class StepRecord:
    """What a decode step routed and wrote, stacked over the stage's layers, in one device buffer."""

    layers: list[int]
    """The MoE layers, in the order of ``routing_2RBK``."""
    routing_2RBK: torch.Tensor | None
    """Top-k expert ids (as float32: exact) and their weights, one float32 tensor (a view of ``flat``)."""
    kv_2LBKD: torch.Tensor
    """The new K and V of every layer of the stage (in cache order), as written to the cache (a view of
    ``flat``)."""
    flat: torch.Tensor
    """uint8: the K/V, then the routing: a small record goes to the host in one copy (``on_host``)."""

    @staticmethod
    def build(layers: list[int], routed: list, written: list, dtype: torch.dtype) -> StepRecord:
        """Stack a step's routing and K/V into a new buffer (inside a capture: the graph's)."""
        k0 = written[0][0]
        kv_shape = (2, len(written), *k0.shape)
        kv_bytes = math.prod(kv_shape) * dtype.itemsize
        r_shape = (2, len(routed), *routed[0][1].shape) if routed else None
        r_bytes = math.prod(r_shape) * torch.float32.itemsize if routed else 0
        flat = torch.empty(kv_bytes + r_bytes, dtype=torch.uint8, device=k0.device)
        kv_2LBKD = flat[:kv_bytes].view(dtype).view(kv_shape)
        torch.stack([k.to(dtype) for k, _ in written] + [v.to(dtype) for _, v in written],
                    out=kv_2LBKD.view(2 * len(written), *k0.shape))
        routing = stack_routing(routed, flat[kv_bytes:].view(torch.float32).view(r_shape)) if routed else None
        return StepRecord(layers, routing, kv_2LBKD, flat)

    def rows(self, batch: int) -> StepRecord:
        routing = None if self.routing_2RBK is None else self.routing_2RBK[:, :, :batch]
        return StepRecord(self.layers, routing, self.kv_2LBKD[:, :, :batch], self.flat)

    def on_host(self, flat: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The first ``batch`` rows of the K/V and of the routing, as views of ``flat``: a host copy of
        this record's buffer (both views keep it alive, and it goes back with the K/V's)."""
        kv_bytes = self.kv_2LBKD.numel() * self.kv_2LBKD.element_size()
        kv = flat[:kv_bytes].view(self.kv_2LBKD.dtype).view(self.kv_2LBKD.shape)[:, :, :batch]
        if self.routing_2RBK is None:
            return kv, None
        return kv, flat[kv_bytes:].view(torch.float32).view(self.routing_2RBK.shape)[:, :, :batch]


UPLOAD_SLOTS = 8
"""Pinned buffers a decode step's block tables and context lengths go up from, in turn."""


class Uploads:
    """Small int32 uploads from pinned buffers taken in turn. From pageable memory an upload waits for
    the copy engine before the launch goes on, and with fault tolerance on that engine is moving the K/V
    the stages send to their replicas; from pinned memory it is only queued. A buffer is written again
    once the copy from it, ``UPLOAD_SLOTS`` steps back, is done."""

    def __init__(self, numel: int) -> None:
        self.bufs = [torch.empty(numel, dtype=torch.int32, pin_memory=True) for _ in range(UPLOAD_SLOTS)]
        self.done = [torch.cuda.Event() for _ in range(UPLOAD_SLOTS)]
        self.i = 0

    def put(self, pairs: list[tuple[torch.Tensor, list]]) -> None:
        """Each host list (flat, or rows) into its device tensor of the same shape, queued on the stream."""
        self.i = (self.i + 1) % UPLOAD_SLOTS
        self.done[self.i].synchronize()
        buf, at = self.bufs[self.i], 0
        for dst, values in pairs:
            src = buf[at:at + dst.numel()].view(dst.shape)
            src.copy_(torch.tensor(values, dtype=torch.int32))
            dst.copy_(src, non_blocking=True)
            at += dst.numel()
        self.done[self.i].record()


class DecodeGraphs:
    """Static-buffer decode for one stage's model and KV cache."""

    def __init__(self, model: torch.nn.Module, kv: KVCache, block_size: int, max_batch: int, max_len: int,
                 capture: bool, record: bool = False) -> None:
        self.model, self.kv, self.block_size, self.capture, self.record = model, kv, block_size, capture, record
        self.device = kv.device
        self.batch_buckets = _buckets(max_batch, BATCH_BUCKETS)
        self.width_buckets = width_buckets(max_len, block_size)
        self.max_batch, self.max_len = self.batch_buckets[-1], self.width_buckets[-1]
        blocks = self.max_len // block_size
        self.scratch = kv.scratch_block
        self.tables_BM = torch.full((self.max_batch, blocks), self.scratch, dtype=torch.int32, device=self.device)
        self.ctx_B = torch.ones(self.max_batch, dtype=torch.int32, device=self.device)
        self._uploads = Uploads(self.max_batch * (blocks + 1)) if self.device.type == "cuda" else None
        if model.spec.has_embed:
            self.x = torch.zeros(self.max_batch, dtype=torch.long, device=self.device)
        else:
            self.x = torch.zeros(self.max_batch, model.cfg.hidden_size, dtype=model.dtype, device=self.device)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.records: dict[tuple[int, int], StepRecord | None] = {}  # per graph: the record tensors it writes
        self._last: tuple[int, int] | None = None  # the bucket of the last step; None: it ran eagerly
        self._eager_record: StepRecord | None = None
        self._pool = torch.cuda.graph_pool_handle() if capture else None

    def capture_all(self) -> int:
        """Capture every (batch, width) bucket now, largest first so that later graphs reuse the
        memory pool; inputs are padding only, so they touch just the scratch block."""
        if not self.capture:
            return 0
        t0 = time.perf_counter()
        self.tables_BM.fill_(self.scratch)
        self.ctx_B.fill_(1)
        self.x.zero_()
        for W in reversed(self.width_buckets):
            for Bb in reversed(self.batch_buckets):
                if (Bb, W) not in self.graphs:
                    self._capture(Bb, W)
        torch.cuda.synchronize(self.device)
        _log.info("captured %d decode graphs in %.1fs", len(self.graphs), time.perf_counter() - t0)
        return len(self.graphs)

    def fits(self, batch: int, max_ctx: int) -> bool:
        return batch <= self.max_batch and max_ctx <= self.max_len

    def run(self, tables: list[list[int]], ctx_lens: list[int], x: torch.Tensor, eager: bool = False) -> torch.Tensor:
        """One decode step of ``len(ctx_lens)`` sequences (each ``ctx_lens[i]`` tokens long including
        its new one); returns the stage's output rows for them. ``eager``: run the bucket's step without
        its graph (a replay that forces recorded routing), on the shapes the graphs already ran."""
        B = len(ctx_lens)
        Bb = self.batch_buckets[bisect.bisect_left(self.batch_buckets, B)]
        W = self.width_buckets[bisect.bisect_left(self.width_buckets, max(ctx_lens))]
        M = W // self.block_size
        rows = [t[:M] + [self.scratch] * (M - len(t[:M])) for t in tables]
        if self._uploads is not None:
            self._uploads.put([(self.tables_BM[:B, :M], rows), (self.ctx_B[:B], ctx_lens)])
        else:
            self.tables_BM[:B, :M].copy_(torch.tensor(rows, dtype=torch.int32))
            self.ctx_B[:B].copy_(torch.tensor(ctx_lens, dtype=torch.int32))
        if Bb > B:
            self.tables_BM[B:Bb, :M].fill_(self.scratch)
            self.ctx_B[B:Bb].fill_(1)
        self.x[:B].copy_(x)
        if not self.capture or eager:
            forced = self.model.routing_override
            if forced and Bb > B:  # recorded routing of the real rows; padding rows route as the first
                self.model.routing_override = {layer: tuple(torch.cat((t, t[:1].expand(Bb - B, *t.shape[1:]))) for t in pair)
                                               for layer, pair in forced.items()}
            out, self._eager_record = self._forward_recorded(Bb, W)
            self._last = None
            return out[:B]
        entry = self.graphs.get((Bb, W)) or self._capture(Bb, W)
        entry[0].replay()
        self._last = (Bb, W)
        return entry[1][:B].clone()  # the buffer is overwritten by the next replay

    def last_record(self) -> StepRecord | None:
        """The record of the last step, of its whole batch bucket (device tensors; a replay overwrites
        them: copy before the next one)."""
        return self._eager_record if self._last is None else self.records.get(self._last)

    def _forward(self, Bb: int, W: int) -> torch.Tensor:
        meta = decode_meta(self.tables_BM[:Bb, : W // self.block_size], self.ctx_B[:Bb], W, self.block_size)
        return self.model(self.x[:Bb], meta, self.kv)

    def _forward_recorded(self, Bb: int, W: int) -> tuple[torch.Tensor, StepRecord | None]:
        """The step, and with ``record`` what it routed and wrote, stacked (inside a capture: in the graph)."""
        if not self.record:
            return self._forward(Bb, W), None
        routed, written = [], []
        sink, on_update = self.model.routing_sink, self.kv.on_update
        self.model.routing_sink = lambda layer, ids, w: routed.append((layer, ids, w))
        self.kv.on_update = lambda layer, slots, k, v: written.append((k, v))
        try:
            out = self._forward(Bb, W)
        finally:
            self.model.routing_sink, self.kv.on_update = sink, on_update
        dtype = self.kv.k_NKD[self.kv.layers[0]].dtype
        return out, StepRecord.build([layer for layer, _, _ in routed], routed, written, dtype)

    def _capture(self, Bb: int, W: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up on a side stream, then capture; the inputs are the current step's, so the K/V the
        warm-up writes are the very values the replay writes again."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(Bb, W)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):  # the record lives in the graph's memory
            out, self.records[(Bb, W)] = self._forward_recorded(Bb, W)
        self.graphs[(Bb, W)] = (graph, out)
        _log.debug("captured decode graph for batch %d, context %d", Bb, W)
        return graph, out
