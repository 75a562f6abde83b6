"""The safetensors loader and config reader: layouts, tied embeddings, errors, stage-local reads."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from make_checkpoint import make_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dejavu_py.models.loader as loader_mod
from dejavu_py.errors import CheckpointError
from dejavu_py.models.config import load_model_config
from dejavu_py.models.loader import load_stage
from dejavu_py.protocol.split import StageSpec, split_stages

pytest.importorskip("transformers")  # make_checkpoint writes with save_pretrained


def make(path: Path, family: str, **kw) -> Path:
    return make_checkpoint(path, family=family, seed=3, tokenizer=False, **kw)


def load_all(path: Path, num_stages: int) -> dict[str, torch.Tensor]:
    """Every stage's state dict merged (stages own disjoint parameter names)."""
    cfg = load_model_config(path)
    state: dict[str, torch.Tensor] = {}
    for spec in split_stages(cfg.num_layers, num_stages):
        state.update(load_stage(path, spec, torch.float32, "cpu").state_dict())
    return state


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def edit_config(path: Path, **fields) -> None:
    raw = json.loads((path / "config.json").read_text())
    raw.update(fields)
    (path / "config.json").write_text(json.dumps(raw))


def rewrite_single(path: Path, edit) -> None:
    """Rewrite model.safetensors after ``edit(dict of tensors)``."""
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """Names of the safetensors files the loader opens."""
    names: list[str] = []
    real = loader_mod.safe_open

    def counting(path, *a, **kw):
        names.append(Path(path).name)
        return real(path, *a, **kw)

    monkeypatch.setattr(loader_mod, "safe_open", counting)
    return names


# ---- layouts -------------------------------------------------------------------------------------


def test_sharded_checkpoint_equals_single_file(tmp_path, opened):
    single = make(tmp_path / "single", "qwen2_moe")
    sharded = make(tmp_path / "sharded", "qwen2_moe", max_shard_size="100KB")
    assert not (sharded / "model.safetensors").exists() and (sharded / "model.safetensors.index.json").exists()
    state: dict[str, torch.Tensor] = {}
    for spec in split_stages(4, 3):
        opened.clear()
        state.update(load_stage(sharded, spec, torch.float32, "cpu").state_dict())
        assert opened and len(opened) == len(set(opened))  # each shard opened at most once per load
    assert_same_state(state, load_all(single, 1))


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe"])
def test_fused_expert_layout_equals_per_expert(tmp_path, family):
    per_expert = make(tmp_path / "per", family)
    fused = make(tmp_path / "fused", family, expert_layout="fused")
    with safe_open(str(fused / "model.safetensors"), "pt") as f:
        assert "model.layers.0.mlp.experts.gate_up_proj" in set(f.keys())
    with safe_open(str(per_expert / "model.safetensors"), "pt") as f:
        assert not any(k.endswith("experts.gate_up_proj") for k in f.keys())
    assert_same_state(load_all(fused, 2), load_all(per_expert, 2))


def test_per_expert_tensors_stacked_gate_then_up(tmp_path):
    path = make(tmp_path / "m", "mixtral")
    stage = load_stage(path, split_stages(4, 2)[1], torch.float32, "cpu")
    raw = load_file(path / "model.safetensors")
    gate_up = stage.model.layers["3"].mlp.experts.gate_up_proj
    down = stage.model.layers["3"].mlp.experts.down_proj
    F = gate_up.shape[1] // 2
    p = "model.layers.3.block_sparse_moe"
    assert torch.equal(gate_up[5, :F], raw[f"{p}.experts.5.w1.weight"])
    assert torch.equal(gate_up[5, F:], raw[f"{p}.experts.5.w3.weight"])
    assert torch.equal(down[5], raw[f"{p}.experts.5.w2.weight"])
    assert torch.equal(stage.model.layers["3"].mlp.gate.weight, raw[f"{p}.gate.weight"])


def test_tied_embeddings(tmp_path):
    path = make(tmp_path / "q", "qwen2")
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    whole = load_stage(path, split_stages(4, 1)[0], torch.float32, "cpu")
    assert whole.lm_head.weight is whole.model.embed_tokens.weight
    last = load_stage(path, split_stages(4, 2)[1], torch.float32, "cpu")
    assert torch.equal(last.lm_head.weight, whole.model.embed_tokens.weight)


def test_dtype_conversion_and_config_fields(tmp_path):
    path = make(tmp_path / "o", "olmoe", dtype="bfloat16")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 50, 51]}))
    edit_config(path, eos_token_id=51)
    cfg = load_model_config(path)
    assert cfg.torch_dtype == "bfloat16" and cfg.eos_token_ids == (51, 2, 50)
    assert cfg.qk_norm == "proj" and cfg.num_experts == 8 and not cfg.norm_topk_prob
    stage = load_stage(path, split_stages(4, 2)[0], torch.float32, "cpu")
    assert {p.dtype for p in stage.parameters()} == {torch.float32}


# ---- errors --------------------------------------------------------------------------------------


def load_err(path: Path, spec: StageSpec | None = None) -> str:
    with pytest.raises(CheckpointError) as e:
        load_stage(path, spec or split_stages(4, 1)[0], torch.float32, "cpu")
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_tensor(tmp_path):
    path = make(tmp_path / "m", "qwen3_moe")
    key = "model.layers.1.mlp.experts.6.up_proj.weight"
    rewrite_single(path, lambda t: t.pop(key))
    msg = load_err(path)
    assert "model.safetensors" in msg and key in msg and "missing" in msg


