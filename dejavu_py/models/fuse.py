"""Projections that read the same input, merged into one weight after loading: one GEMM instead of several
(q/k/v; a SwiGLU MLP's gate/up; qwen2_moe's shared expert gate/up and its sigmoid gate).

Legend: T = tokens, D = hidden size, F = MLP width; Q, Kv = query and key/value projection widths.

At decode a layer's q, k and v projections (and a SwiGLU MLP's gate and up) are three (two) small
GEMMs of one row each, each a launch plus a pass over its weight; one GEMM over the stacked weight
reads the same bytes in one launch. The checkpoint keeps its own layout (the loader fills the
modules as transformers names them); ``fuse_projections`` then stacks, and sets the field each module
reads to take the fused path (its choice is made here, at load, never per call). Each output column is the same dot product as before, so results
change only where the GEMM library sums in another order (float32 on CUDA: last bits; the CPU path,
where the token-exactness tests run, is left unfused). MoE blocks on the fused-kernel path are
folded (``fold_moe``): the router and the shared expert's gate are one kernel, the shared expert
runs as more experts of the fused MoE kernels.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from dejavu_py.config import KernelConfig


def _linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    """A Linear over these tensors (no copy)."""
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    out.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        out.bias = nn.Parameter(bias, requires_grad=False)
    return out


def _stack(linears: list[nn.Linear]) -> nn.Linear:
    """One Linear whose output is the given ones' outputs side by side."""
    bias = torch.cat([lin.bias for lin in linears]) if linears[0].bias is not None else None
    return _linear(torch.cat([lin.weight for lin in linears]), bias)


def fuse_attention(attn: nn.Module) -> None:
    """q_proj, k_proj, v_proj -> qkv_proj [Q + 2 Kv, D]."""
    attn.qkv_proj = _stack([attn.q_proj, attn.k_proj, attn.v_proj])
    attn.qkv_split = [attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features]
    del attn.q_proj, attn.k_proj, attn.v_proj


def fuse_mlp(mlp: nn.Module) -> None:
    """gate_proj, up_proj -> gate_up_proj [2F, D]."""
    mlp.gate_up_proj = _stack([mlp.gate_proj, mlp.up_proj])
    mlp.fused = True
    del mlp.gate_proj, mlp.up_proj


def fuse_shared_gate(moe: nn.Module) -> None:
    """qwen2_moe: the shared expert's sigmoid gate [1, D] joins its gate/up projection as row 2F (then
    zero rows up to a multiple of 8, keeping the output rows aligned): its GEMV was two launches."""
    gate_up, sgate = moe.shared_expert.gate_up_proj, moe.shared_expert_gate
    rows = gate_up.out_features + 1
    pad = -rows % 8
    w = torch.cat([gate_up.weight, sgate.weight, sgate.weight.new_zeros(pad, sgate.in_features)])
    moe.shared_expert.gate_up_proj = _linear(w)
    moe.shared_gate_col = gate_up.out_features
    del moe.shared_expert_gate


def foldable(moe: nn.Module, kernels: KernelConfig) -> bool:
    """Whether an MoE block takes the folded path (``fold_moe``): folding not turned off (--no-fold-moe),
    its experts on CUDA (or the Triton interpreter), the fused kernels installed and not another expert
    kernel asked for (--moe-kernel), a shared expert (if any) a whole number of experts wide."""
    from dejavu_py.models import fused_moe

    w = moe.experts.gate_up_proj
    if not kernels.fold_moe or not fused_moe.available():
        return False
    if (not w.is_cuda and not fused_moe.interpreting()) or w.dtype not in fused_moe.DTYPES:
        return False
    if kernels.moe_kernel not in ("auto", "fused"):
        return False
    return not moe.has_shared or moe.shared_expert.down_proj.in_features % moe.experts.down_proj.shape[2] == 0


def fold_moe(moe: nn.Module) -> None:
    """The MoE block routes with one kernel and runs its shared expert as S more experts of the fused
    kernels (models/moe_router.py, fused_moe.py): the router's weight gains the shared gate's row
    [E + 1, D]; the expert stacks gain the shared expert's S = width / F chunks [E + S, 2F, D], [E + S, D, F]."""
    E, Fw = moe.experts.gate_up_proj.shape[0], moe.experts.down_proj.shape[2]
    router = moe.gate.weight
    moe.num_shared = 0
    if moe.has_shared:
        mlp = moe.shared_expert
        if not mlp.fused:
            fuse_mlp(mlp)
        gu, down = mlp.gate_up_proj.weight, mlp.down_proj.weight  # [2 S F, D], [D, S F]
        S = down.shape[1] // Fw
        gate, up = gu[: S * Fw].view(S, Fw, -1), gu[S * Fw:].view(S, Fw, -1)
        chunks_gu = torch.cat((gate, up), dim=1)  # [S, 2F, D]
        chunks_down = down.view(down.shape[0], S, Fw).transpose(0, 1)  # [S, D, F]
        ex = moe.experts
        ex.gate_up_proj = nn.Parameter(torch.cat((ex.gate_up_proj, chunks_gu)), requires_grad=False)
        ex.down_proj = nn.Parameter(torch.cat((ex.down_proj, chunks_down)), requires_grad=False)
        router = torch.cat((router, moe.shared_expert_gate.weight))
        moe.num_shared, moe.has_shared = S, False
        del moe.shared_expert, moe.shared_expert_gate
    moe.router_w_XD = router.contiguous()
    moe.gate.weight = nn.Parameter(moe.router_w_XD[:E], requires_grad=False)
    moe.folded = True


def fuse_projections(model: nn.Module, kernels: KernelConfig) -> int:
    """Fuse every attention's q/k/v and every dense SwiGLU MLP's gate/up (the shared expert's too), and
    fold the MoE blocks that can be (``foldable``); returns how many modules were fused."""
    from dejavu_py.models.attention import Attention
    from dejavu_py.models.layers import DenseMLP
    from dejavu_py.models.moe import SparseMoE

    n = 0
    for module in list(model.modules()):
        if isinstance(module, Attention) and module.qkv_split is None:
            fuse_attention(module)
            n += 1
        elif isinstance(module, DenseMLP) and not module.fused:
            fuse_mlp(module)
            n += 1
    for module in list(model.modules()):
        if isinstance(module, SparseMoE) and not module.folded and foldable(module, kernels):
            fold_moe(module)
        elif isinstance(module, SparseMoE) and module.has_shared and module.shared_gate_col is None:
            fuse_shared_gate(module)
    return n
