"""Decode steps replayed from CUDA graphs, one per (batch bucket, context bucket).

A decode step launches a few hundred small kernels; at batch 1 launching them costs more than running
them. So a pure decode step is captured once per bucket and replayed: its inputs live in static
buffers (token ids or hidden states, block tables, context lengths) and everything else, positions,
cache slots, the attention mask, is derived on the device inside the graph (``decode_meta``).

Padding rows (a batch of 5 runs in the bucket of 8) point every block at a scratch block that no
sequence owns, so they write their K/V there and attend to finite garbage that nobody reads.

On CPU the same static path runs eagerly (``capture=False``): the tests check it against the plain path.

Legend: B = batch rows (bucketed), M = blocks per row, L = context width (M * block size), D = hidden.
"""
from __future__ import annotations

import bisect
import time

import torch

from .. import log
from .attn_meta import decode_meta
from .kv_cache import KVCache

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
        from ..models import fused_moe

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


class DecodeGraphs:
    """Static-buffer decode for one stage's model and KV cache."""

    def __init__(self, model: torch.nn.Module, kv: KVCache, block_size: int, max_batch: int, max_len: int,
                 capture: bool) -> None:
        self.model, self.kv, self.block_size, self.capture = model, kv, block_size, capture
        self.device = kv.device
        self.batch_buckets = _buckets(max_batch, BATCH_BUCKETS)
        self.width_buckets = width_buckets(max_len, block_size)
        self.max_batch, self.max_len = self.batch_buckets[-1], self.width_buckets[-1]
        blocks = self.max_len // block_size
        self.scratch = kv.scratch_block
        self.tables_BM = torch.full((self.max_batch, blocks), self.scratch, dtype=torch.int32, device=self.device)
        self.ctx_B = torch.ones(self.max_batch, dtype=torch.int32, device=self.device)
        if model.spec.has_embed:
            self.x = torch.zeros(self.max_batch, dtype=torch.long, device=self.device)
        else:
            self.x = torch.zeros(self.max_batch, model.cfg.hidden_size, dtype=model.dtype, device=self.device)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.routing: dict[tuple[int, int], list] = {}  # per graph: the routing tensors it writes
        self._last: tuple[int, int] | None = None
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

    def run(self, tables: list[list[int]], ctx_lens: list[int], x: torch.Tensor) -> torch.Tensor:
        """One decode step of ``len(ctx_lens)`` sequences (each ``ctx_lens[i]`` tokens long including
        its new one); returns the stage's output rows for them."""
        B = len(ctx_lens)
        Bb = self.batch_buckets[bisect.bisect_left(self.batch_buckets, B)]
        W = self.width_buckets[bisect.bisect_left(self.width_buckets, max(ctx_lens))]
        M = W // self.block_size
        rows = [t[:M] + [self.scratch] * (M - len(t[:M])) for t in tables]
        self.tables_BM[:B, :M].copy_(torch.tensor(rows, dtype=torch.int32), non_blocking=True)
        self.ctx_B[:B].copy_(torch.tensor(ctx_lens, dtype=torch.int32), non_blocking=True)
        if Bb > B:
            self.tables_BM[B:Bb, :M].fill_(self.scratch)
            self.ctx_B[B:Bb].fill_(1)
        self.x[:B].copy_(x)
        if not self.capture:
            return self._forward(Bb, W)[:B]
        entry = self.graphs.get((Bb, W)) or self._capture(Bb, W)
        entry[0].replay()
        self._last = (Bb, W)
        return entry[1][:B].clone()  # the buffer is overwritten by the next replay

    def last_routing(self, batch: int) -> list:
        """(layer, ids, weights) the last replayed graph computed for its first ``batch`` rows."""
        return [(layer, ids[:batch], w[:batch]) for layer, ids, w in self.routing.get(self._last, [])]

    def _forward(self, Bb: int, W: int) -> torch.Tensor:
        meta = decode_meta(self.tables_BM[:Bb, : W // self.block_size], self.ctx_B[:Bb], W, self.block_size)
        return self.model(self.x[:Bb], meta, self.kv)

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
        sink, collected = self.model.routing_sink, []
        if sink is not None:  # the routing tensors live in the graph's memory: keep them to read after replays
            self.model.routing_sink = lambda layer, ids, w: collected.append((layer, ids, w))
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                out = self._forward(Bb, W)
        finally:
            self.model.routing_sink = sink
        self.graphs[(Bb, W)] = (graph, out)
        self.routing[(Bb, W)] = collected
        _log.debug("captured decode graph for batch %d, context %d", Bb, W)
        return graph, out
