"""Self-attention over the paged KV cache, for every supported family.

Legend: T = tokens of the step, D = hidden size, H = query heads, K = KV heads, Dh = head dim,
N = KV cache slots. Family differences are configuration: q/k/v (and o) biases, q/k RMSNorm per
head (qwen3) or over the whole projection (olmoe), and olmoe's clip_qkv.
"""
from __future__ import annotations

import torch
from torch import nn

from dejavu_py.models import triton_ops
from dejavu_py.models.attn_meta import AttnMeta, paged_attention
from dejavu_py.models.config import ModelConfig
from dejavu_py.models.kernels import EAGER, Kernels
from dejavu_py.models.kv_cache import KVCache
from dejavu_py.models.layers import RMSNorm, apply_rotary_qk


class Attention(nn.Module):
    """``self_attn`` of one decoder layer; parameter names as in the Hugging Face checkpoints."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.qk_norm, self.clip_qkv = cfg.qk_norm, cfg.clip_qkv
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, q_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q_dim, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm == "head":
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        elif cfg.qk_norm == "proj":
            self.q_norm = RMSNorm(q_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(kv_dim, cfg.rms_norm_eps)
        self.qkv_split: list[int] | None = None
        """Set at load when q_proj, k_proj and v_proj became one ``qkv_proj`` (models/fuse.py): their widths."""
        self.kernels: Kernels = EAGER

    def _qkv(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Projections as [T, H|K, Dh], normalised and clipped as the family does, before RoPE."""
        T = x_TD.shape[0]
        if self.qkv_split is not None:
            q, k, v = self.qkv_proj(x_TD).split(self.qkv_split, dim=-1)
        else:
            q, k, v = self.q_proj(x_TD), self.k_proj(x_TD), self.v_proj(x_TD)
        if self.qk_norm == "proj":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(min=-self.clip_qkv, max=self.clip_qkv) for t in (q, k, v))
        q_THD = q.view(T, self.num_heads, self.head_dim)
        k_TKD = k.view(T, self.num_kv_heads, self.head_dim)
        v_TKD = v.view(T, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q_THD, k_TKD = self.q_norm(q_THD), self.k_norm(k_TKD)
        return q_THD, k_TKD, v_TKD

    def forward(
        self, x_TD: torch.Tensor, cos_TD: torch.Tensor, sin_TD: torch.Tensor, meta: AttnMeta, kv: KVCache
    ) -> torch.Tensor:
        q_THD, k_TKD, v_TKD = self._qkv(x_TD)
        k_NKD, v_NKD = kv.k_NKD[self.layer], kv.v_NKD[self.layer]
        triton = self.kernels.triton
        if triton and k_NKD.dtype == k_TKD.dtype and v_TKD.stride(1) == self.head_dim:
            cache = (k_NKD, v_NKD, meta.slots_T, v_TKD)  # RoPE writes the cache: no copy kernels of its own
            q_THD, k_TKD = triton_ops.rotary(q_THD, k_TKD, cos_TD, sin_TD, cache)
            k_NKD, v_NKD = kv.written(self.layer, meta.slots_T, k_TKD, v_TKD)
        else:
            q_THD, k_TKD = apply_rotary_qk(q_THD, k_TKD, cos_TD, sin_TD, triton)
            k_NKD, v_NKD = kv.update(self.layer, meta.slots_T, k_TKD, v_TKD)
        o_THD = paged_attention(q_THD, k_NKD, v_NKD, meta, self.scale, k_TKD, v_TKD, triton=triton)
        return self.o_proj(o_THD.reshape(x_TD.shape[0], -1))
