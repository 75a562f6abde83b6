"""Sorting a step's token-expert assignments by expert, each expert's group padded to BLOCK_M rows.

Legend (shape suffixes):
  A = token-expert assignments; assignment a = t * K + k (token-major)
  E = experts                       P = padded rows: the assignments sorted by expert, padded per expert
  B = row blocks of BLOCK_M padded rows, each owned by one expert (or by none: the -1 sentinel)

Two implementations with the same outputs: ``align_block_size`` in ~25 small torch ops, and
``align_block_size_kernel``, one single-program Triton launch (at decode those launches would cost
more than the GEMMs). Sizes depend only on A, E and BLOCK_M: no host sync, CUDA-graph capturable.
"""
from __future__ import annotations

import functools
from typing import Any

import torch

from dejavu_py.models.triton_base import interpreting, tl, triton

if triton is not None:
    from dejavu_py.models.triton_base import _add_combine


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
    _align_jit(interpreting())[(1,)](
        ids_TK.reshape(-1).contiguous(), rows_P, block_expert_B, A, B * BM, B,
        E=E, E_PAD=max(16, triton.next_power_of_2(E)), BLOCK_M=BM, BLOCK_A=block_a,
        A_CHUNKS=A_pad // block_a, P_CHUNKS=triton.cdiv(max_blocks(A_pad, E, BM) * BM, 1024),
        B_CHUNKS=triton.cdiv(max_blocks(A_pad, E, BM), 64), num_warps=4 if block_a < 64 else 8,
    )
    return rows_P, block_expert_B


@functools.lru_cache(maxsize=2)
def _align_jit(interpret: bool) -> Any:
    assert triton is not None and interpret == interpreting()
    return triton.jit(_align_kernel)
