"""Decode attention straight from the paged KV cache: one Triton kernel, no gathered copy of the context.

Legend (shape suffixes):
  T = tokens of the step    B = decode rows (one new token each)    W = context width of the slot table
  H = query heads           K = KV heads, G = H / K query heads per KV head (GQA)    Dh = head dim
  N = cache slots           S = splits of the context (flash-decoding), C = positions per split

The eager path gathers every row's K and V into [B, K, W, Dh] copies and runs SDPA with a mask: at
batch 64 the gathers alone move the cache three times. Here program (b, k, s) walks its rows' slots
``slots_BW[b, s*C : min((s+1)*C, len_B[b])]`` a tile of BLOCK_N positions at a time, loading K and V
rows from the cache where they lie, with an online softmax in float32 (the scores, their max and sum,
the accumulator); P is rounded to the cache dtype before P.V, as flash attention does. With S = 1 the
program writes the normalised output; with S > 1 (few rows, long contexts: too few programs to pull
the bandwidth) it writes its partial (acc, max, sum) and ``_combine_kernel`` merges the splits.

Launch sizes depend only on shapes (B, W, the model); lengths and slots are read on the device, so a
captured CUDA graph replays it with new contexts. On CPU it runs only in triton's interpreter (tests).
"""
from __future__ import annotations

import functools
import math
from typing import Any

import torch

from dejavu_py.models.triton_base import DTYPES, available, interpreting, tl, triton
from dejavu_py.models.triton_ops import supports

if triton is not None:
    from dejavu_py.models.triton_base import _add_combine, _max_combine

BLOCK_N = 32
"""Context positions per tile."""
MIN_SPLIT = 64
"""Fewest positions a split covers: below that the merge costs more than the parallelism gains."""

__all__ = ["available", "decode_attention", "splits_for", "supports"]


# ---------------------------------------------------------------- kernels (jitted in _kernels)
# Only builtins of triton.language (see fused_moe): reductions go through tl.reduce.


