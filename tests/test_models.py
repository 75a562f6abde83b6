"""Our stage models against transformers, for every supported family.

Checkpoints come from tools/make_checkpoint.py presets (random weights, float32). We compare prefill
logits, then greedy generation through the paged KV cache with three prompts batched in one step
sequence (prefills, a chunked prefill and decodes mixed in the same steps), as one stage and split
into 3 and 4 pipeline stages chained in-process.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from make_checkpoint import FAMILIES, make_checkpoint

from dejavu_py.models.attn_meta import SeqSlice, build_attn_meta
from dejavu_py.models.config import ModelConfig, load_model_config
from dejavu_py.models.kv_cache import CacheSpec, KVCache
from dejavu_py.models.loader import load_stage
from dejavu_py.models.model import StageModel
from dejavu_py.models.moe import expert_ffn
from dejavu_py.protocol.split import split_stages

MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
PROMPT_LENS = (7, 12, 4)
MAX_NEW = 16
BLOCK = 4

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """family -> checkpoint directory, written once per module."""
    root, made = tmp_path_factory.mktemp("ckpt"), {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = make_checkpoint(root / family, family=family, seed=1, tokenizer=False)
        return made[family]

    return get


@pytest.fixture(scope="module")
def hf():
    """checkpoint dir -> transformers model (float32 unless asked), loaded once."""
    cache: dict[tuple[Path, torch.dtype], torch.nn.Module] = {}

    def get(path: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        if (path, dtype) not in cache:
            cache[(path, dtype)] = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        return cache[(path, dtype)]

    return get


def prompts(cfg: ModelConfig) -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(3, cfg.vocab_size, (n,), generator=gen).tolist() for n in PROMPT_LENS]


def load_pipeline(
    path: Path, num_stages: int, dtype: torch.dtype = torch.float32
) -> tuple[ModelConfig, list[StageModel]]:
    cfg = load_model_config(path)
    return cfg, [load_stage(path, spec, dtype, "cpu") for spec in split_stages(cfg.num_layers, num_stages)]


def new_caches(cfg: ModelConfig, stages: list[StageModel], num_blocks: int, dtype: torch.dtype) -> list[KVCache]:
    spec = CacheSpec(num_blocks=num_blocks, block_size=BLOCK, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim)
    return [KVCache(spec, s.spec.layers, dtype, "cpu") for s in stages]


def run_pipeline(stages: list[StageModel], caches: list[KVCache], x: torch.Tensor, meta) -> torch.Tensor:
    """One step through the stages in order, as the pipeline would pass activations along."""
    with torch.no_grad():
        for stage, kv in zip(stages, caches, strict=True):
            x = stage(x, meta, kv)
    return x


def hf_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


# ---- (a) prefill logits --------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_logits_match_transformers(family, ckpt, hf):
    cfg, stages = load_pipeline(ckpt(family), 1)
    a, b, _ = prompts(cfg)
    caches = new_caches(cfg, stages, 16, torch.float32)
    # Two prompts packed in one step, with non-contiguous block tables; logits for every row.
    meta = build_attn_meta([SeqSlice(0, len(a), [5, 1]), SeqSlice(0, len(b), [0, 7, 3])], BLOCK)
    meta.logits_rows_S = torch.arange(len(a) + len(b))
    logits = run_pipeline(stages, caches, torch.tensor(a + b), meta)
    assert logits.dtype == torch.float32 and logits.shape == (len(a) + len(b), cfg.vocab_size)
    torch.testing.assert_close(logits[: len(a)], hf_logits(hf(ckpt(family)), a), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[len(a) :], hf_logits(hf(ckpt(family)), b), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_logits_bf16_match_transformers(family, ckpt, hf):
    """In bf16 the dtype of every intermediate matters (router weights, norms, rotary): today this is
    bitwise equal to transformers' default CPU path; the tolerance is far below one bf16 ulp."""
    cfg, stages = load_pipeline(ckpt(family), 2, torch.bfloat16)
    a = prompts(cfg)[1]
    caches = new_caches(cfg, stages, 8, torch.bfloat16)
    meta = build_attn_meta([SeqSlice(0, len(a), [2, 0, 1])], BLOCK)
    meta.logits_rows_S = torch.arange(len(a))
    logits = run_pipeline(stages, caches, torch.tensor(a), meta)
    torch.testing.assert_close(logits, hf_logits(hf(ckpt(family), torch.bfloat16), a), atol=1e-3, rtol=0)


