"""The Triton RMSNorm / add + RMSNorm / rotary ops (dejavu_py.models.triton_ops) against the eager code.

Kernels run on CPU in triton's interpreter (TRITON_INTERPRET=1 for this module's tests, bf16 casts
rounding to nearest as on the GPU: see test_fused_moe). Rotary is compared bit for bit. RMSNorm is
bit for bit where the order of the mean's sum cannot matter (inputs on a coarse grid, so every partial
sum is exact, and D a power of 2); on random data within 2 ulps, and in bf16 >99% identical.
"""
from __future__ import annotations

import pytest
import torch
from test_fused_moe import _round_bf16_to_nearest

from dejavu_py.config import KernelConfig
from dejavu_py.models import triton_ops
from dejavu_py.models.config import RopeConfig
from dejavu_py.models.kernels import choose
from dejavu_py.models.layers import RMSNorm, Rotary, apply_rotary, apply_rotary_qk

needs_triton = pytest.mark.skipif(not triton_ops.available(), reason="triton is not installed")
DTYPES = (torch.float32, torch.bfloat16)
EPS = 1e-5
NORM_SHAPES = ((1, 64), (5, 64), (5, 256), (1, 2048), (3, 4, 16), (5, 2, 128))  # [T, D] and per head [T, H, Dh]


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _round_bf16_to_nearest(monkeypatch)


def _eager_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    norm = RMSNorm(x.shape[-1], EPS).to(weight.dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
    dtype = x.dtype  # RMSNorm.forward's eager body, whatever its kernels say
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps)
    return norm.weight.detach() * h.to(dtype)


def _weight(D: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return (1 + 0.3 * torch.randn(D, generator=gen)).to(dtype)


def _grid(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Multiples of 1/8 in [-2, 2): squares are multiples of 1/64, their sums exact in any order."""
    return torch.randint(-16, 16, shape, generator=gen).float() / 8


def _assert_near(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal but for the mean's sum order: a 1-ulp step of rsqrt moves an output by at most 2 ulps.

    In bf16 that step rarely crosses a rounding boundary (>99% identical); in float32 it often shows.
    """
    assert got.dtype == want.dtype and got.shape == want.shape
    ulp = torch.finfo(want.dtype).eps * want.float().abs().clamp(min=1e-3)
    assert ((got.float() - want.float()).abs() <= 2 * ulp).all()
    if want.dtype != torch.float32:
        assert (got == want).float().mean() > 0.99


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES)
def test_rms_norm_bitwise_on_exact_sums(interpret, shape, dtype):
    gen = torch.Generator().manual_seed(len(shape) * 100 + shape[-1])
    x, w = _grid(shape, gen).to(dtype), _weight(shape[-1], dtype, gen)
    assert triton_ops.supports(x.device, x.dtype)
    torch.testing.assert_close(triton_ops.rms_norm(x, w, EPS), _eager_norm(x, w), atol=0, rtol=0)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES + ((5, 96),))  # 96: a masked row tail
def test_rms_norm_random(interpret, shape, dtype):
    gen = torch.Generator().manual_seed(shape[0] * 1000 + shape[-1])
    x, w = (3 * torch.randn(shape, generator=gen)).to(dtype), _weight(shape[-1], dtype, gen)
    _assert_near(triton_ops.rms_norm(x, w, EPS), _eager_norm(x, w))


@needs_triton
def test_rms_norm_mixed_dtypes(interpret):
    """bf16 rows with a float32 weight: y rounded to bf16, then the float32 product (torch's promotion)."""
    gen = torch.Generator().manual_seed(3)
    x, w = _grid((5, 64), gen).bfloat16(), _weight(64, torch.float32, gen)
    got = triton_ops.rms_norm(x, w, EPS)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, _eager_norm(x, w), atol=0, rtol=0)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ((1, 64), (5, 256), (2, 2048)))
def test_add_rms_norm(interpret, shape, dtype):
    gen = torch.Generator().manual_seed(shape[0] + shape[-1])
    D = shape[-1]
    w = _weight(D, dtype, gen)
    h, d = _grid(shape, gen).to(dtype), _grid(shape, gen).to(dtype)  # h + d stays on the 1/8 grid
    h_new, normed = triton_ops.add_rms_norm(h, d, w, EPS)
    torch.testing.assert_close(h_new, h + d, atol=0, rtol=0)
    torch.testing.assert_close(normed, _eager_norm(h + d, w), atol=0, rtol=0)
    h, d = torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype)
    h_new, normed = triton_ops.add_rms_norm(h, d, w, EPS)
    torch.testing.assert_close(h_new, h + d, atol=0, rtol=0)  # elementwise: always bitwise
    _assert_near(normed, _eager_norm(h + d, w))


