"""Model configuration read from a Hugging Face checkpoint's config.json (without importing transformers).

Each supported ``model_type`` keeps the defaults and quirks of its transformers 5 configuration class:
which projections carry biases, where q/k are normalised, how MoE layers are placed and routed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dejavu_py.errors import CheckpointError

SUPPORTED_MODEL_TYPES = ("llama", "mixtral", "olmoe", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe")
MOE_MODEL_TYPES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
SUPPORTED_ACTIVATIONS = ("silu", "swish")

# transformers' defaults for fields a config.json may leave out.
_DEFAULT_EPS = {"mixtral": 1e-5, "olmoe": 1e-5}
_DEFAULT_THETA = {"mixtral": 1e6}
_DEFAULT_MAX_POS = {"mixtral": 131072, "olmoe": 4096, "llama": 2048}


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding parameters (the ``rope_parameters`` of transformers 5)."""

    rope_type: str = "default"
    """One of ``SUPPORTED_ROPE_TYPES``."""
    theta: float = 10000.0
    """Base wavelength."""
    factor: float = 1.0
    """Context scaling factor (linear, llama3, yarn)."""
    original_max_position_embeddings: int = 0
    """Pre-training context length (llama3, yarn)."""
    low_freq_factor: float = 1.0
    """llama3: low-frequency boundary factor."""
    high_freq_factor: float = 4.0
    """llama3: high-frequency boundary factor."""
    attention_factor: float | None = None
    """yarn: cos/sin scale; None derives it from factor and mscale."""
    beta_fast: float = 32.0
    """yarn: extrapolation boundary of the linear ramp."""
    beta_slow: float = 1.0
    """yarn: interpolation boundary of the linear ramp."""
    mscale: float | None = None
    """yarn: numerator mscale of the attention factor."""
    mscale_all_dim: float | None = None
    """yarn: denominator mscale of the attention factor."""
    truncate: bool = True
    """yarn: round the correction range to whole dimensions."""

    def __post_init__(self) -> None:
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            supported = ", ".join(SUPPORTED_ROPE_TYPES)
            raise ValueError(f"rope type {self.rope_type!r} is not supported; supported: {supported}")
        if self.theta <= 0 or self.factor <= 0:
            raise ValueError(f"rope_theta and factor must be positive, got {self.theta} and {self.factor}")
        if self.rope_type in ("llama3", "yarn") and self.original_max_position_embeddings < 1:
            raise ValueError(f"rope type {self.rope_type} needs original_max_position_embeddings")


