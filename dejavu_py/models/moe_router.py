"""The MoE router in two launches: the logits' GEMV, then softmax, top-k (and qwen2_moe's shared-expert
gate) in one Triton kernel.

Legend (shape suffixes):
  T = tokens of the step            D = hidden size
  E = routed experts                K = experts per token (top-k)
  S = shared-expert chunks (the fused MoE's last S experts)      J = K + S
  X = router rows: E, plus the shared expert's gate row when there is one

Eager torch routes in ~6 launches (a GEMV, its reduction, softmax, a radix select, a sort, a cast);
at decode those cost more than the expert GEMMs they choose for. ``route`` computes the logits (with the
shared gate's) as one linear, in x's dtype as the eager router, then one program per token does the
rest with the same rounding steps: softmax in float32
over the E experts, top-k, optional renormalisation. The experts are chosen by logit, the largest
first: the set ``torch.topk`` picks from the softmax (equal logits, equal probabilities), except that
ties at the boundary go to the lower index here, where torch leaves them unspecified (its CPU and CUDA
kernels differ). exp is Triton's (last bits may differ from torch's, as may the order of the logit's sum).

Outputs are laid out for ``fused_moe.fused_expert_ffn``: ids_TJ (int64) and float32 weights_TJ, where
columns K..J-1 are the shared chunks E..E+S-1, each weighted by the shared gate sigmoid(x . w_gate)
rounded to x's dtype (as transformers computes it).
"""
from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

from dejavu_py.models.triton_base import interpreting, tl, triton

if triton is not None:
    from dejavu_py.models.triton_base import _add_combine, _max_combine, _min_combine


def _select_kernel(
    logits_ptr, ids_ptr, weights_ptr,  # logits [T, X] in x's dtype, ids [T, J] int64, weights [T, J] float32
    E: tl.constexpr, X: tl.constexpr, X_PAD: tl.constexpr, K: tl.constexpr, S: tl.constexpr,
    S_PAD: tl.constexpr, NORM: tl.constexpr,
):
    """One token: its K experts (largest logit first) and weights, then S shared chunks at its gate."""
    t = tl.program_id(0).to(tl.int64)
    J: tl.constexpr = K + S
    offs_X = tl.arange(0, X_PAD)
    expert_X = offs_X < E
    raw_X = tl.load(logits_ptr + t * X + offs_X, mask=offs_X < X, other=0.0)
    logits_X = tl.where(expert_X, raw_X.to(tl.float32), float("-inf"))
    p_X = tl.where(expert_X, tl.exp(logits_X - tl.reduce(logits_X, 0, _max_combine)), 0.0)
    probs_X = p_X / tl.reduce(p_X, 0, _add_combine)
    rank_X = tl.full((X_PAD,), -1, tl.int32)  # k of a chosen expert, -1 if not chosen
    left_X = logits_X
    for k in range(K):  # the largest logit left, the lowest index among equals
        best = tl.reduce(left_X, 0, _max_combine)
        e = tl.reduce(tl.where(left_X == best, offs_X, X_PAD), 0, _min_combine)
        rank_X = tl.where(offs_X == e, k, rank_X)
        left_X = tl.where(offs_X == e, float("-inf"), left_X)
    chosen_X = rank_X >= 0
    if NORM:  # the chosen weights over their sum (as the eager router)
        probs_X = probs_X / tl.reduce(tl.where(chosen_X, probs_X, 0.0), 0, _add_combine)
    tl.store(ids_ptr + t * J + rank_X, offs_X.to(tl.int64), mask=chosen_X)
    tl.store(weights_ptr + t * J + rank_X, probs_X, mask=chosen_X)
    if S > 0:
        g = tl.load(logits_ptr + t * X + E).to(tl.float32)
        gate = (1.0 / (1.0 + tl.exp(-g))).to(logits_ptr.dtype.element_ty).to(tl.float32)  # sigmoid, in x's dtype
        offs_S = tl.arange(0, S_PAD)
        s_ok = offs_S < S
        tl.store(ids_ptr + t * J + K + offs_S, (E + offs_S).to(tl.int64), mask=s_ok)
        tl.store(weights_ptr + t * J + K + offs_S, tl.full((S_PAD,), 0.0, tl.float32) + gate, mask=s_ok)


@functools.lru_cache(maxsize=2)
def _jit(interpret: bool) -> Any:
    assert triton is not None and interpret == interpreting()
    return triton.jit(_select_kernel)


def route(x_TD: torch.Tensor, w_XD: torch.Tensor, num_experts: int, top_k: int, num_shared: int = 0,
          norm_topk_prob: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids_TJ int64, weights_TJ float32) for ``fused_expert_ffn``. ``w_XD``: the router's weight [E, D],
    with the shared expert's gate row appended [E + 1, D] when ``num_shared`` > 0."""
    T, D = x_TD.shape
    E, K, S = num_experts, top_k, num_shared
    gate = 1 if S else 0
    assert w_XD.shape == (E + gate, D) and w_XD.is_contiguous(), f"router weight {tuple(w_XD.shape)}, E {E}, D {D}"
    ids_TJ = torch.empty((T, K + S), dtype=torch.int64, device=x_TD.device)
    weights_TJ = torch.empty((T, K + S), dtype=torch.float32, device=x_TD.device)
    if T:
        logits_TX = F.linear(x_TD, w_XD)  # the GEMV on the GEMM library: spread over the SMs
        _jit(interpreting())[(T,)](
            logits_TX, ids_TJ, weights_TJ, E=E, X=E + gate, X_PAD=max(16, triton.next_power_of_2(E + gate)),
            K=K, S=S, S_PAD=max(2, triton.next_power_of_2(S)), NORM=norm_topk_prob, num_warps=1,
            enable_fp_fusion=False,
        )
    return ids_TJ, weights_TJ
