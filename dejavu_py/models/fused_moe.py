"""Triton fused-MoE: the routed experts (and qwen2_moe's shared expert) as grouped GEMMs over tokens sorted by expert.

Legend (shape suffixes):
  T = tokens of the step            D = hidden size
  E = experts in the weight stacks  K = routed experts per token (top-k)
  S = shared-expert chunks: the last S experts of the stacks, every token's (0 without a shared expert)
  J = K + S assignments per token   F = expert width; ``w_gate_up_EFD`` holds 2F rows: gate, then up
  A = T * J token-expert assignments; assignment a = t * J + j (token-major)
  P = padded rows: the assignments sorted by expert, each expert's group padded to BLOCK_M rows
  B = row blocks of BLOCK_M padded rows, each owned by one expert (or by none: the -1 sentinel)

Steps (all shapes depend only on T, J, E and the config, so a step is CUDA-graph capturable):
  1. alignment (moe_align.py), no host sync: the padded row order rows_P and each block's expert.
  2. ``_gate_up_kernel``: grid (F tiles, B): h_AF = silu(x W_gate^T) * (x W_up^T) for its block's rows.
  3. ``_down_kernel``: grid (D tiles, B): y_AD = h W_down^T in float32, written at row a = t * J + j.
  4. ``_sum_kernel``: grid (T, D tiles): per token, the routed rows rounded to x's dtype, times their
     weight (rounded as ``expert_ffn`` rounds), summed; plus, with S chunks, the shared expert: its
     chunks' float32 sums added (one GEMM's sum, in another order), rounded, times its sigmoid gate.
Blocks past the real ones have expert -1 and their programs return at once; at decode most do.

A shared expert of width S * F is S experts of width F: chunk c holds gate/up rows [cF, (c+1)F) and
down columns [cF, (c+1)F). Folded into the stacks (models/fuse.py), it costs no launches of its own
and its rows fill SMs the routed experts leave idle at decode.
"""
from __future__ import annotations

import functools
from typing import Any

import torch

from dejavu_py.models.moe_align import (  # noqa: F401 (re-exported)
    align_block_size,
    align_block_size_kernel,
    max_blocks,
)
from dejavu_py.models.triton_base import DTYPES, available, interpreting, tl, triton  # noqa: F401 (re-exported)

Config = dict[str, int]


# ---------------------------------------------------------------- block sizes


def pick_config(num_assignments: int, num_experts: int, dtype: torch.dtype) -> Config:
    """Block sizes by mean rows per expert (A / E); Hopper-minded, memory-bound at decode.

    Few rows per expert (decode): BLOCK_M 16 wastes least on padding and BLOCK_N 64 gives
    (touched experts x F/64) programs, enough to cover the SMs while each streams a [64, D] weight
    slice once. More rows: larger BLOCK_M so each weight tile is reused over more rows.
    """
    rows_per_expert = num_assignments / num_experts
    if rows_per_expert <= 16:  # 3 weight tiles in flight per program (~108 KB smem in gate_up)
        cfg = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)
    elif rows_per_expert <= 48:
        cfg = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3)
    else:
        cfg = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)
    if dtype == torch.float32:  # twice the bytes per tile: halve BLOCK_K to fit shared memory
        cfg["BLOCK_K"] //= 2
    return cfg


# ---------------------------------------------------------------- kernels (jitted in _kernels)
# Only builtins of triton.language (no tl.zeros, tl.cdiv, tl.sigmoid: those are @jit functions that
# the interpreter cannot call when triton was imported before TRITON_INTERPRET=1 was set).


