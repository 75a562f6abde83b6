"""Triton fused-MoE for the routed experts: two grouped GEMM kernels over tokens sorted by expert.

Legend (shape suffixes):
  T = tokens of the step            D = hidden size
  E = routed experts                K = experts per token (top-k)
  F = expert width; ``w_gate_up_EFD`` holds 2F rows: the F gate rows, then the F up rows
  A = T * K token-expert assignments; assignment a = t * K + k (token-major)
  P = padded rows: the assignments sorted by expert, each expert's group padded to BLOCK_M rows
  B = row blocks of BLOCK_M padded rows, each owned by one expert (or by none: the -1 sentinel)

Steps (all shapes depend only on T, K, E and the config, so a step is CUDA-graph capturable):
  1. alignment, no host sync: the padded row order rows_P and each block's expert block_expert_B;
     ``align_block_size`` in ~25 small torch ops, or ``_align_kernel``, one single-program launch
     with the same outputs (default; at decode those launches would cost more than the GEMMs).
  2. ``_gate_up_kernel``: grid (F tiles, B): h_AF = silu(x W_gate^T) * (x W_up^T) for its block's rows.
  3. ``_down_kernel``: grid (D tiles, B): y_AD = weight_a * (h W_down^T), written at row a = t * K + k.
  4. y_TD = y_AD.view(T, K, D).sum(1) in the dtype of ``y * weight``, cast to x's dtype (as ``expert_ffn``).
Blocks past the real ones have expert -1 and their programs return at once; at decode most do.

Triton is optional: this module imports without it, ``available()`` says whether it can run. Kernels
are jitted on first use (and per TRITON_INTERPRET setting) so tests can run them in the interpreter.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU CI without triton: only available() and align_block_size work
    triton = None
    tl = None

if triton is not None:
    # the sum for tl.reduce / tl.associative_scan: triton's own (tl.sum's), which the interpreter runs
    # with numpy; else ours (the interpreter calls its .fn element by element: correct, slow)
    _add_combine = getattr(tl.standard, "_sum_combine", None)
    if _add_combine is None:

        @triton.jit
        def _add_combine(a, b):
            return a + b

Config = dict[str, int]
DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # x and expert weights; routing weights may differ


def available() -> bool:
    """Whether triton is installed (the fused path also needs CUDA, or TRITON_INTERPRET=1 on CPU)."""
    return triton is not None


def interpreting() -> bool:
    """Whether triton runs kernels in its numpy interpreter (TRITON_INTERPRET=1)."""
    return triton is not None and bool(triton.knobs.runtime.interpret)


# ---------------------------------------------------------------- alignment (sort and pad to BLOCK_M)


def max_blocks(num_assignments: int, num_experts: int, block_m: int) -> int:
    """Upper bound on sum_e ceil(count_e / BLOCK_M): at most min(E, A) experts have rows."""
    return (num_assignments + min(num_experts, num_assignments) * (block_m - 1)) // block_m


def align_block_size(ids_TK: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows_P int32, block_expert_B int32): the padded row order and each row block's expert.

    rows_P[p] is the assignment a = t * K + k at padded row p, or A (a dummy row) on padding; the
    rows of expert e fill blocks of BLOCK_M, in assignment order, from the end of expert e-1's blocks.
    block_expert_B[b] is the expert of rows [b * BLOCK_M, (b + 1) * BLOCK_M), or -1 past the last
    real block. P = B * BLOCK_M with B = ``max_blocks``: sizes are static, no .item() or bincount.
    """
    A, E, BM = ids_TK.numel(), num_experts, block_m
    dev = ids_TK.device
    B = max_blocks(A, E, BM)
    ids_A = ids_TK.reshape(-1).long()
    counts_E = torch.zeros(E, dtype=torch.long, device=dev).scatter_add_(0, ids_A, torch.ones_like(ids_A))
    padded_E = (counts_E + BM - 1) // BM * BM
    pad_end_E = torch.cumsum(padded_E, 0)  # [E] end of each expert's padded group
    start_E = torch.cumsum(counts_E, 0) - counts_E  # [E] first sorted position of each expert
    order_A = torch.argsort(ids_A, stable=True)  # sorted position -> assignment
    sorted_ids_A = ids_A[order_A]
    rank_A = torch.arange(A, device=dev) - start_E[sorted_ids_A]  # rank within its expert's group
    dest_A = pad_end_E[sorted_ids_A] - padded_E[sorted_ids_A] + rank_A  # padded row of each sorted position
    rows_P = torch.full((B * BM,), A, dtype=torch.int32, device=dev).scatter_(0, dest_A, order_A.to(torch.int32))
    block_start_B = torch.arange(B, device=dev) * BM
    block_expert_B = torch.searchsorted(pad_end_E, block_start_B, right=True)  # first e ending after the start
    block_expert_B = torch.where(block_expert_B < E, block_expert_B, -1).to(torch.int32)
    return rows_P, block_expert_B