def _decode_kernel(
    q_ptr, k_ptr, v_ptr, rows_ptr, slots_ptr, len_ptr, out_ptr, part_ptr, stat_ptr,
    # q, out [T, H, Dh]; k, v [N, K, Dh]; rows [B]; slots [B, W]; len [B];
    # part [B, H, S, Dh] fp32; stat [B, H, S, 2] fp32 (max, sum)
    scale, W,
    CHUNK: tl.constexpr, H: tl.constexpr, K: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, DH: tl.constexpr,
    S: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):
    """Row b, KV head kh, split s: softmax(q K^T * scale) V over the split's positions for the G heads."""
    b = tl.program_id(0).to(tl.int64)
    kh = tl.program_id(1)
    s = tl.program_id(2)
    row = tl.load(rows_ptr + b).to(tl.int64)
    length = tl.load(len_ptr + b).to(tl.int32)
    g = tl.arange(0, G_PAD)
    g_ok = g < G
    d = tl.arange(0, DH)
    heads = kh * G + g  # [G_PAD] query heads of this KV head
    q = tl.load(q_ptr + (row * H + heads)[:, None] * DH + d[None, :], mask=g_ok[:, None], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    m = tl.full((G_PAD,), float("-inf"), tl.float32)
    l_sum = tl.full((G_PAD,), 0.0, tl.float32)
    acc = tl.full((G_PAD, DH), 0.0, tl.float32)
    lo = s * CHUNK
    hi = tl.minimum(lo + CHUNK, length)
    for off in range(0, CHUNK, BLOCK_N):  # a static trip count; tiles past the row's length are skipped
        if lo + off < hi:
            pos = lo + off + tl.arange(0, BLOCK_N)
            ok = pos < hi
            slot = tl.load(slots_ptr + b * W + pos, mask=ok, other=0).to(tl.int64)
            kv_off = (slot * K + kh)[:, None] * DH + d[None, :]  # [BLOCK_N, DH]
            k = tl.load(k_ptr + kv_off, mask=ok[:, None], other=0.0)
            v = tl.load(v_ptr + kv_off, mask=ok[:, None], other=0.0)
            if DOT_F32:
                k, v = k.to(tl.float32), v.to(tl.float32)
            sc = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [G_PAD, BLOCK_N]
            sc = tl.where(ok[None, :], sc, float("-inf"))
            m_new = tl.maximum(m, tl.reduce(sc, 1, _max_combine))
            alpha = tl.exp(m - m_new)
            p = tl.exp(sc - m_new[:, None])
            l_sum = l_sum * alpha + tl.reduce(p, 1, _add_combine)
            p = p.to(v_ptr.dtype.element_ty)
            if DOT_F32:
                p = p.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
            m = m_new
    if S == 1:
        o = acc / l_sum[:, None]
        tl.store(out_ptr + (row * H + heads)[:, None] * DH + d[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=g_ok[:, None])
    else:
        part = (b * H + heads) * S + s  # [G_PAD] (row, head, split) index
        tl.store(part_ptr + part[:, None] * DH + d[None, :], acc, mask=g_ok[:, None])
        tl.store(stat_ptr + part * 2, m, mask=g_ok)
        tl.store(stat_ptr + part * 2 + 1, l_sum, mask=g_ok)


def _combine_kernel(
    rows_ptr, out_ptr, part_ptr, stat_ptr,  # as in _decode_kernel
    H: tl.constexpr, DH: tl.constexpr, S: tl.constexpr, S_PAD: tl.constexpr,
):
    """Row b, head h: merge the S partial softmaxes (splits past the row's length have max -inf)."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    row = tl.load(rows_ptr + b).to(tl.int64)
    sp = tl.arange(0, S_PAD)
    s_ok = sp < S
    base = (b * H + h) * S + sp
    m_S = tl.load(stat_ptr + base * 2, mask=s_ok, other=float("-inf"))
    l_S = tl.load(stat_ptr + base * 2 + 1, mask=s_ok, other=0.0)
    m = tl.reduce(m_S, 0, _max_combine)
    w_S = tl.where(m_S > float("-inf"), tl.exp(m_S - m), 0.0)
    d = tl.arange(0, DH)
    acc_SD = tl.load(part_ptr + base[:, None] * DH + d[None, :], mask=(w_S > 0)[:, None], other=0.0)
    o = tl.reduce(acc_SD * w_S[:, None], 0, _add_combine) / tl.reduce(l_S * w_S, 0, _add_combine)
    tl.store(out_ptr + (row * H + h) * DH + d, o.to(out_ptr.dtype.element_ty))


@functools.lru_cache(maxsize=2)
def _kernels(interpret: bool) -> tuple[Any, Any]:
    """(decode, combine) jitted; triton.jit picks the interpreter from TRITON_INTERPRET as it decorates."""
    assert triton is not None and interpret == interpreting()
    return triton.jit(_decode_kernel), triton.jit(_combine_kernel)


# ---------------------------------------------------------------- wrapper


@functools.lru_cache(maxsize=8)
def _processors(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # the interpreter: any small number, so that tests exercise the splits
    return torch.cuda.get_device_properties(device).multi_processor_count


def splits_for(batch: int, kv_heads: int, width: int, processors: int) -> int:
    """Context splits: enough programs to cover the processors twice, each split at least MIN_SPLIT long."""
    if batch * kv_heads >= processors or width <= MIN_SPLIT:
        return 1
    return max(1, min(width // MIN_SPLIT, math.ceil(2 * processors / (batch * kv_heads))))


def decode_attention(
    q_THD: torch.Tensor, k_NKD: torch.Tensor, v_NKD: torch.Tensor, rows_B: torch.Tensor,
    slots_BW: torch.Tensor, len_B: torch.Tensor, scale: float, out_THD: torch.Tensor,
) -> None:
    """For each decode row b: out_THD[rows_B[b]] = attention of q_THD[rows_B[b]] over the cache slots
    ``slots_BW[b, :len_B[b]]`` (its whole context, the new token's K/V already written)."""
    (_, H, DH), (B, W), K = q_THD.shape, slots_BW.shape, k_NKD.shape[1]
    assert q_THD.dtype in DTYPES and k_NKD.dtype == v_NKD.dtype and H % K == 0, (q_THD.dtype, k_NKD.dtype, H, K)
    assert DH & (DH - 1) == 0 and DH >= 16, f"head dim {DH}: a power of 2 from 16 expected"
    if B == 0:
        return
    G = H // K
    S = splits_for(B, K, W, _processors(q_THD.device))
    chunk = -(-W // S // BLOCK_N) * BLOCK_N
    dev = q_THD.device
    part = torch.empty((B, H, S, DH) if S > 1 else (1,), dtype=torch.float32, device=dev)
    stat = torch.empty((B, H, S, 2) if S > 1 else (1,), dtype=torch.float32, device=dev)
    decode, combine = _kernels(interpreting())
    fp32 = q_THD.dtype == torch.float32
    decode[(B, K, S)](
        q_THD.contiguous(), k_NKD, v_NKD, rows_B, slots_BW.contiguous(), len_B, out_THD, part, stat,
        float(scale), W, chunk,
        H=H, K=K, G=G, G_PAD=max(16, triton.next_power_of_2(G)), DH=DH, S=S, BLOCK_N=BLOCK_N,
        PRECISION="ieee" if fp32 else "tf32", DOT_F32=interpreting() and not fp32,
        num_warps=4, num_stages=2,
    )
    if S > 1:
        combine[(B, H)](rows_B, out_THD, part, stat, H=H, DH=DH, S=S, S_PAD=triton.next_power_of_2(S), num_warps=1)