@dataclass(frozen=True)
class ModelConfig:
    """What the model code needs to know about a checkpoint."""

    model_type: str
    """Family, one of ``SUPPORTED_MODEL_TYPES``."""
    hidden_size: int
    """Residual stream width D."""
    intermediate_size: int
    """Width of the dense MLP (dense layers); 0 when no layer is dense."""
    num_layers: int
    """Decoder layers."""
    num_heads: int
    """Query heads H."""
    num_kv_heads: int
    """Key/value heads K (GQA: H is a multiple of K)."""
    head_dim: int
    """Per-head dimension (may differ from hidden_size / num_heads)."""
    vocab_size: int
    """Rows of the embedding and the LM head."""
    max_position_embeddings: int
    """Longest context the model was configured for."""
    rms_norm_eps: float
    """Epsilon of every RMSNorm."""
    rope: RopeConfig
    """Rotary embedding parameters."""
    eos_token_ids: tuple[int, ...]
    """End-of-sequence ids: config.json's and generation_config.json's together."""
    tie_word_embeddings: bool = False
    """The LM head reuses ``model.embed_tokens.weight``."""
    torch_dtype: str = "float32"
    """dtype the checkpoint was saved in (config ``dtype`` / ``torch_dtype``)."""
    qkv_bias: bool = False
    """q/k/v projections have biases."""
    o_bias: bool = False
    """The output projection has a bias."""
    mlp_bias: bool = False
    """Dense MLP projections have biases (llama ``mlp_bias``)."""
    qk_norm: str = "none"
    """``none``; ``head``: RMSNorm per head (qwen3); ``proj``: RMSNorm over the whole projection (olmoe)."""
    clip_qkv: float | None = None
    """Clamp q, k, v projections to +-clip_qkv (olmoe)."""
    num_experts: int = 0
    """Routed experts E per MoE layer; 0 for a dense model."""
    num_experts_per_tok: int = 0
    """Experts each token is routed to (top-k)."""
    moe_intermediate_size: int = 0
    """Width F of each routed expert."""
    norm_topk_prob: bool = False
    """Renormalise the top-k routing weights to sum to one."""
    router_weights_fp32: bool = False
    """Keep routing weights in float32 when scaling expert outputs (mixtral); else cast to model dtype."""
    shared_expert_intermediate_size: int = 0
    """Width of the sigmoid-gated shared expert (qwen2_moe); 0 when absent."""
    decoder_sparse_step: int = 1
    """Layer i is MoE when (i + 1) % step == 0 (and not in mlp_only_layers)."""
    mlp_only_layers: tuple[int, ...] = field(default=())
    """Layers forced to a dense MLP."""

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(_unsupported_type(self.model_type))
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads {self.num_heads} is not a multiple of num_key_value_heads {self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.qk_norm not in ("none", "head", "proj"):
            raise ValueError(f"qk_norm {self.qk_norm!r} must be none, head or proj")
        if self.decoder_sparse_step < 1:
            raise ValueError(f"decoder_sparse_step must be at least 1, got {self.decoder_sparse_step}")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            k, e = self.num_experts_per_tok, self.num_experts
            raise ValueError(f"num_experts_per_tok {k} must be in 1..num_experts {e}")
        if self.num_experts and self.moe_intermediate_size < 1:
            raise ValueError("MoE expert width (moe_intermediate_size / intermediate_size) must be positive")
        if any(not self.is_moe_layer(i) for i in range(self.num_layers)) and self.intermediate_size < 1:
            raise ValueError("intermediate_size must be positive when some layer has a dense MLP")

    @property
    def is_moe(self) -> bool:
        """Whether any layer routes tokens to experts."""
        return any(self.is_moe_layer(i) for i in range(self.num_layers))

    def is_moe_layer(self, i: int) -> bool:
        """Layer ``i`` has a sparse MoE block (else a dense MLP), as transformers decides it."""
        return self.num_experts > 0 and i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0


def _unsupported_type(model_type: str) -> str:
    return f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"


def _read_json(path: Path, required: bool) -> dict[str, Any] | None:
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path}: no such file; a checkpoint directory needs config.json")
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _ids(value: Any, path: Path) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise CheckpointError(f"{path}: eos_token_id {value!r} must be an integer or a list of integers")
    return values


class _Fields:
    """Typed access to config.json fields; errors name the file and the field."""

    def __init__(self, raw: dict[str, Any], path: Path) -> None:
        self.raw, self.path = raw, path

    def get(self, name: str, default: Any = None, kind: type | tuple[type, ...] = (int, float, bool, str)) -> Any:
        value = self.raw.get(name)
        if value is None:
            return default
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise CheckpointError(f"{self.path}: field '{name}' has value {value!r} of the wrong type")
        return value

    def need(self, *names: str, kind: type = int) -> Any:
        for name in names:
            if self.raw.get(name) is not None:
                return self.get(name, kind=kind)
        raise CheckpointError(f"{self.path}: missing required field '{names[0]}'")