def _qk_cos_sin(T: int, H: int, K: int, Dh: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(T, H, Dh, generator=gen).to(dtype)
    k = torch.randn(T, K, Dh, generator=gen).to(dtype)
    positions = torch.randint(0, 4096, (T,), generator=gen)
    cos, sin = Rotary(RopeConfig(theta=10000.0), Dh).cos_sin(positions, dtype)
    return q, k, cos, sin


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H,K,Dh", [(1, 4, 2, 64), (5, 4, 2, 64), (5, 16, 16, 128), (3, 3, 1, 24)])
def test_rotary_bitwise(interpret, T, H, K, Dh, dtype):
    q, k, cos, sin = _qk_cos_sin(T, H, K, Dh, dtype, seed=T * 7 + H + Dh)
    q_rot, k_rot = triton_ops.rotary(q, k, cos, sin)
    torch.testing.assert_close(q_rot, apply_rotary(q, cos, sin), atol=0, rtol=0)
    torch.testing.assert_close(k_rot, apply_rotary(k, cos, sin), atol=0, rtol=0)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_writes_the_cache(interpret, dtype):
    """With ``cache`` the launch also does ``KVCache.update``: rotated k and v (a strided view, as the fused
    q/k/v projection's split gives) at the slots, the other slots untouched."""
    T, H, K, Dh, N = 3, 4, 2, 16, 10
    q, k, cos, sin = _qk_cos_sin(T, H, K, Dh, dtype, seed=11)
    qkv = torch.randn(T, (H + 2 * K) * Dh, generator=torch.Generator().manual_seed(3)).to(dtype)
    v = qkv[:, (H + K) * Dh:].view(T, K, Dh)
    slots = torch.tensor([7, 2, 9])
    k_pool, v_pool = torch.full((N, K, Dh), -1.0, dtype=dtype), torch.full((N, K, Dh), -1.0, dtype=dtype)
    q_rot, k_rot = triton_ops.rotary(q, k, cos, sin, (k_pool, v_pool, slots, v))
    want_k, want_v = torch.full_like(k_pool, -1.0), torch.full_like(v_pool, -1.0)
    want_k[slots], want_v[slots] = apply_rotary(k, cos, sin), v
    torch.testing.assert_close(k_rot, apply_rotary(k, cos, sin), atol=0, rtol=0)
    torch.testing.assert_close(k_pool, want_k, atol=0, rtol=0)
    torch.testing.assert_close(v_pool, want_v, atol=0, rtol=0)


@needs_triton
def test_dispatch(interpret, monkeypatch):
    """The modules take the Triton path their stage chose (under the interpreter) and give what the eager
    path gives; --no-triton-ops chooses the eager path."""
    q, k, cos, sin = _qk_cos_sin(5, 4, 2, 32, torch.bfloat16, seed=1)
    norm = RMSNorm(32, EPS).bfloat16()
    x = _grid((5, 4, 32), torch.Generator().manual_seed(2)).bfloat16()
    on, off = (choose(KernelConfig(triton_ops=t), x.device, x.dtype) for t in (True, False))
    assert on.triton and not off.triton
    calls = _count_calls(monkeypatch)
    with torch.no_grad():
        norm.kernels = on
        fused = norm(x), apply_rotary_qk(q, k, cos, sin, on.triton)
        assert calls == {"rms_norm": 1, "rotary": 1}
        norm.kernels = off
        eager = norm(x), apply_rotary_qk(q, k, cos, sin, off.triton)
        assert calls == {"rms_norm": 1, "rotary": 1}
    torch.testing.assert_close(fused, eager, atol=0, rtol=0)


def test_disabled_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not triton_ops.supports(torch.device("cpu"), torch.float32)
    assert not choose(KernelConfig(), "cpu", torch.float32).triton


def _count_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count the calls of each triton_ops op from here on (the layers look them up on the module)."""
    calls: dict[str, int] = {}

    def counted(name: str, op):
        def call(*args):
            calls[name] = calls.get(name, 0) + 1
            return op(*args)

        return call

    for name in ("rms_norm", "add_rms_norm", "rotary"):
        monkeypatch.setattr(triton_ops, name, counted(name, getattr(triton_ops, name)))
    return calls


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", ["olmoe", "qwen3"])  # q/k norm over the projection, and per head
def test_stage_forward_matches_eager(interpret, monkeypatch, tmp_path, family, dtype):
    """A whole tiny model's prefill: the Triton path's logits equal the eager path's (to bf16 noise), each
    chosen when the stage loads (--triton-ops, the default, and --no-triton-ops)."""
    from make_checkpoint import make_checkpoint

    from dejavu_py.models.attn_meta import SeqSlice, build_attn_meta
    from dejavu_py.models.config import load_model_config
    from dejavu_py.models.kv_cache import CacheSpec, KVCache
    from dejavu_py.models.loader import load_stage
    from dejavu_py.protocol.split import split_stages

    path = make_checkpoint(tmp_path / family, family=family, seed=1, tokenizer=False)
    cfg = load_model_config(path)
    spec = split_stages(cfg.num_layers, 1)[0]
    ids = torch.randint(3, cfg.vocab_size, (6,), generator=torch.Generator().manual_seed(0))

    def logits(stage) -> torch.Tensor:
        kv = KVCache(CacheSpec(num_blocks=4, block_size=4, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim),
                     stage.spec.layers, dtype, "cpu")
        meta = build_attn_meta([SeqSlice(0, len(ids), [2, 0])], 4)
        meta.logits_rows_S = torch.arange(len(ids))
        with torch.no_grad():
            return stage(ids, meta, kv)

    calls = _count_calls(monkeypatch)
    fused = logits(load_stage(path, spec, dtype, "cpu"))
    L = cfg.num_layers  # per layer: input norm and q, k norms (one call each); add + norm; rotary; then the final norm
    assert calls == {"rms_norm": 3 * L + 1, "add_rms_norm": L, "rotary": L}, calls
    eager = logits(load_stage(path, spec, dtype, "cpu", KernelConfig(triton_ops=False)))
    assert calls == {"rms_norm": 3 * L + 1, "add_rms_norm": L, "rotary": L}, calls  # no Triton op since
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(fused, eager, atol=tol, rtol=tol)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(interpret, dtype):
    """silu(gate) * up from a fused gate/up output with extra columns after them (qwen2_moe's shared gate)."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(4)
    width = 1100  # two column blocks, a masked tail
    gu = (2 * torch.randn(3, 2 * width + 8, generator=gen)).to(dtype)
    want = F.silu(gu[:, :width]) * gu[:, width:2 * width]
    got = triton_ops.silu_mul(gu, width)
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=0, rtol=0)
    torch.testing.assert_close(got, want, **tol)