def _gate_up_kernel(
    x_ptr, w_ptr, h_ptr, rows_ptr, block_expert_ptr,  # x [T, D], w [E, 2F, D], h [A, F], rows [P], experts [B]
    A, stride_xt, stride_we, stride_wn, stride_wd, stride_ha,
    F: tl.constexpr, D: tl.constexpr, TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):
    """h[a, n] = silu(x[t] . w[e, n]) * (x[t] . w[e, F + n]) for the rows of one block, one N tile."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e < 0:
        return
    rows_M = tl.load(rows_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok_M = rows_M < A
    offs_N = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok_N = offs_N < F
    offs_K = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + (rows_M // TOP_K).to(tl.int64)[:, None] * stride_xt + offs_K[None, :]  # [BM, BK]
    wg_ptrs = w_ptr + e * stride_we + offs_N[None, :] * stride_wn + offs_K[:, None] * stride_wd  # [BK, BN]
    wu_ptrs = wg_ptrs + F * stride_wn
    acc_g = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    acc_u = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, (D + BLOCK_K - 1) // BLOCK_K):
        if EVEN_K:
            x_mask = row_ok_M[:, None]
            w_mask = n_ok_N[None, :]
        else:
            k_ok_K = offs_K < D - k0 * BLOCK_K
            x_mask = row_ok_M[:, None] & k_ok_K[None, :]
            w_mask = k_ok_K[:, None] & n_ok_N[None, :]
        x_tile = tl.load(x_ptrs, mask=x_mask, other=0.0)
        wg_tile = tl.load(wg_ptrs, mask=w_mask, other=0.0)
        wu_tile = tl.load(wu_ptrs, mask=w_mask, other=0.0)
        if DOT_F32:
            x_tile, wg_tile, wu_tile = x_tile.to(tl.float32), wg_tile.to(tl.float32), wu_tile.to(tl.float32)
        acc_g = tl.dot(x_tile, wg_tile, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(x_tile, wu_tile, acc_u, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        wg_ptrs += BLOCK_K * stride_wd
        wu_ptrs += BLOCK_K * stride_wd
    io = h_ptr.dtype.element_ty  # round as the unfused path does: linear out, silu out, product
    gate = acc_g.to(io).to(tl.float32)
    up = acc_u.to(io).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(io).to(tl.float32)  # silu
    h_ptrs = h_ptr + rows_M.to(tl.int64)[:, None] * stride_ha + offs_N[None, :]
    tl.store(h_ptrs, (act * up).to(io), mask=row_ok_M[:, None] & n_ok_N[None, :])


def _down_kernel(
    h_ptr, w_ptr, y_ptr, rows_ptr, block_expert_ptr,  # h [A, F], w [E, D, F], y [A, D] float32
    A, stride_ha, stride_we, stride_wd, stride_wf, stride_ya,
    D: tl.constexpr, F: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):
    """y[a, n] = h[a] . w[e, n] in float32 for the rows of one block, one N tile of D."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e < 0:
        return
    rows_M = tl.load(rows_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok_M = rows_M < A
    rows64_M = rows_M.to(tl.int64)
    offs_N = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok_N = offs_N < D
    offs_K = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + rows64_M[:, None] * stride_ha + offs_K[None, :]  # [BM, BK]
    w_ptrs = w_ptr + e * stride_we + offs_N[None, :] * stride_wd + offs_K[:, None] * stride_wf  # [BK, BN]
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, (F + BLOCK_K - 1) // BLOCK_K):
        if EVEN_K:
            h_mask = row_ok_M[:, None]
            w_mask = n_ok_N[None, :]
        else:
            k_ok_K = offs_K < F - k0 * BLOCK_K
            h_mask = row_ok_M[:, None] & k_ok_K[None, :]
            w_mask = k_ok_K[:, None] & n_ok_N[None, :]
        h_tile = tl.load(h_ptrs, mask=h_mask, other=0.0)
        w_tile = tl.load(w_ptrs, mask=w_mask, other=0.0)
        if DOT_F32:
            h_tile, w_tile = h_tile.to(tl.float32), w_tile.to(tl.float32)
        acc = tl.dot(h_tile, w_tile, acc, input_precision=PRECISION)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wf
    y_ptrs = y_ptr + rows64_M[:, None] * stride_ya + offs_N[None, :]
    tl.store(y_ptrs, acc, mask=row_ok_M[:, None] & n_ok_N[None, :])


def _sum_kernel(
    y_ptr, weights_ptr, out_ptr,  # y [A, D] float32, weights [A], out [T, D] in x's dtype
    D, J: tl.constexpr, K: tl.constexpr, S: tl.constexpr, BLOCK_D: tl.constexpr,
    ROUND_W: tl.constexpr, ROUND_Y: tl.constexpr,
):
    """out[t] = sum_k round(round(y[t, k]) * w[t, k]) (+ round(round(sum_c y[t, K + c]) * w[t, K]))."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = offs < D
    io = out_ptr.dtype.element_ty
    routed = tl.full((BLOCK_D,), 0.0, tl.float32)
    for k in range(K):
        y = tl.load(y_ptr + (t * J + k) * D + offs, mask=ok, other=0.0).to(io).to(tl.float32)  # linear out
        w = tl.load(weights_ptr + t * J + k).to(tl.float32)
        if ROUND_W:  # the routing weights cast to x's dtype (qwen, olmoe)
            w = w.to(io).to(tl.float32)
        y = y * w
        if ROUND_Y:  # y * weight in x's dtype when the weights are in it
            y = y.to(io).to(tl.float32)
        routed += y
    out = routed.to(io)
    if S > 0:
        shared = tl.full((BLOCK_D,), 0.0, tl.float32)
        for c in range(S):
            shared += tl.load(y_ptr + (t * J + K + c) * D + offs, mask=ok, other=0.0)
        gate = tl.load(weights_ptr + t * J + K).to(io).to(tl.float32)  # sigmoid(shared gate), x's dtype
        shared = (shared.to(io).to(tl.float32) * gate).to(io).to(tl.float32)
        out = (out.to(tl.float32) + shared).to(io)
    tl.store(out_ptr + t * D + offs, out, mask=ok)


@functools.lru_cache(maxsize=2)
def _kernels(interpret: bool) -> tuple[Any, Any, Any]:
    """(gate_up, down, sum) jitted; triton.jit picks the interpreter from TRITON_INTERPRET as it decorates."""
    assert triton is not None and interpret == interpreting()
    return triton.jit(_gate_up_kernel), triton.jit(_down_kernel), triton.jit(_sum_kernel)


# ---------------------------------------------------------------- wrapper


def fused_expert_ffn(
    x_TD: torch.Tensor,
    ids_TJ: torch.Tensor,
    weights_TJ: torch.Tensor,
    w_gate_up_EFD: torch.Tensor,
    w_down_EDF: torch.Tensor,
    config: Config | None = None,
    align: str = "kernel",
    num_shared: int = 0,
    round_weights: bool = False,
) -> torch.Tensor:
    """y_TD = sum_k weights_TJ[t, k] * down_e(silu(gate_e x_t) * up_e x_t), e = ids_TJ[t, k], k < K = J - S.

    Same semantics as ``moe.expert_ffn``; x and the expert weights share one dtype (bf16, fp16 or fp32).
    ``num_shared`` S: the last S columns of ids_TJ are a shared expert's chunks (the last S experts of
    the stacks), summed and scaled by weights_TJ[t, K] (its sigmoid gate), as qwen2_moe adds its shared
    expert. ``round_weights``: the routing weights are cast to x's dtype first (as the MoE block does
    for qwen and olmoe). ``config`` overrides ``pick_config`` (keys BLOCK_M, BLOCK_N, BLOCK_K,
    num_warps, num_stages). ``align``: "kernel" (one launch) or "torch" (a stage's is --moe-align).
    """
    _check_inputs(x_TD, ids_TJ, w_gate_up_EFD, w_down_EDF)
    T, J = ids_TJ.shape
    E, _, D = w_gate_up_EFD.shape
    A = T * J
    if A == 0:
        return torch.zeros_like(x_TD)
    cfg = config or pick_config(A, E, x_TD.dtype)
    assert align in ("kernel", "torch"), f"align={align!r}: kernel or torch"
    aligner = align_block_size_kernel if align == "kernel" else align_block_size
    rows_P, block_expert_B = aligner(ids_TJ, E, cfg["BLOCK_M"])
    y_AD = _grouped_swiglu_ffn(x_TD.contiguous(), J, w_gate_up_EFD, w_down_EDF, rows_P, block_expert_B, cfg)
    # y * weight in expert_ffn is in x's dtype unless the weights are wider (float32 routing weights)
    round_y = round_weights or torch.promote_types(x_TD.dtype, weights_TJ.dtype) == x_TD.dtype
    return _weighted_sum(y_AD, weights_TJ.reshape(-1).contiguous(), T, J, num_shared, x_TD.dtype,
                         round_weights, round_y)


def _weighted_sum(y_AD: torch.Tensor, weights_A: torch.Tensor, T: int, J: int, S: int, dtype: torch.dtype,
                  round_weights: bool, round_y: bool) -> torch.Tensor:
    """The per-token sum of the experts' rows: one launch (``_sum_kernel``)."""
    D = y_AD.shape[1]
    out_TD = torch.empty((T, D), dtype=dtype, device=y_AD.device)
    block = min(1024, triton.next_power_of_2(D))
    _kernels(interpreting())[2][(T, triton.cdiv(D, block))](
        y_AD, weights_A, out_TD, D, J=J, K=J - S, S=S, BLOCK_D=block, ROUND_W=round_weights, ROUND_Y=round_y,
        num_warps=4, enable_fp_fusion=False,
    )
    return out_TD


def _check_inputs(
    x_TD: torch.Tensor, ids_TJ: torch.Tensor, w_gate_up_EFD: torch.Tensor, w_down_EDF: torch.Tensor
) -> None:
    if triton is None:
        raise RuntimeError("fused_expert_ffn needs triton")
    if not x_TD.is_cuda and not interpreting():
        raise RuntimeError("fused_expert_ffn on CPU runs only in the triton interpreter (TRITON_INTERPRET=1)")
    assert x_TD.dtype in DTYPES and x_TD.dtype == w_gate_up_EFD.dtype == w_down_EDF.dtype, (
        f"x {x_TD.dtype}, gate_up {w_gate_up_EFD.dtype}, down {w_down_EDF.dtype}: one of {DTYPES} expected"
    )
    E, F2, D = w_gate_up_EFD.shape
    assert w_down_EDF.shape == (E, D, F2 // 2), f"down_proj {tuple(w_down_EDF.shape)} != {(E, D, F2 // 2)}"
    assert x_TD.shape == (ids_TJ.shape[0], D), f"x {tuple(x_TD.shape)} vs ids {tuple(ids_TJ.shape)}, D {D}"


def _grouped_swiglu_ffn(
    x_TD: torch.Tensor, J: int, w_gate_up_EFD: torch.Tensor, w_down_EDF: torch.Tensor,
    rows_P: torch.Tensor, block_expert_B: torch.Tensor, cfg: Config,
) -> torch.Tensor:
    """The two GEMM launches: y_AD [A, D] float32, token-major rows, not yet weighted."""
    T, (_, F2, D), B = x_TD.shape[0], w_gate_up_EFD.shape, block_expert_B.numel()
    A, Fw = T * J, F2 // 2
    BM, BN, BK = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    consts = dict(
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 3),
        PRECISION="ieee" if x_TD.dtype == torch.float32 else "tf32",  # tf32 is ignored for 16-bit inputs
        # the 3.6 interpreter multiplies bf16 tiles as raw uint16: upcast there (bf16 products are exact in fp32)
        DOT_F32=interpreting() and x_TD.dtype == torch.bfloat16,
    )
    gate_up, down, _ = _kernels(interpreting())
    h_AF = torch.empty((A, Fw), dtype=x_TD.dtype, device=x_TD.device)
    y_AD = torch.empty((A, D), dtype=torch.float32, device=x_TD.device)
    gate_up[(triton.cdiv(Fw, BN), B)](
        x_TD, w_gate_up_EFD, h_AF, rows_P, block_expert_B,
        A, x_TD.stride(0), *w_gate_up_EFD.stride(), h_AF.stride(0),
        F=Fw, D=D, TOP_K=J, EVEN_K=D % BK == 0, **consts,
    )
    down[(triton.cdiv(D, BN), B)](
        h_AF, w_down_EDF, y_AD, rows_P, block_expert_B,
        A, h_AF.stride(0), *w_down_EDF.stride(), y_AD.stride(0),
        D=D, F=Fw, EVEN_K=Fw % BK == 0, **consts,
    )
    return y_AD
