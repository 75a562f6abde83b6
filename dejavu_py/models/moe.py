"""Sparse Mixture-of-Experts block: router, routed experts (fused weights) and qwen2_moe's shared expert.

Legend (shape suffixes):
  T = tokens of the step            D = hidden size
  E = routed experts                K = experts per token (top-k)
  F = expert width; in ``w_gate_up_EFD`` the F axis holds 2F rows: the F gate rows, then the F up rows
  A = T * K token-expert assignments, sorted by expert

Expert weights are fused as transformers 5 holds them in memory: ``experts.gate_up_proj`` [E, 2F, D]
and ``experts.down_proj`` [E, D, F]. Tokens are grouped by expert (one sort, no loop over tokens);
each expert's rows go through its SwiGLU, are scaled by their routing weight and summed per token.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dejavu_py.models import fused_moe, moe_router
from dejavu_py.models.config import ModelConfig
from dejavu_py.models.kernels import EAGER, GROUPED_MM, Kernels
from dejavu_py.models.layers import DenseMLP

RoutingSink = Callable[[int, torch.Tensor, torch.Tensor], None]
"""Called as ``sink(layer, topk_ids_TK int64, topk_weights_TK float32)`` by every MoE layer."""


def _swiglu(h_A2F: torch.Tensor) -> torch.Tensor:
    gate_AF, up_AF = h_A2F.chunk(2, dim=-1)
    return F.silu(gate_AF) * up_AF  # [A, F]


def _looped_ffn(
    x_AD: torch.Tensor, counts_E: torch.Tensor, w_gate_up_EFD: torch.Tensor, w_down_EDF: torch.Tensor
) -> torch.Tensor:
    """One pair of GEMMs per expert that has rows (rows already grouped by expert)."""
    y_AD = torch.empty_like(x_AD)
    start = 0
    for e, n in enumerate(counts_E.tolist()):
        if n:
            rows = slice(start, start + n)
            h_AF = _swiglu(F.linear(x_AD[rows], w_gate_up_EFD[e]))
            y_AD[rows] = F.linear(h_AF, w_down_EDF[e])
            start += n
    return y_AD


def _grouped_ffn(
    x_AD: torch.Tensor, counts_E: torch.Tensor, w_gate_up_EFD: torch.Tensor, w_down_EDF: torch.Tensor
) -> torch.Tensor:
    """All experts in two grouped GEMMs; no host sync on the expert counts."""
    mm = GROUPED_MM
    assert mm is not None, "this torch has no grouped_mm"
    offs_E = torch.cumsum(counts_E, dim=0, dtype=torch.int32)  # [E] end row of each expert's group
    h_A2F = mm(x_AD, w_gate_up_EFD.transpose(-2, -1), offs=offs_E)
    return mm(_swiglu(h_A2F), w_down_EDF.transpose(-2, -1), offs=offs_E)  # [A, D]


def expert_ffn(
    x_TD: torch.Tensor,
    ids_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    w_gate_up_EFD: torch.Tensor,
    w_down_EDF: torch.Tensor,
    kernel: str,
    align: str = "kernel",
) -> torch.Tensor:
    """Routed experts' output y_TD = sum_k weights_TK[t, k] * expert_{ids_TK[t, k]}(x_TD[t]).

    ``kernel`` (models/kernels.py, chosen at load): the Triton fused kernels ('fused', ``fused_moe``,
    grouping rows by ``align``), the grouped GEMM ('grouped') or the per-expert loop ('loop'), all
    with these semantics. The weighted rows are summed per token in the dtype of ``y * weight``
    (float32 when the weights are), then cast to x's dtype, as transformers' grouped_mm experts do.
    """
    if kernel == "fused":
        return fused_moe.fused_expert_ffn(x_TD, ids_TK, weights_TK, w_gate_up_EFD, w_down_EDF, align=align)
    T, K = ids_TK.shape
    E = w_gate_up_EFD.shape[0]
    ids_A = ids_TK.reshape(-1)
    order_A = torch.argsort(ids_A, stable=True)  # assignment -> position in expert order
    x_AD = x_TD[order_A // K]
    # scatter_add, not bincount: bincount reads the max id back to the host, which CUDA graphs forbid
    counts_E = torch.zeros(E, dtype=torch.long, device=ids_A.device).scatter_add_(0, ids_A, torch.ones_like(ids_A))
    ffn = _grouped_ffn if kernel == "grouped" else _looped_ffn
    y_AD = ffn(x_AD, counts_E, w_gate_up_EFD, w_down_EDF)
    y_AD = y_AD * weights_TK.reshape(-1)[order_A, None]
    out_AD = torch.empty_like(y_AD)
    out_AD[order_A] = y_AD  # back to token-major order: row t * K + k
    return out_AD.view(T, K, -1).sum(dim=1).to(x_TD.dtype)


class Router(nn.Module):
    """``mlp.gate``: softmax over all experts in float32, top-k, optional renormalisation."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))  # [E, D]
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(top-k expert ids [T, K] int64, their float32 weights [T, K])."""
        logits_TE = F.linear(x_TD, self.weight)
        probs_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
        weights_TK, ids_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        return ids_TK, weights_TK


class Experts(nn.Module):
    """``mlp.experts``: the routed experts' fused weights."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        E, D, Fw = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * Fw, D))  # [E, 2F, D]
        self.down_proj = nn.Parameter(torch.empty(E, D, Fw))  # [E, D, F]
        self.kernels: Kernels = EAGER

    def forward(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        k = self.kernels
        return expert_ffn(x_TD, ids_TK, weights_TK, self.gate_up_proj, self.down_proj, k.moe, k.moe_align)


class SparseMoE(nn.Module):
    """A decoder layer's ``mlp`` when it is sparse."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.weights_fp32 = cfg.router_weights_fp32
        self.gate = Router(cfg)
        self.experts = Experts(cfg)
        self.has_shared = bool(cfg.shared_expert_intermediate_size)
        """A shared expert as its own modules (qwen2_moe), not folded into the experts."""
        if self.has_shared:
            self.shared_expert = DenseMLP(cfg.hidden_size, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)
        self.shared_gate_col: int | None = None
        """Set at load when the shared expert's gate became this column of its gate/up projection (models/fuse.py)."""
        self.folded = False
        """Set at load when the block was folded (models/fuse.py ``fold_moe``): router_w_XD, num_shared."""
        self.num_shared = 0
        self.kernels: Kernels = EAGER

    def forward(self, x_TD: torch.Tensor, sink: RoutingSink | None = None,
                forced: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``forced`` (recorded top-k ids [T, K] and float32 weights [T, K]) replaces the router's choice:
        a replayed step routes exactly as it did the first time. The sink still sees the router's own."""
        if self.folded:
            return self._forward_folded(x_TD, sink, forced)
        ids_TK, weights_TK = self.gate(x_TD)
        if sink is not None:
            sink(self.layer, ids_TK, weights_TK)
        if forced is not None:
            ids_TK, weights_TK = forced[0].to(ids_TK.device, ids_TK.dtype), forced[1].to(weights_TK.device, weights_TK.dtype)
        if not self.weights_fp32:  # qwen and olmoe cast the routing weights to the model dtype; mixtral does not
            weights_TK = weights_TK.to(x_TD.dtype)
        y_TD = self.experts(x_TD, ids_TK, weights_TK)
        col = self.shared_gate_col
        if col is not None:  # its gate is a column of the fused projection
            gu = self.shared_expert.gate_up_proj(x_TD)
            y_TD = y_TD + torch.sigmoid(gu[..., col:col + 1]) * self.shared_expert.down_fused(gu)
        elif self.has_shared:
            y_TD = y_TD + torch.sigmoid(self.shared_expert_gate(x_TD)) * self.shared_expert(x_TD)
        return y_TD

    def _forward_folded(self, x_TD: torch.Tensor, sink: RoutingSink | None,
                        forced: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """After ``fuse.fold_moe``: one routing kernel, then the fused experts with the shared expert's
        S chunks as every token's last S assignments (J = K + S)."""
        K, S = self.gate.top_k, self.num_shared
        ids_TJ, w_TJ = moe_router.route(x_TD, self.router_w_XD, self.gate.weight.shape[0], K, S, self.gate.norm_topk_prob)
        if sink is not None:
            sink(self.layer, ids_TJ[:, :K], w_TJ[:, :K])
        if forced is not None:
            ids_TJ = torch.cat((forced[0].to(ids_TJ.device, ids_TJ.dtype), ids_TJ[:, K:]), dim=1)
            w_TJ = torch.cat((forced[1].to(w_TJ.device, w_TJ.dtype), w_TJ[:, K:]), dim=1)
        return fused_moe.fused_expert_ffn(x_TD, ids_TJ, w_TJ, self.experts.gate_up_proj, self.experts.down_proj,
                                          align=self.kernels.moe_align, num_shared=S, round_weights=not self.weights_fp32)
