#!/usr/bin/env python3
"""Write a Hugging Face checkpoint directory with random weights, as a download would hold it.

Either a tiny preset per supported family (``--family olmoe``) or any real model's config.json
(``--config path/config.json``), optionally overridden (``--set num_hidden_layers=4``). Weights are
random from ``--seed`` and written by transformers' ``save_pretrained``: config.json,
generation_config.json, model.safetensors or shards with model.safetensors.index.json. Expert weights
are written per expert (what save_pretrained writes by default) or fused/stacked
(``--expert-layout fused``). A byte-level BPE tokenizer is trained offline and saved beside them,
padded with synthetic tokens to the model's whole vocab_size, special tokens at the config's ids.

    python tools/make_checkpoint.py --family qwen2_moe --out ckpt/qwen2_moe
    python tools/make_checkpoint.py --config olmoe/config.json --dtype bfloat16 --out ckpt/olmoe-1b-7b
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "llama", "qwen2", "qwen3")

_COMMON: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=384,
    max_position_embeddings=256,
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

# Tiny presets: real model types, small shapes, each exercising what its family does differently.
PRESETS: dict[str, dict[str, Any]] = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2, rope_theta=1e6),
    "qwen2_moe": dict(
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=96,
        decoder_sparse_step=1,
        mlp_only_layers=[2],
        norm_topk_prob=False,
        rope_theta=1e6,
    ),
    "qwen3_moe": dict(
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True, head_dim=32
    ),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, clip_qkv=None),
    "llama": dict(
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
        attention_bias=False,
    ),
    "qwen2": dict(tie_word_embeddings=True),
    "qwen3": dict(head_dim=32, rope_scaling=dict(rope_type="yarn", factor=2.0, original_max_position_embeddings=128)),
}

_CORPUS = (
    "The quick brown fox jumps over the lazy dog. A mixture of experts routes every token to a few experts.\n"
    "Pipeline parallelism splits the layers of a model into stages; each stage runs on its own worker.\n"
    "When a worker fails, the runtime replaces it and replays the steps that were lost, token by token.\n"
    "def add(a, b):\n    return a + b\n"
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Punctuation: , . ; : ! ? ( ) [ ] { } ' \" - _ / \\ \n"
)


def _log(msg: str) -> None:
    print(f"make_checkpoint: {msg}", file=sys.stderr, flush=True)


def build_config(family: str | None = None, config_path: Path | None = None, overrides: dict[str, Any] | None = None):
    """A transformers config from a preset family or a config.json, with overrides applied."""
    from transformers import AutoConfig

    overrides = dict(overrides or {})
    if config_path is not None:
        raw = json.loads(Path(config_path).read_text())
        raw.update(overrides)
        model_type = raw.pop("model_type", None)
        if model_type is None:
            raise SystemExit(f"error: {config_path}: no 'model_type' field")
        for k in ("architectures", "transformers_version", "_name_or_path", "auto_map"):
            raw.pop(k, None)
        return AutoConfig.for_model(model_type, **raw)
    if family not in PRESETS:
        raise SystemExit(f"error: --family {family!r}: choose one of {', '.join(FAMILIES)}")
    kw = {**_COMMON, **PRESETS[family], **overrides}
    return AutoConfig.for_model(family, **kw)


def _init_(model, seed: int, std: float, device: str = "cpu") -> None:
    """Random weights in place: matrices normal(0, std) as transformers does; norm weights 1 + N(0, 0.1)
    and biases N(0, 0.1) rather than exactly 1 and 0, so that a loader that skips them is caught."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    step = 1 << 24  # fill in float32 chunks: a big bf16 tensor never needs a full float32 copy
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.view(-1)
            base, scale = (1.0, 0.1) if p.dim() == 1 and not name.endswith("bias") else (0.0, 0.1 if p.dim() == 1 else std)
            for i in range(0, flat.numel(), step):
                n = min(step, flat.numel() - i)
                flat[i : i + n] = torch.randn(n, generator=gen, device=device).mul_(scale).add_(base).to(p.dtype)


_SPECIAL_NAMES = {"pad": "<pad>", "bos": "<s>", "eos": "</s>"}
_DEFAULT_SPECIAL_IDS = {"pad": 0, "bos": 1, "eos": 2}
"""Where the special tokens go when the config names no ids (the tiny presets' own ids)."""


