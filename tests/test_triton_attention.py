"""The paged decode-attention kernel (dejavu_py.models.triton_attention) against the eager gather + SDPA.

Runs in triton's interpreter on CPU (TRITON_INTERPRET=1, bf16 rounding to nearest as on the GPU). The
kernel reads K/V where the block tables put them, so the tests scatter each sequence over shuffled
blocks, mix decode rows with a prefill in one step, and cover GQA, tails shorter than a tile and
contexts split over several programs (merged by the second kernel).
"""
from __future__ import annotations

import pytest
import torch
from test_fused_moe import _round_bf16_to_nearest

from dejavu_py.config import KernelConfig
from dejavu_py.models import triton_attention
from dejavu_py.models.attn_meta import (
    SeqSlice,
    build_attn_meta,
    decode_meta,
    paged_attention,
)
from dejavu_py.models.kernels import choose

needs_triton = pytest.mark.skipif(not triton_attention.available(), reason="triton is not installed")
BS = 8  # block size


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _round_bf16_to_nearest(monkeypatch)


def _cache(blocks: int, K: int, Dh: int, dtype: torch.dtype, gen: torch.Generator):
    shape = (blocks * BS, K, Dh)
    return torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype)


def _tables(lens: list[int], blocks: int, gen: torch.Generator) -> list[list[int]]:
    """Each sequence on its own blocks, in a shuffled order (no two sequences share one)."""
    perm = torch.randperm(blocks, generator=gen).tolist()
    out = []
    for n in lens:
        need = -(-n // BS)
        out.append(perm[:need])
        perm = perm[need:]
    return out


def _both(q, k, v, meta, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel, eager) outputs of the same step: what a stage runs with and without --triton-ops."""
    on, off = (choose(KernelConfig(triton_ops=t), q.device, q.dtype) for t in (True, False))
    assert triton_attention.supports(q.device, q.dtype) and on.triton and not off.triton
    got = paged_attention(q, k, v, meta, scale, triton=on.triton)
    want = paged_attention(q, k, v, meta, scale, triton=off.triton)
    return got, want


def _tol(dtype: torch.dtype) -> dict:
    return dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


@needs_triton
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("H,K,lens", [
    (4, 4, [1, 9, 40]),  # one query head per KV head; a single position, a tile tail
    (4, 2, [33, 64]),  # GQA 2
    (8, 2, [17, 5, 70]),  # GQA 4
])
def test_decode_rows_match_eager(interpret, dtype, H, K, lens):
    gen = torch.Generator().manual_seed(H * 100 + sum(lens))
    Dh, blocks = 16, 40
    k, v = _cache(blocks, K, Dh, dtype, gen)
    tables = _tables(lens, blocks, gen)
    meta = build_attn_meta([SeqSlice(n - 1, 1, t) for n, t in zip(lens, tables)], BS)
    q = torch.randn(len(lens), H, Dh, generator=gen).to(dtype)
    got, want = _both(q, k, v, meta, Dh**-0.5)
    torch.testing.assert_close(got, want, **_tol(dtype))


@needs_triton
def test_decode_rows_beside_a_prefill(interpret):
    """Decode rows sit between prefill tokens: the kernel reads and writes only its rows."""
    gen = torch.Generator().manual_seed(5)
    H, K, Dh, blocks = 4, 2, 16, 30
    k, v = _cache(blocks, K, Dh, torch.float32, gen)
    tables = _tables([12, 20, 6], blocks, gen)
    slices = [SeqSlice(11, 1, tables[0]), SeqSlice(0, 20, tables[1]), SeqSlice(5, 1, tables[2])]
    meta = build_attn_meta(slices, BS)
    assert meta.decode_rows_B.tolist() == [0, 21]
    q = torch.randn(meta.num_tokens, H, Dh, generator=gen)
    got, want = _both(q, k, v, meta, 0.3)
    torch.testing.assert_close(got, want, **_tol(torch.float32))


@needs_triton
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_split_context_merges(interpret, dtype):
    """A wide static step (decode_meta, padded slot table) split over programs, then merged; rows whose
    length leaves whole splits empty merge only the splits they have."""
    gen = torch.Generator().manual_seed(9)
    H, K, Dh, W, blocks = 4, 2, 16, 768, 200
    lens = [700, 3]
    S = triton_attention.splits_for(len(lens), K, W, 8)
    assert S > 1
    k, v = _cache(blocks, K, Dh, dtype, gen)
    tables = _tables(lens, blocks, gen)
    M = W // BS
    tables_BM = torch.tensor([t + [blocks - 1] * (M - len(t)) for t in tables], dtype=torch.int32)
    meta = decode_meta(tables_BM, torch.tensor(lens, dtype=torch.int32), W, BS)
    q = torch.randn(len(lens), H, Dh, generator=gen).to(dtype)
    got, want = _both(q, k, v, meta, Dh**-0.5)
    torch.testing.assert_close(got, want, **_tol(dtype))


def test_splits_for():
    assert triton_attention.splits_for(64, 16, 4096, 132) == 1  # enough rows to fill the processors
    assert triton_attention.splits_for(1, 16, 64, 132) == 1  # short contexts are not split
    assert triton_attention.splits_for(1, 16, 256, 132) == 4  # at most width / 64
    assert triton_attention.splits_for(1, 16, 4096, 132) == 17  # 2 x 132 programs
    assert triton_attention.splits_for(2, 4, 1024, 132) == 16


def test_disabled_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not triton_attention.supports(torch.device("cpu"), torch.float32)


@pytest.mark.skipif(not (triton_attention.available() and torch.cuda.is_available()), reason="needs CUDA")
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("B,H,K,ctx", [(1, 16, 16, 192), (16, 16, 16, 192), (64, 16, 16, 250),
                                       (1, 16, 16, 3000), (2, 32, 4, 1500)])
def test_cuda_kernel_matches_eager(dtype, B, H, K, ctx):
    """On the GPU, at the real models' shapes (OLMoE's 16 x 128 heads, Qwen3's GQA 8), one split and many."""
    gen = torch.Generator().manual_seed(B * 7 + ctx)
    Dh, bs = 128, 16
    M = -(-ctx // bs)
    W = 1 << (M * bs - 1).bit_length()  # a power-of-2 graph width, as the decode buckets are
    blocks = B * M + 1
    k = torch.randn((blocks * bs, K, Dh), generator=gen).to(dtype).cuda()
    v = torch.randn((blocks * bs, K, Dh), generator=gen).to(dtype).cuda()
    perm = torch.randperm(blocks - 1, generator=gen)
    tables = [perm[i * M:(i + 1) * M].tolist() + [blocks - 1] * (W // bs - M) for i in range(B)]
    lens = torch.randint(max(1, ctx - 40), ctx + 1, (B,), generator=gen, dtype=torch.int32)
    meta = decode_meta(torch.tensor(tables, dtype=torch.int32).cuda(), lens.cuda(), W, bs)
    q = torch.randn(B, H, Dh, generator=gen).to(dtype).cuda()
    got, want = _both(q, k, v, meta, Dh**-0.5)
    torch.testing.assert_close(got, want, atol=1e-4 if dtype == torch.float32 else 2e-2, rtol=1e-3 if dtype == torch.float32 else 2e-2)