def _rope_config(f: _Fields, model_type: str, max_pos: int) -> RopeConfig:
    """RoPE from ``rope_parameters`` (transformers 5) or ``rope_theta`` + ``rope_scaling`` (older files)."""
    field_name = "rope_scaling" if f.raw.get("rope_scaling") else "rope_parameters"
    params = f.raw.get(field_name) or {}
    if not isinstance(params, dict):
        raise CheckpointError(f"{f.path}: field '{field_name}' must be an object, found {params!r}")
    key = "rope_type" if "rope_type" in params else "type"
    rope_type = params.get(key, "default")
    if any(isinstance(v, dict) for v in params.values()):
        raise CheckpointError(f"{f.path}: per-layer-type '{field_name}' is not supported")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(
            f"{f.path}: {field_name}.{key} {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    partial = params.get("partial_rotary_factor", f.raw.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise CheckpointError(f"{f.path}: partial_rotary_factor {partial!r} is not supported (only 1.0)")
    theta = params.get("rope_theta", f.get("rope_theta", _DEFAULT_THETA.get(model_type, 10000.0), (int, float)))
    # transformers prefers a top-level original_max_position_embeddings (phi3 style) over the dict's
    orig = f.raw.get("original_max_position_embeddings") or params.get("original_max_position_embeddings") or max_pos
    factor = params.get("factor")
    if factor is None and rope_type == "yarn":
        factor = max_pos / orig
    if factor is None and rope_type in ("linear", "llama3"):
        raise CheckpointError(f"{f.path}: {field_name} of type {rope_type} needs 'factor'")
    kw: dict[str, Any] = dict(rope_type=rope_type, theta=float(theta), factor=float(factor or 1.0))
    kw["original_max_position_embeddings"] = int(orig)
    for name in ("low_freq_factor", "high_freq_factor", "attention_factor", "mscale", "mscale_all_dim"):
        if params.get(name) is not None:
            kw[name] = float(params[name])
    if rope_type == "llama3" and ("low_freq_factor" not in kw or "high_freq_factor" not in kw):
        raise CheckpointError(f"{f.path}: {field_name} of type llama3 needs low_freq_factor and high_freq_factor")
    kw["beta_fast"] = float(params.get("beta_fast") or 32)
    kw["beta_slow"] = float(params.get("beta_slow") or 1)
    kw["truncate"] = bool(params.get("truncate", True))
    return RopeConfig(**kw)


def _check_sliding_window(f: _Fields, model_type: str, num_layers: int, max_pos: int) -> None:
    """Sliding-window attention is not implemented: refuse checkpoints that actually use it."""
    window = f.get("sliding_window", None, int)
    if model_type == "mixtral":
        if window is not None and window < max_pos:
            raise CheckpointError(
                f"{f.path}: sliding_window {window} < max_position_embeddings {max_pos}: "
                "sliding-window attention is not supported"
            )
        return
    if not f.raw.get("use_sliding_window"):
        return
    layer_types = f.raw.get("layer_types")
    if layer_types is None:
        max_window = f.get("max_window_layers", 28, int)
        if model_type == "qwen2_moe":
            layer_types = ["sliding_attention" if (i + 1) % 2 and i < max_window else "full" for i in range(num_layers)]
        elif model_type in ("qwen2", "qwen3"):
            layer_types = ["sliding_attention" if i >= max_window else "full" for i in range(num_layers)]
        else:
            layer_types = ["sliding_attention"]
    if "sliding_attention" in layer_types:
        raise CheckpointError(f"{f.path}: use_sliding_window is true: sliding-window attention is not supported")


def _attention_fields(f: _Fields, model_type: str) -> dict[str, Any]:
    bias = bool(f.get("attention_bias", False))
    if model_type == "qwen2":
        qkv, o = True, False
    elif model_type == "qwen2_moe":
        qkv, o = bool(f.get("qkv_bias", True)), False
    elif model_type == "mixtral":
        qkv = o = False
    else:
        qkv = o = bias
    qk_norm = {"qwen3": "head", "qwen3_moe": "head", "olmoe": "proj"}.get(model_type, "none")
    clip = f.get("clip_qkv", None, (int, float)) if model_type == "olmoe" else None
    mlp_bias = bool(f.get("mlp_bias", False)) if model_type == "llama" else False
    return dict(qkv_bias=qkv, o_bias=o, qk_norm=qk_norm, clip_qkv=clip, mlp_bias=mlp_bias)


def _moe_fields(f: _Fields, model_type: str) -> dict[str, Any]:
    if model_type not in MOE_MODEL_TYPES:
        return {}
    kw: dict[str, Any] = dict(
        num_experts=f.need("num_experts", "num_local_experts"),
        num_experts_per_tok=f.need("num_experts_per_tok"),
        router_weights_fp32=model_type == "mixtral",
        norm_topk_prob=True if model_type == "mixtral" else bool(f.get("norm_topk_prob", False)),
    )
    if model_type in ("qwen2_moe", "qwen3_moe"):
        kw["moe_intermediate_size"] = f.need("moe_intermediate_size")
        kw["decoder_sparse_step"] = f.get("decoder_sparse_step", 1, int)
        kw["mlp_only_layers"] = tuple(f.get("mlp_only_layers", [], list))
    else:
        kw["moe_intermediate_size"] = f.need("intermediate_size")
    if model_type == "qwen2_moe":
        kw["shared_expert_intermediate_size"] = f.get("shared_expert_intermediate_size", 0, int)
    return kw


def _has_dense_layer(moe: dict[str, Any], num_layers: int) -> bool:
    """Whether some layer has a dense MLP (then intermediate_size is required)."""
    if not moe.get("num_experts"):
        return True
    skip, step = moe.get("mlp_only_layers", ()), moe.get("decoder_sparse_step", 1)
    return any(i in skip or (i + 1) % step for i in range(num_layers))


def _head_dim(f: _Fields, model_type: str, hidden: int, heads: int) -> int:
    if model_type == "qwen3":  # Qwen3Config.head_dim defaults to 128, not hidden / heads
        return f.get("head_dim", 128, int)
    return f.get("head_dim", None, int) or hidden // heads


def load_model_config(ckpt_dir: Path) -> ModelConfig:
    """Read and check ``ckpt_dir/config.json`` (and generation_config.json for EOS ids)."""
    path = Path(ckpt_dir) / "config.json"
    raw = _read_json(path, required=True)
    assert raw is not None
    f = _Fields(raw, path)
    model_type = f.need("model_type", kind=str)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"{path}: {_unsupported_type(model_type)}")
    act = f.get("hidden_act", "silu", str)
    if act not in SUPPORTED_ACTIVATIONS:
        raise CheckpointError(f"{path}: hidden_act {act!r} is not supported; supported: silu")
    hidden, heads = f.need("hidden_size"), f.need("num_attention_heads")
    num_layers = f.need("num_hidden_layers")
    max_pos = f.get("max_position_embeddings", _DEFAULT_MAX_POS.get(model_type, 32768), int)
    _check_sliding_window(f, model_type, num_layers, max_pos)
    moe = _moe_fields(f, model_type)
    gen = _read_json(Path(ckpt_dir) / "generation_config.json", required=False) or {}
    eos = _ids(raw.get("eos_token_id"), path) + _ids(gen.get("eos_token_id"), path.with_name("generation_config.json"))
    dense = _has_dense_layer(moe, num_layers)
    dense_width = f.need("intermediate_size") if dense else f.get("intermediate_size", 0, int)
    try:
        return ModelConfig(
            model_type=model_type,
            hidden_size=hidden,
            intermediate_size=dense_width,
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=f.get("num_key_value_heads", heads, int),
            head_dim=_head_dim(f, model_type, hidden, heads),
            vocab_size=f.need("vocab_size"),
            max_position_embeddings=max_pos,
            rms_norm_eps=float(f.get("rms_norm_eps", _DEFAULT_EPS.get(model_type, 1e-6), (int, float))),
            rope=_rope_config(f, model_type, max_pos),
            eos_token_ids=tuple(dict.fromkeys(eos)),
            tie_word_embeddings=bool(f.get("tie_word_embeddings", False)),
            torch_dtype=str(raw.get("dtype") or raw.get("torch_dtype") or "float32"),
            **_attention_fields(f, model_type),
            **moe,
        )
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