def test_wrong_shape(tmp_path):
    path = make(tmp_path / "m", "llama")
    key = "model.layers.2.self_attn.k_proj.weight"
    rewrite_single(path, lambda t: t.__setitem__(key, torch.zeros(8, 64)))
    msg = load_err(path)
    assert "model.safetensors" in msg and key in msg and "[8, 64]" in msg and "expected [32, 64]" in msg


def test_missing_shard(tmp_path):
    path = make(tmp_path / "s", "mixtral", max_shard_size="100KB")
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    shard = weight_map["model.layers.1.self_attn.q_proj.weight"]
    (path / shard).unlink()
    msg = load_err(path)
    assert "model.safetensors.index.json" in msg and shard in msg and "does not exist" in msg


def test_corrupt_shard(tmp_path):
    path = make(tmp_path / "s", "mixtral", max_shard_size="100KB")
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    shard = weight_map["model.norm.weight"]
    data = (path / shard).read_bytes()
    (path / shard).write_bytes(data[: len(data) // 2])  # truncated
    msg = load_err(path)
    assert shard in msg and "safetensors" in msg and "needed for tensor" in msg


def test_corrupt_single_file(tmp_path):
    path = make(tmp_path / "m", "qwen2")
    (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a json header")
    msg = load_err(path)
    assert "model.safetensors" in msg and "not a readable safetensors file" in msg


def test_no_safetensors(tmp_path):
    path = make(tmp_path / "m", "qwen2")
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    msg = load_err(path)
    assert "no model.safetensors or model.safetensors.index.json" in msg and "pytorch_model.bin" in msg


def test_invalid_index(tmp_path):
    path = make(tmp_path / "s", "qwen2", max_shard_size="100KB")
    (path / "model.safetensors.index.json").write_text("{not json")
    assert "model.safetensors.index.json: invalid JSON" in load_err(path)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    assert "weight_map" in load_err(path)


def test_index_names_wrong_shard(tmp_path):
    path = make(tmp_path / "s", "llama", max_shard_size="100KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    key = "model.layers.0.mlp.up_proj.weight"
    other = next(f for k, f in index["weight_map"].items() if f != index["weight_map"][key])
    index["weight_map"][key] = other
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    msg = load_err(path)
    assert key in msg and other in msg


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported; supported: llama, mixtral, olmoe, qwen2, "
                                 "qwen2_moe, qwen3, qwen3_moe"),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
         "rope_parameters.rope_type 'dynamic' is not supported; supported: default, linear, llama3, yarn"),
        ({"rope_parameters": None, "rope_theta": 1e4, "rope_scaling": {"type": "longrope", "factor": 2.0}},
         "rope_scaling.type 'longrope' is not supported; supported: default, linear, llama3, yarn"),
        ({"hidden_size": None}, "missing required field 'hidden_size'"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        ({"use_sliding_window": True, "max_window_layers": 0, "layer_types": None},
         "sliding-window attention is not supported"),
        ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads 3"),
    ],
)
def test_config_errors(tmp_path, fields, expected):
    path = make(tmp_path / "q", "qwen2")
    edit_config(path, **fields)
    msg = load_err(path)
    assert msg.startswith(f"{path / 'config.json'}: ") and expected in msg


def test_config_file_errors(tmp_path):
    path = make(tmp_path / "q", "mixtral")
    edit_config(path, sliding_window=64)
    assert "sliding_window 64 < max_position_embeddings 256" in load_err(path)
    edit_config(path, sliding_window=4096)
    load_stage(path, split_stages(4, 1)[0], torch.float32, "cpu")  # a window beyond the context is no window
    (path / "config.json").write_text("{")
    assert "config.json: invalid JSON" in load_err(path)
    (path / "config.json").unlink()
    assert "config.json: no such file" in load_err(path)


def test_qwen2_sliding_window_flag_without_sliding_layers_is_fine(tmp_path):
    path = make(tmp_path / "q", "qwen3")
    edit_config(path, use_sliding_window=True, max_window_layers=28, layer_types=None)
    assert load_model_config(path).num_layers == 4


# ---- a stage reads only its own tensors ----------------------------------------------------------


def test_stage_reads_only_its_shards(tmp_path, opened):
    path = make(tmp_path / "s", "olmoe", max_shard_size="100KB")
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    first, second = split_stages(4, 2)
    owned = ("model.embed_tokens.", "model.layers.0.", "model.layers.1.")
    mine = {f for k, f in weight_map.items() if k.startswith(owned)}
    others = set(weight_map.values()) - mine
    assert others, "the shard size should leave some shards to the second stage only"
    for i, shard in enumerate(sorted(others)):
        if i % 2:
            (path / shard).unlink()
        else:
            (path / shard).write_bytes(b"garbage")
    opened.clear()
    stage = load_stage(path, first, torch.float32, "cpu")
    assert sorted(opened) == sorted(mine)
    assert "model.layers.2.input_layernorm.weight" not in stage.state_dict()
    msg = load_err(path, second)
    assert any(shard in msg for shard in others)


def test_stage_ignores_other_stages_tensors_in_single_file(tmp_path):
    path = make(tmp_path / "m", "qwen2_moe")
    gone = ["model.layers.3.mlp.experts.0.gate_proj.weight", "lm_head.weight", "model.norm.weight"]
    rewrite_single(path, lambda t: [t.pop(k) for k in gone])
    first, second = split_stages(4, 2)
    load_stage(path, first, torch.float32, "cpu")
    assert "model.layers.3.mlp.experts.0.gate_proj.weight" in load_err(path, second)


def test_stage_outside_model(tmp_path):
    path = make(tmp_path / "m", "llama")
    msg = load_err(path, StageSpec(index=1, num_stages=2, first_layer=3, num_layers=2))
    assert "num_hidden_layers is 4" in msg
