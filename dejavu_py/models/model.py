"""The part of a decoder-only model that one pipeline stage runs.

Legend: T = tokens of the step (all sequences packed), D = hidden size, S = rows whose logits are
wanted, V = vocabulary. Parameter names equal the Hugging Face checkpoint names (``model.layers.7.
self_attn.q_proj.weight``), except routed experts, which are fused as transformers 5 holds them:
``model.layers.{i}.mlp.experts.gate_up_proj`` [E, 2F, D] and ``...mlp.experts.down_proj`` [E, D, F].
"""
from __future__ import annotations

import torch
from torch import nn

from dejavu_py.models import triton_ops
from dejavu_py.models.attention import Attention
from dejavu_py.models.attn_meta import AttnMeta
from dejavu_py.models.config import ModelConfig
from dejavu_py.models.kernels import EAGER, Kernels
from dejavu_py.models.kv_cache import KVCache
from dejavu_py.models.layers import DenseMLP, RMSNorm, Rotary
from dejavu_py.models.moe import Experts, RoutingSink, SparseMoE
from dejavu_py.protocol.split import StageSpec


class DecoderLayer(nn.Module):
    """Pre-norm residual block: attention, then a dense MLP or a sparse MoE block."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe_layer(layer)
        self.mlp: nn.Module = (
            SparseMoE(cfg, layer) if self.is_moe else DenseMLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)
        )
        self.kernels: Kernels = EAGER

    def forward(
        self,
        h_TD: torch.Tensor,
        cos_TD: torch.Tensor,
        sin_TD: torch.Tensor,
        meta: AttnMeta,
        kv: KVCache,
        sink: RoutingSink | None,
        forced: dict | None = None,
    ) -> torch.Tensor:
        a_TD = self.self_attn(self.input_layernorm(h_TD), cos_TD, sin_TD, meta, kv)
        h_TD, x_TD = self._residual_norm(h_TD, a_TD)
        if not self.is_moe:
            return h_TD + self.mlp(x_TD)
        return h_TD + self.mlp(x_TD, sink, forced.get(self.mlp.layer) if forced else None)

    def _residual_norm(self, h_TD: torch.Tensor, a_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h + attention out, post_attention_layernorm of it): one Triton launch when enabled."""
        norm = self.post_attention_layernorm
        if self.kernels.triton:
            return triton_ops.add_rms_norm(h_TD, a_TD, norm.weight, norm.eps)
        h_TD = h_TD + a_TD
        return h_TD, norm(h_TD)


class _Body(nn.Module):
    """The ``model.`` prefix: embedding, the owned layers (keyed by global index), final norm."""

    def __init__(self, cfg: ModelConfig, spec: StageSpec) -> None:
        super().__init__()
        if spec.has_embed:
            # _weight skips the random init (on the meta device it would import torch._refs, slow to import)
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, i) for i in spec.layers})
        if spec.has_head:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class StageModel(nn.Module):
    """One stage: ``model.embed_tokens`` (first stage), ``model.layers.{i}`` for its layers,
    ``model.norm`` and ``lm_head`` (last stage)."""

    def __init__(self, cfg: ModelConfig, spec: StageSpec) -> None:
        super().__init__()
        if spec.first_layer + spec.num_layers > cfg.num_layers:
            raise ValueError(f"stage {spec.index} owns layers {spec.layers}, the model has {cfg.num_layers}")
        self.cfg, self.spec = cfg, spec
        self.model = _Body(cfg, spec)
        if spec.has_head:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg.rope, cfg.head_dim)
        # When set, every MoE layer calls it with (layer, topk_ids_TK int64, topk_weights_TK float32).
        self.routing_sink: RoutingSink | None = None
        # When set ({layer: (ids_TK, weights_TK)}), MoE layers route as recorded (replaying a step).
        self.routing_override: dict | None = None

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def use_kernels(self, kernels: Kernels) -> None:
        """Every module of the stage takes the paths ``kernels`` names (chosen once at load: models/kernels.py)."""
        for module in self.modules():
            if isinstance(module, _CHOOSING):
                module.kernels = kernels

    def forward(self, x: torch.Tensor, meta: AttnMeta, kv: KVCache) -> torch.Tensor:
        """Token ids [T] (first stage) or hidden [T, D] -> hidden [T, D], or float32 logits [S, V] (last stage)."""
        h_TD = self.model.embed_tokens(x) if self.spec.has_embed else x
        cos_TD, sin_TD = self.rotary.cos_sin(meta.positions_T, h_TD.dtype)
        for layer in self.model.layers.values():
            h_TD = layer(h_TD, cos_TD, sin_TD, meta, kv, self.routing_sink, self.routing_override)
        if not self.spec.has_head:
            return h_TD
        h_SD = self.model.norm(h_TD[meta.logits_rows_S])
        return self.lm_head(h_SD).float()


_CHOOSING = (DecoderLayer, Attention, RMSNorm, DenseMLP, SparseMoE, Experts)
"""The modules whose forward takes a path of ``Kernels``."""
