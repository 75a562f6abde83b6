"""Building blocks shared by all families: RMSNorm, the gated dense MLP and rotary embeddings.

Legend: T = tokens of the step, D = hidden size, F = MLP width, R = head_dim / 2 rotary frequencies,
H = heads, Dh = head dim. The math follows transformers 5 exactly, including where it computes in
float32 (RMSNorm statistics, rotary cos/sin).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dejavu_py.models import triton_ops
from dejavu_py.models.config import RopeConfig
from dejavu_py.models.kernels import EAGER, Kernels


class RMSNorm(nn.Module):
    """``weight * x / rms(x)``, the statistics in float32, the product in the input dtype.

    With the Triton ops (``kernels.triton``, chosen at load) one launch with the same rounding steps; else
    eager torch.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.kernels: Kernels = EAGER

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels.triton:
            return triton_ops.rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class DenseMLP(nn.Module):
    """SwiGLU MLP: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden: int, width: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=bias)
        self.up_proj = nn.Linear(hidden, width, bias=bias)
        self.down_proj = nn.Linear(width, hidden, bias=bias)
        self.fused = False
        """gate_proj and up_proj are one ``gate_up_proj`` (set at load by models/fuse.py)."""
        self.kernels: Kernels = EAGER

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return self.down_fused(self.gate_up_proj(x_TD))
        return self.down_proj(F.silu(self.gate_proj(x_TD)) * self.up_proj(x_TD))

    def down_fused(self, gu_TX: torch.Tensor) -> torch.Tensor:
        """The MLP's output from its fused gate/up projection [T, >= 2F] (columns past 2F are not its own)."""
        width = self.down_proj.in_features
        if self.kernels.triton and gu_TX.dim() == 2:
            return self.down_proj(triton_ops.silu_mul(gu_TX, width))
        return self.down_proj(F.silu(gu_TX[..., :width]) * gu_TX[..., width:2 * width])


def _base_inv_freq(rope: RopeConfig, dim: int) -> torch.Tensor:
    return 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))  # [R]


def _llama3_inv_freq(rope: RopeConfig, dim: int) -> torch.Tensor:
    inv_freq = _base_inv_freq(rope, dim)
    old_len = rope.original_max_position_embeddings
    low_wavelen, high_wavelen = old_len / rope.low_freq_factor, old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    factor, base = rope.factor, rope.theta
    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = float(_yarn_mscale(factor, rope.mscale) / _yarn_mscale(factor, rope.mscale_all_dim))
        else:
            attention_factor = _yarn_mscale(factor)
    orig = rope.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: avoid a zero-width ramp
    pos_freqs = base ** (torch.arange(0, dim, 2, device="cpu").to(torch.float32) / dim)
    inv_extrapolation, inv_interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = inv_interpolation * (1 - extrapolation_weight) + inv_extrapolation * extrapolation_weight
    return inv_freq, float(attention_factor)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [R] (float32, CPU) and the cos/sin scale of a RoPE configuration."""
    if rope.rope_type == "default":
        return _base_inv_freq(rope, head_dim), 1.0
    if rope.rope_type == "linear":
        return _base_inv_freq(rope, head_dim) / rope.factor, 1.0
    if rope.rope_type == "llama3":
        return _llama3_inv_freq(rope, head_dim), 1.0
    if rope.rope_type == "yarn":
        return _yarn(rope, head_dim)
    raise ValueError(f"rope type {rope.rope_type!r} is not supported")


class Rotary:
    """cos/sin tables for the step's positions; not an nn.Module so that it survives meta-device builds."""

    def __init__(self, rope: RopeConfig, head_dim: int) -> None:
        self.inv_freq_R, self.scale = rope_inv_freq(rope, head_dim)

    def cos_sin(self, positions_T: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, Dh] in ``dtype``, computed in float32."""
        if self.inv_freq_R.device != positions_T.device:
            self.inv_freq_R = self.inv_freq_R.to(positions_T.device)
        freqs_TR = positions_T.to(torch.float32)[:, None] * self.inv_freq_R[None, :]
        emb_TD = torch.cat((freqs_TR, freqs_TR), dim=-1)
        return (emb_TD.cos() * self.scale).to(dtype), (emb_TD.sin() * self.scale).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x_THD: torch.Tensor, cos_TD: torch.Tensor, sin_TD: torch.Tensor) -> torch.Tensor:
    """Rotate query or key heads by their positions' angles."""
    cos, sin = cos_TD[:, None, :], sin_TD[:, None, :]
    return x_THD * cos + _rotate_half(x_THD) * sin


def apply_rotary_qk(
    q_THD: torch.Tensor, k_TKD: torch.Tensor, cos_TD: torch.Tensor, sin_TD: torch.Tensor, triton: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``apply_rotary`` of the queries and the keys: one Triton launch with ``triton`` (the stage's choice)."""
    if triton:
        return triton_ops.rotary(q_THD, k_TKD, cos_TD, sin_TD)
    return apply_rotary(q_THD, cos_TD, sin_TD), apply_rotary(k_TKD, cos_TD, sin_TD)