# ---- (b), (c) batched greedy generation through the KV cache -------------------------------------


@dataclass
class Seq:
    prompt: list[int]
    table: list[int]
    chunk: int
    """Prompt tokens fed per step (a prompt longer than this is prefilled in chunks)."""
    start_step: int
    cached: int = 0
    out: list[int] = field(default_factory=list)
    done: bool = False

    def next_slice(self) -> tuple[list[int], SeqSlice]:
        if self.cached < len(self.prompt):
            toks = self.prompt[self.cached : self.cached + self.chunk]
            last = self.cached + len(toks) == len(self.prompt)
            return toks, SeqSlice(self.cached, len(toks), self.table, wants_logits=last)
        return [self.out[-1]], SeqSlice(self.cached, 1, self.table)


def generate_batched(stages: list[StageModel], cfg: ModelConfig, prompt_list: list[list[int]]) -> list[list[int]]:
    """Greedy decoding of all prompts together: prompt i joins at step i; the last one is prefilled in
    two chunks; every step packs the running sequences' prefills and decodes together."""
    need = max(math.ceil((len(p) + MAX_NEW) / BLOCK) for p in prompt_list)
    n = len(prompt_list)
    seqs = [
        Seq(p, [i + n * j for j in range(need)], chunk=len(p) if i < n - 1 else (len(p) + 1) // 2, start_step=i)
        for i, p in enumerate(prompt_list)
    ]
    caches = new_caches(cfg, stages, n * need, torch.float32)
    step = 0
    while not all(s.done for s in seqs):
        live = [s for s in seqs if s.start_step <= step and not s.done]
        parts = [s.next_slice() for s in live]
        meta = build_attn_meta([sl for _, sl in parts], BLOCK)
        logits = run_pipeline(stages, caches, torch.tensor([t for toks, _ in parts for t in toks]), meta)
        row = 0
        for s, (toks, sl) in zip(live, parts, strict=True):
            s.cached += len(toks)
            if sl.wants_logits:
                s.out.append(int(logits[row].argmax()))
                row += 1
                s.done = len(s.out) == MAX_NEW or s.out[-1] in cfg.eos_token_ids
        step += 1
    return [s.out for s in seqs]


_HF_GREEDY: dict[Path, list[list[int]]] = {}


def hf_greedy(model: torch.nn.Module, path: Path, prompt_list: list[list[int]]) -> list[list[int]]:
    if path not in _HF_GREEDY:
        outs = []
        for p in prompt_list:
            ids = torch.tensor([p])
            with torch.no_grad():
                full = model.generate(
                    ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=MAX_NEW, pad_token_id=0
                )
            outs.append(full[0, len(p) :].tolist())
        _HF_GREEDY[path] = outs
    return _HF_GREEDY[path]


@pytest.mark.parametrize("num_stages", [1, 3, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_transformers(family, num_stages, ckpt, hf):
    path = ckpt(family)
    cfg, stages = load_pipeline(path, num_stages)
    assert [s.spec.num_layers for s in stages] == {1: [4], 3: [1, 2, 1], 4: [1, 1, 1, 1]}[num_stages]
    prompt_list = prompts(cfg)
    ours = generate_batched(stages, cfg, prompt_list)
    ref = hf_greedy(hf(path), path, prompt_list)
    assert ours == ref
    assert all(len(o) == MAX_NEW or o[-1] in cfg.eos_token_ids for o in ours)


# ---- routing sink, experts, configuration details -------------------------------------------------


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_routing_sink_reports_topk_of_each_moe_layer(family, ckpt, hf):
    path = ckpt(family)
    cfg, stages = load_pipeline(path, 2)
    ids = prompts(cfg)[1]
    T, K = len(ids), cfg.num_experts_per_tok
    calls: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    for s in stages:
        s.routing_sink = lambda layer, i, w: calls.append((layer, i, w))
    meta = build_attn_meta([SeqSlice(0, T, [0, 1, 2])], BLOCK)
    run_pipeline(stages, new_caches(cfg, stages, 4, torch.float32), torch.tensor(ids), meta)
    moe_layers = [i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)]
    assert [c[0] for c in calls] == moe_layers
    if family == "qwen2_moe":
        assert 2 not in moe_layers  # the preset's mlp_only_layers
    with torch.no_grad():
        router_logits = hf(path)(torch.tensor([ids]), output_router_logits=True).router_logits
    moe_calls = dict((c[0], c[1:]) for c in calls)
    for n, layer in enumerate(moe_layers):
        topk_ids, topk_w = moe_calls[layer]
        assert topk_ids.dtype == torch.int64 and topk_ids.shape == (T, K)
        assert topk_w.dtype == torch.float32 and topk_w.shape == (T, K)
        assert bool((topk_w[:, :-1] >= topk_w[:, 1:]).all())
        if cfg.norm_topk_prob:
            torch.testing.assert_close(topk_w.sum(-1), torch.ones(T))
        probs = torch.softmax(router_logits[n].reshape(T, -1).float(), dim=-1)
        ref_w, ref_ids = torch.topk(probs, K, dim=-1)
        assert torch.equal(topk_ids, ref_ids)
        if not cfg.norm_topk_prob:
            torch.testing.assert_close(topk_w, ref_w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_ffn_grouped_path_matches_loop(dtype):
    """The torch grouped-GEMM path (used on CUDA) against the per-expert loop; torch also runs it on CPU."""
    from dejavu_py.models.kernels import GROUPED_MM

    if GROUPED_MM is None:
        pytest.skip("this torch has no grouped_mm")
    gen = torch.Generator().manual_seed(0)
    T, K, E, D, F = 13, 2, 6, 32, 16
    x = torch.randn(T, D, generator=gen).to(dtype)
    w_gu = (torch.randn(E, 2 * F, D, generator=gen) * 0.1).to(dtype)
    w_d = (torch.randn(E, D, F, generator=gen) * 0.1).to(dtype)
    ids = torch.stack([torch.randperm(E - 1, generator=gen)[:K] for _ in range(T)])  # expert E-1 gets no token
    w = torch.rand(T, K, generator=gen)
    loop = expert_ffn(x, ids, w, w_gu, w_d, kernel="loop")
    # Reference: the plain per-token definition.
    ref = torch.zeros(T, D)
    for t in range(T):
        for k in range(K):
            e = int(ids[t, k])
            g, u = (w_gu[e].float() @ x[t].float()).chunk(2)
            ref[t] += w[t, k] * (w_d[e].float() @ (torch.nn.functional.silu(g) * u))
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(loop.float(), ref, atol=tol, rtol=tol)
    try:
        grouped = expert_ffn(x, ids, w, w_gu, w_d, kernel="grouped")
    except (RuntimeError, NotImplementedError) as e:  # a torch build without a CPU kernel
        pytest.skip(f"grouped_mm not runnable on CPU here: {e}")
    torch.testing.assert_close(grouped.float(), loop.float(), atol=tol, rtol=tol)


def test_moe_layer_placement_and_fused_names(ckpt):
    cfg = load_model_config(ckpt("qwen2_moe"))
    assert [cfg.is_moe_layer(i) for i in range(4)] == [True, True, False, True]
    stage = StageModel(cfg, split_stages(4, 2)[1])
    names = dict(stage.named_parameters())
    assert "model.layers.2.mlp.gate_proj.weight" in names and "model.layers.1.input_layernorm.weight" not in names
    E, F, D = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
    assert names["model.layers.3.mlp.experts.gate_up_proj"].shape == (E, 2 * F, D)
    assert names["model.layers.3.mlp.experts.down_proj"].shape == (E, D, F)
    assert names["model.layers.3.mlp.gate.weight"].shape == (E, D)
    assert "model.layers.3.mlp.shared_expert_gate.weight" in names and "lm_head.weight" in names


LEGACY_ROPE = {
    "linear": ("llama", {"rope_theta": 50000.0, "rope_scaling": {"type": "linear", "factor": 2.0}}),
    "llama3": ("llama", {"rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}}),
    "yarn": ("qwen3", {"rope_theta": 1e6, "rope_scaling": {"type": "yarn", "factor": 4.0,
                                                          "original_max_position_embeddings": 64}}),
    "default": ("mixtral", {"rope_theta": 1000.0, "rope_scaling": None}),
}


@pytest.mark.parametrize("case", sorted(LEGACY_ROPE))
def test_legacy_rope_fields_match_transformers(case, ckpt, tmp_path):
    """Older config.json files: ``rope_theta`` + ``rope_scaling`` instead of ``rope_parameters``."""
    family, fields = LEGACY_ROPE[case]
    src = ckpt(family)
    for f in ("model.safetensors", "generation_config.json"):
        (tmp_path / f).symlink_to(src / f)
    raw = json.loads((src / "config.json").read_text())
    raw.pop("rope_parameters")
    raw.update(fields)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg, stages = load_pipeline(tmp_path, 1)
    assert cfg.rope.rope_type == case and cfg.rope.theta == fields["rope_theta"]
    ids = prompts(cfg)[1]
    meta = build_attn_meta([SeqSlice(0, len(ids), [0, 1, 2])], BLOCK)
    meta.logits_rows_S = torch.arange(len(ids))
    logits = run_pipeline(stages, new_caches(cfg, stages, 4, torch.float32), torch.tensor(ids), meta)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    torch.testing.assert_close(logits, hf_logits(ref, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe", "qwen3", "llama"])  # bias + shared expert, norms
def test_fused_projections_match(tmp_path, family):
    """q/k/v (and gate/up) stacked into one GEMM after loading (what a CUDA stage does): the same logits."""
    from make_checkpoint import make_checkpoint

    from dejavu_py.models.attn_meta import SeqSlice, build_attn_meta
    from dejavu_py.models.config import load_model_config
    from dejavu_py.config import KernelConfig
    from dejavu_py.models.fuse import fuse_projections
    from dejavu_py.models.kv_cache import CacheSpec, KVCache
    from dejavu_py.models.loader import load_stage
    from dejavu_py.protocol.split import split_stages

    path = make_checkpoint(tmp_path / family, family=family, seed=3, tokenizer=False)
    cfg = load_model_config(path)
    spec = split_stages(cfg.num_layers, 1)[0]
    ids = torch.randint(3, cfg.vocab_size, (7,), generator=torch.Generator().manual_seed(0))

    def logits(model) -> torch.Tensor:
        kv = KVCache(CacheSpec(4, 4, cfg.num_kv_heads, cfg.head_dim), spec.layers, torch.float32, "cpu")
        out = []
        with torch.no_grad():
            for start, n in ((0, 5), (5, 1), (6, 1)):  # a prefill, then two decode steps
                out.append(model(ids[start:start + n], build_attn_meta([SeqSlice(start, n, [2, 0])], 4), kv))
        return torch.cat(out)

    plain = load_stage(path, spec, torch.float32, "cpu")
    fused = load_stage(path, spec, torch.float32, "cpu")
    assert fuse_projections(fused, KernelConfig()) >= cfg.num_layers
    assert not any(n.endswith(("q_proj.weight", "gate_proj.weight")) for n, _ in fused.named_parameters())
    torch.testing.assert_close(logits(fused), logits(plain), atol=1e-5, rtol=1e-5)