def _ids_of(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def special_tokens(config) -> dict[int, str]:
    """Id -> text of the special tokens at the ids the config names (eos first: an id that is both
    bos and eos, as in several real configs, is the end-of-sequence token)."""
    vocab = int(config.vocab_size)
    named = {k: _ids_of(getattr(config, f"{k}_token_id", None)) for k in ("eos", "bos", "pad")}
    if not any(named.values()):
        named = {k: [i] for k, i in _DEFAULT_SPECIAL_IDS.items()}
    out: dict[int, str] = {}
    for kind, ids in named.items():
        for n, i in enumerate(ids):
            if not 0 <= i < vocab:
                raise SystemExit(f"error: {kind}_token_id {i} is outside vocab_size {vocab}; fix the config or --set it")
            out.setdefault(i, _SPECIAL_NAMES[kind] if n == 0 else f"<{kind}_{n}>")
    return out


def _trained_bpe(size: int, specials: list[str]):
    """A byte-level BPE trained offline on a small corpus: real merges, so text encodes sensibly."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return tok


def full_vocab(specials: dict[int, str], trained: list[str], size: int) -> dict[str, int]:
    """Exactly ``size`` distinct tokens: the specials at their ids, the trained tokens in their order
    in the free ids, then synthetic ``<tN>`` tokens (decodable, never produced by encoding) up to
    ``size``, so that every id the model can sample has text."""
    taken = set(specials.values())
    trained = [t for t in trained if t not in taken]
    if len(specials) + len(trained) > size:
        raise SystemExit(
            f"error: vocab_size {size} is too small for a byte-level tokenizer ({len(specials) + len(trained)} "
            "tokens); raise vocab_size or pass --no-tokenizer"
        )
    fill = iter(trained)
    vocab: dict[str, int] = {}
    for i in range(size):
        text = specials.get(i) or next(fill, None) or f"<t{i}>"
        if text in vocab:  # a trained token spelled like a synthetic one: keep ids distinct
            text = f"<t{i}_>"
        vocab[text] = i
    return vocab


def build_tokenizer(config, out_dir: Path) -> None:
    """Write a byte-level BPE tokenizer whose vocabulary has exactly the model's vocab_size tokens,
    with the special tokens at the config's ids: an output id the model samples always decodes."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    size = int(config.vocab_size)
    specials = special_tokens(config)
    base = _trained_bpe(min(size, 1024), [specials[i] for i in sorted(specials)])
    model = json.loads(base.to_str())["model"]
    trained = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab=full_vocab(specials, trained, size), merges=merges, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(specials[i], special=True) for i in sorted(specials)])
    names = {v: k for k, v in sorted(specials.items(), reverse=True)}
    roles = {f"{kind}_token": text for kind, text in _SPECIAL_NAMES.items() if text in names}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **roles)
    fast.save_pretrained(out_dir)
    _log(f"tokenizer: {tok.get_vocab_size(with_added_tokens=True)} tokens, specials {specials}")


def make_checkpoint(
    out_dir: Path | str,
    family: str | None = None,
    config_path: Path | str | None = None,
    overrides: dict[str, Any] | None = None,
    seed: int = 0,
    dtype: str = "float32",
    expert_layout: str = "per-expert",
    max_shard_size: str | None = None,
    tokenizer: bool = True,
    init_device: str = "cpu",
) -> Path:
    """Write the checkpoint and return its directory."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = build_config(family, Path(config_path) if config_path else None, overrides)
    torch_dtype = getattr(torch, dtype)
    t0 = time.time()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.to_empty(device=init_device)  # non-persistent buffers (rotary) are not saved, so need no values
    _init_(model, seed, float(getattr(config, "initializer_range", 0.02) or 0.02), init_device)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    n_params = sum(p.numel() for p in model.parameters())
    _log(f"{config.model_type}: {n_params / 1e6:.1f}M parameters initialised in {time.time() - t0:.1f}s")
    model.generation_config = GenerationConfig.from_model_config(config)
    kwargs: dict[str, Any] = {"save_original_format": expert_layout != "fused"}
    if max_shard_size:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(out, **kwargs)
    if tokenizer:
        build_tokenizer(config, out)
    del model  # a big model built on the GPU must not stay resident in the caller's process
    if init_device != "cpu":
        import gc

        gc.collect()
        torch.cuda.empty_cache()
    _log(f"wrote {out} in {time.time() - t0:.1f}s")
    return out


def _parse_set(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --set {item!r}: expected KEY=VALUE, e.g. num_hidden_layers=4")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--family", choices=FAMILIES, help="tiny preset of this model_type")
    src.add_argument("--config", type=Path, help="a real model's config.json to take the shapes from")
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field (JSON value)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weight dtype")
    p.add_argument(
        "--expert-layout",
        default="per-expert",
        choices=["per-expert", "fused"],
        help="per-expert keys (save_pretrained's default) or stacked gate_up_proj/down_proj tensors",
    )
    p.add_argument("--max-shard-size", default=None, help="write shards of at most this size, e.g. 200KB or 5GB")
    p.add_argument("--no-tokenizer", action="store_true", help="do not write a tokenizer")
    p.add_argument(
        "--init-device",
        default="cpu",
        help="where to draw the random weights: cpu, or cuda for big models (fast; other numbers than cpu)",
    )
    a = p.parse_args(argv)
    if a.config is not None and not a.config.is_file():
        raise SystemExit(f"error: --config {a.config}: no such file")
    make_checkpoint(
        a.out,
        family=a.family,
        config_path=a.config,
        overrides=_parse_set(a.set),
        seed=a.seed,
        dtype=a.dtype,
        expert_layout=a.expert_layout,
        max_shard_size=a.max_shard_size,
        tokenizer=not a.no_tokenizer,
        init_device=a.init_device,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
