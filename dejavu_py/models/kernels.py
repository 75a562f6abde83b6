"""Which implementation each op of a stage's forward runs, chosen once when the stage is loaded.

A stage's device and dtype are fixed when it loads, and so is what the run asked for (``KernelConfig``):
the choice between the Triton ops and torch's, and among the routed-expert paths, is made then
(``choose``) and installed on the modules (``StageModel.use_kernels``), which read a field per call
rather than testing the tensors, the environment or their own attributes.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dejavu_py.config import KernelConfig
from dejavu_py.models import fused_moe, triton_ops

GROUPED_MM: Callable[..., torch.Tensor] | None = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
"""torch's grouped GEMM, where this torch has one."""

MOE_KERNELS = ("fused", "grouped", "loop")


@dataclass(frozen=True, slots=True)
class Kernels:
    """The paths a stage's modules take."""

    triton: bool
    """Triton RMSNorm, residual add + norm, rotary (with the KV cache write), SwiGLU and decode attention."""
    moe: str
    """Routed experts: 'fused' (Triton), 'grouped' (torch's grouped GEMM) or 'loop' (one GEMM pair per expert)."""
    moe_align: str
    """How the fused MoE kernels group rows by expert: 'kernel' or 'torch'."""


EAGER = Kernels(triton=False, moe="loop", moe_align="kernel")
"""Torch's ops throughout: what a module does until a stage's choice is installed."""


def moe_kernel(device: torch.device | str, dtype: torch.dtype, requested: str) -> str:
    """The routed-expert path for a stage on ``device`` in ``dtype``: ``requested`` (one of MOE_KERNELS),
    or for 'auto' the fused kernels on CUDA with triton, torch's grouped GEMM on CUDA in bf16, else the loop."""
    if requested in MOE_KERNELS:
        return requested
    if requested != "auto":
        raise ValueError(f"moe kernel {requested!r}: expected one of {MOE_KERNELS} or auto")
    cuda = torch.device(device).type == "cuda"
    if cuda and fused_moe.available() and dtype in fused_moe.DTYPES:
        return "fused"
    return "grouped" if cuda and dtype == torch.bfloat16 and GROUPED_MM is not None else "loop"


def choose(cfg: KernelConfig, device: torch.device | str, dtype: torch.dtype) -> Kernels:
    """The paths of a stage on ``device`` in ``dtype`` under the run's kernel settings."""
    device = torch.device(device)
    return Kernels(
        triton=cfg.triton_ops and triton_ops.supports(device, dtype),
        moe=moe_kernel(device, dtype, cfg.moe_kernel),
        moe_align=cfg.moe_align,
    )