def _align_kernel(
    ids_ptr, rows_ptr, block_expert_ptr,  # ids [A] (any int), rows [P] int32, block_expert [B] int32
    A, P, B,
    E: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr,
    A_CHUNKS: tl.constexpr, P_CHUNKS: tl.constexpr, B_CHUNKS: tl.constexpr,
):
    """``align_block_size`` in one program: the same rows_P and block_expert_B."""
    FILL: tl.constexpr = 1024
    BLOCK_B: tl.constexpr = 64
    offs_E = tl.arange(0, E_PAD)
    offs_A = tl.arange(0, BLOCK_A)
    counts_E = tl.full((E_PAD,), 0, tl.int32)
    for c in range(A_CHUNKS):  # rows per expert
        a_A = c * BLOCK_A + offs_A
        ids_A = tl.load(ids_ptr + a_A, mask=a_A < A, other=0).to(tl.int32)
        counts_E += tl.histogram(ids_A, E_PAD, mask=a_A < A)
    padded_E = (counts_E + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    pad_end_E = tl.associative_scan(padded_E, 0, _add_combine)  # end row of each expert's group
    for c in range(P_CHUNKS):  # every padded row starts as the dummy row A
        p_P = c * FILL + tl.arange(0, FILL)
        tl.store(rows_ptr + p_P, tl.full((FILL,), 0, tl.int32) + A, mask=p_P < P)
    for c in range(B_CHUNKS):  # a block's expert: the first whose group ends after the block's first row
        b_B = c * BLOCK_B + tl.arange(0, BLOCK_B)
        ended_BE = (pad_end_E[None, :] <= b_B[:, None] * BLOCK_M) & (offs_E[None, :] < E)
        e_B = tl.reduce(ended_BE.to(tl.int32), 1, _add_combine)
        tl.store(block_expert_ptr + b_B, tl.where(e_B < E, e_B, -1), mask=b_B < B)
    tl.debug_barrier()  # the fill above lands before the scatter below
    next_E = pad_end_E - padded_E  # next free row of each expert's group
    for c in range(A_CHUNKS):  # assignment a goes to its expert's next free row, in assignment order
        a_A = c * BLOCK_A + offs_A
        ok_A = a_A < A
        ids_A = tl.load(ids_ptr + a_A, mask=ok_A, other=0).to(tl.int32)
        earlier_AA = (ids_A[:, None] == ids_A[None, :]) & (offs_A[None, :] < offs_A[:, None]) & ok_A[None, :]
        rank_A = tl.reduce(earlier_AA.to(tl.int32), 1, _add_combine)
        base_A = tl.reduce(tl.where(ids_A[:, None] == offs_E[None, :], next_E[None, :], 0), 1, _add_combine)
        tl.store(rows_ptr + base_A + rank_A, a_A, mask=ok_A)
        next_E += tl.histogram(ids_A, E_PAD, mask=ok_A)


def align_block_size_kernel(
    ids_TK: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``align_block_size`` as one Triton launch (CUDA or the interpreter); compiles once per power of 2 of A."""
    A, E, BM = ids_TK.numel(), num_experts, block_m
    B = max_blocks(A, E, BM)
    rows_P = torch.empty(B * BM, dtype=torch.int32, device=ids_TK.device)
    block_expert_B = torch.empty(B, dtype=torch.int32, device=ids_TK.device)
    A_pad = triton.next_power_of_2(A)  # loop counts from A rounded up: few variants to compile
    block_a = min(A_pad, 64)  # [block_a, block_a] and [block_a, E_PAD] tiles per step: no spills at 8 warps
    _kernels(interpreting())[0][(1,)](
        ids_TK.reshape(-1).contiguous(), rows_P, block_expert_B, A, B * BM, B,
        E=E, E_PAD=max(16, triton.next_power_of_2(E)), BLOCK_M=BM, BLOCK_A=block_a,
        A_CHUNKS=A_pad // block_a, P_CHUNKS=triton.cdiv(max_blocks(A_pad, E, BM) * BM, 1024),
        B_CHUNKS=triton.cdiv(max_blocks(A_pad, E, BM), 64), num_warps=4 if block_a < 64 else 8,
    )
    return rows_P, block_expert_B


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
    h_ptr, w_ptr, y_ptr, rows_ptr, block_expert_ptr, weights_ptr,  # h [A, F], w [E, D, F], y [A, D], weights [A]
    A, stride_ha, stride_we, stride_wd, stride_wf, stride_ya,
    D: tl.constexpr, F: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):
    """y[a, n] = weight[a] * (h[a] . w[e, n]) for the rows of one block, one N tile of D."""
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
    weight_M = tl.load(weights_ptr + rows64_M, mask=row_ok_M, other=0.0).to(tl.float32)
    y = acc.to(h_ptr.dtype.element_ty).to(tl.float32) * weight_M[:, None]  # y in x's dtype, then * weight
    y_ptrs = y_ptr + rows64_M[:, None] * stride_ya + offs_N[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=row_ok_M[:, None] & n_ok_N[None, :])


@functools.lru_cache(maxsize=2)
def _kernels(interpret: bool) -> tuple[Any, Any, Any]:
    """(align, gate_up, down) jitted; triton.jit picks the interpreter from TRITON_INTERPRET as it decorates."""
    assert triton is not None and interpret == interpreting()
    return triton.jit(_align_kernel), triton.jit(_gate_up_kernel), triton.jit(_down_kernel)


# ---------------------------------------------------------------- wrapper


def fused_expert_ffn(
    x_TD: torch.Tensor,
    ids_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    w_gate_up_EFD: torch.Tensor,
    w_down_EDF: torch.Tensor,
    config: Config | None = None,
    align: str | None = None,
) -> torch.Tensor:
    """y_TD = sum_k weights_TK[t, k] * down_e(silu(gate_e x_t) * up_e x_t), e = ids_TK[t, k].

    Same semantics as ``moe.expert_ffn``; x and the expert weights share one dtype (bf16, fp16 or fp32).
    ``config`` overrides ``pick_config`` (keys BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages).
    ``align``: "kernel" (one launch, the default) or "torch" (``align_block_size``); env DEJAVU_MOE_ALIGN.
    """
    _check_inputs(x_TD, ids_TK, w_gate_up_EFD, w_down_EDF)
    T, K = ids_TK.shape
    E, _, D = w_gate_up_EFD.shape
    A = T * K
    if A == 0:
        return torch.zeros_like(x_TD)
    cfg = config or pick_config(A, E, x_TD.dtype)
    align = align or os.environ.get("DEJAVU_MOE_ALIGN", "kernel")
    assert align in ("kernel", "torch"), f"align={align!r}: kernel or torch"
    aligner = align_block_size_kernel if align == "kernel" else align_block_size
    rows_P, block_expert_B = aligner(ids_TK, E, cfg["BLOCK_M"])
    out_dtype = torch.promote_types(x_TD.dtype, weights_TK.dtype)  # dtype of y * weight in expert_ffn
    y_AD = _grouped_swiglu_ffn(
        x_TD.contiguous(), K, weights_TK.reshape(-1).contiguous(), w_gate_up_EFD, w_down_EDF,
        rows_P, block_expert_B, cfg, out_dtype,
    )
    return y_AD.view(T, K, D).sum(dim=1).to(x_TD.dtype)


def _check_inputs(
    x_TD: torch.Tensor, ids_TK: torch.Tensor, w_gate_up_EFD: torch.Tensor, w_down_EDF: torch.Tensor
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
    assert x_TD.shape == (ids_TK.shape[0], D), f"x {tuple(x_TD.shape)} vs ids {tuple(ids_TK.shape)}, D {D}"


def _grouped_swiglu_ffn(
    x_TD: torch.Tensor, K: int, weights_A: torch.Tensor, w_gate_up_EFD: torch.Tensor, w_down_EDF: torch.Tensor,
    rows_P: torch.Tensor, block_expert_B: torch.Tensor, cfg: Config, out_dtype: torch.dtype,
) -> torch.Tensor:
    """The two GEMM launches: y_AD [A, D] in out_dtype, token-major rows, already scaled by the weights."""
    A, (E, F2, D), B = weights_A.numel(), w_gate_up_EFD.shape, block_expert_B.numel()
    Fw = F2 // 2
    BM, BN, BK = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    consts = dict(
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 3),
        PRECISION="ieee" if x_TD.dtype == torch.float32 else "tf32",  # tf32 is ignored for 16-bit inputs
        # the 3.6 interpreter multiplies bf16 tiles as raw uint16: upcast there (bf16 products are exact in fp32)
        DOT_F32=interpreting() and x_TD.dtype == torch.bfloat16,
    )
    _, gate_up, down = _kernels(interpreting())
    h_AF = torch.empty((A, Fw), dtype=x_TD.dtype, device=x_TD.device)
    y_AD = torch.empty((A, D), dtype=out_dtype, device=x_TD.device)
    gate_up[(triton.cdiv(Fw, BN), B)](
        x_TD, w_gate_up_EFD, h_AF, rows_P, block_expert_B,
        A, x_TD.stride(0), *w_gate_up_EFD.stride(), h_AF.stride(0),
        F=Fw, D=D, TOP_K=K, EVEN_K=D % BK == 0, **consts,
    )
    down[(triton.cdiv(D, BN), B)](
        h_AF, w_down_EDF, y_AD, rows_P, block_expert_B, weights_A,
        A, h_AF.stride(0), *w_down_EDF.stride(), y_AD.stride(0),
        D=D, F=Fw, EVEN_K=Fw % BK == 0, **consts,
    )
    return y_AD
