"""The Triton fused-MoE path (dejavu_py.models.fused_moe) against the per-expert loop of ``expert_ffn``.

Kernels run on CPU in triton's interpreter: TRITON_INTERPRET=1 is set for this module only (triton
reads it when a kernel is decorated, and fused_moe jits its kernels per interpreter setting on first
use). Shapes stay small: the interpreter runs every program in numpy. Kernel tests skip without triton;
the alignment (pure torch) and the dispatch choice run everywhere.
"""
from __future__ import annotations

import pytest
import torch

from dejavu_py.models import fused_moe
from dejavu_py.config import KernelConfig
from dejavu_py.models.kernels import choose, moe_kernel
from dejavu_py.models.moe import expert_ffn

needs_triton = pytest.mark.skipif(not fused_moe.available(), reason="triton is not installed")

D, F = 48, 40  # not multiples of any block size
SMALL = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=1, num_stages=1)  # several N tiles and K steps
UNEVEN = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=1, num_stages=1)  # masked K tails in both GEMMs


@pytest.fixture(autouse=True)
def _interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _round_bf16_to_nearest(monkeypatch)


def _round_bf16_to_nearest(monkeypatch: pytest.MonkeyPatch) -> None:
    """The 3.6 interpreter casts float32 to bf16 by truncation; make it round to nearest even as the GPU does."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    builder = getattr(interpreter, "InterpreterBuilder", None)
    if builder is None or not hasattr(builder, "cast_impl") or not hasattr(interpreter, "TensorHandle"):
        return
    truncating = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), dst_type.scalar)
        return truncating(self, src, dst_type)

    monkeypatch.setattr(builder, "cast_impl", cast_impl)


def _routing(T: int, E: int, K: int, gen: torch.Generator, experts: list[int] | None = None):
    """(ids_TK int64, float32 weights_TK) as the Router makes them; ``experts`` restricts the choice."""
    logits_TE = torch.randn(T, E, generator=gen)
    if experts is not None:
        keep_E = torch.zeros(E, dtype=torch.bool)
        keep_E[experts] = True
        logits_TE = logits_TE.masked_fill(~keep_E, float("-inf"))
    weights_TK, ids_TK = torch.topk(torch.softmax(logits_TE, dim=-1), K, dim=-1)
    return ids_TK, weights_TK / weights_TK.sum(dim=-1, keepdim=True)


def _problem(T: int, E: int, K: int, dtype: torch.dtype, seed: int = 0, experts: list[int] | None = None):
    gen = torch.Generator().manual_seed(seed)
    x_TD = torch.randn(T, D, generator=gen).to(dtype)
    w_gu_EFD = (torch.randn(E, 2 * F, D, generator=gen) / D**0.5).to(dtype)
    w_d_EDF = (torch.randn(E, D, F, generator=gen) / F**0.5).to(dtype)
    ids_TK, weights_TK = _routing(T, E, K, gen, experts)
    return x_TD, ids_TK, weights_TK, w_gu_EFD, w_d_EDF


# (E, K, T): every E in {4, 8, 60}, K in {1, 2, 4, 8}, T in {1, 3, 17, 64}; A / E spans all pick_config rows
SHAPES = [(4, 1, 1), (4, 2, 3), (4, 4, 17), (4, 2, 64), (4, 4, 64), (8, 1, 17), (8, 2, 1), (8, 8, 3),
          (60, 4, 17), (60, 8, 1), (60, 8, 64)]


@needs_triton
@pytest.mark.parametrize("E,K,T", SHAPES)
def test_fused_matches_loop_float32(E: int, K: int, T: int) -> None:
    args = _problem(T, E, K, torch.float32)
    loop = expert_ffn(*args, kernel="loop")
    fused = fused_moe.fused_expert_ffn(*args)
    assert fused.dtype == torch.float32 and fused.shape == (T, D)
    torch.testing.assert_close(fused, loop, atol=1e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("config", [SMALL, UNEVEN], ids=["small", "uneven"])
@pytest.mark.parametrize("E,K,T", [(8, 2, 17), (60, 4, 3)])
def test_fused_block_configs_float32(E: int, K: int, T: int, config: dict[str, int]) -> None:
    """Tiles smaller than D and F: several N tiles, K loops with and without a masked tail."""
    args = _problem(T, E, K, torch.float32, seed=1)
    torch.testing.assert_close(
        fused_moe.fused_expert_ffn(*args, config=config), expert_ffn(*args, kernel="loop"), atol=1e-5, rtol=1e-5
    )


def _check_16bit(args: tuple, fused: torch.Tensor) -> None:
    """Within bf16/fp16 noise of the loop, and not much further from the float64 result than the loop is."""
    loop = expert_ffn(*args, kernel="loop")
    assert fused.dtype == loop.dtype
    torch.testing.assert_close(fused.float(), loop.float(), atol=4e-2, rtol=4e-2)
    x, ids, w, w_gu, w_d = args
    exact = expert_ffn(x.double(), ids, w.double(), w_gu.double(), w_d.double(), kernel="loop")
    err_fused = (fused.double() - exact).abs().max().item()
    err_loop = (loop.double() - exact).abs().max().item()
    assert err_fused <= 1.5 * err_loop + 2e-3, (err_fused, err_loop)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("E,K,T", [(8, 2, 3), (60, 8, 17), (4, 4, 64)])
def test_fused_matches_loop_16bit(E: int, K: int, T: int, dtype: torch.dtype) -> None:
    """qwen/olmoe: routing weights cast to the model dtype, so y * weight and the sum over k are 16-bit."""
    x, ids, w, w_gu, w_d = _problem(T, E, K, dtype, seed=2)
    args = (x, ids, w.to(dtype), w_gu, w_d)
    _check_16bit(args, fused_moe.fused_expert_ffn(*args))


@needs_triton
def test_float32_routing_weights_with_bf16_x() -> None:
    """mixtral: float32 weights, so y * weight and the sum over k run in float32, then cast to bf16."""
    args = _problem(17, 8, 2, torch.bfloat16, seed=3)
    assert args[2].dtype == torch.float32
    _check_16bit(args, fused_moe.fused_expert_ffn(*args))
    _check_16bit(args, fused_moe.fused_expert_ffn(*args, config=SMALL))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_without_tokens(dtype: torch.dtype) -> None:
    """Only experts 0, 3 and 7 of 8 get rows: empty experts own no block."""
    x, ids, w, w_gu, w_d = _problem(9, 8, 2, dtype, seed=4, experts=[0, 3, 7])
    assert set(ids.unique().tolist()) <= {0, 3, 7}
    args = (x, ids, w.to(dtype), w_gu, w_d)
    fused = fused_moe.fused_expert_ffn(*args, config=SMALL)
    if dtype == torch.float32:
        torch.testing.assert_close(fused, expert_ffn(*args, kernel="loop"), atol=1e-5, rtol=1e-5)
    else:
        _check_16bit(args, fused)


@needs_triton
def test_expert_ffn_dispatches_to_fused() -> None:
    """--moe-kernel fused runs the Triton path from expert_ffn, on CPU under the interpreter."""
    args = _problem(5, 8, 2, torch.float32, seed=5)
    kernels = choose(KernelConfig(moe_kernel="fused"), args[0].device, args[0].dtype)
    assert kernels.moe == "fused"
    torch.testing.assert_close(expert_ffn(*args, kernels.moe), expert_ffn(*args, kernel="loop"), atol=1e-5, rtol=1e-5)


@needs_triton
def test_fused_on_cpu_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fused_moe.fused_expert_ffn(*_problem(2, 4, 2, torch.float32))


def test_moe_kernel_choice() -> None:
    """Made once per stage from its device and dtype: auto is the loop on CPU; a named kernel is taken as asked."""
    cpu, f32 = torch.device("cpu"), torch.float32
    assert moe_kernel(cpu, f32, "auto") == "loop"
    assert moe_kernel(cpu, torch.bfloat16, "auto") == "loop"
    for name in ("fused", "grouped", "loop"):
        assert moe_kernel(cpu, f32, name) == name
        assert choose(KernelConfig(moe_kernel=name), cpu, f32).moe == name
    assert choose(KernelConfig(), cpu, f32).moe == "loop"
    with pytest.raises(ValueError):
        moe_kernel(cpu, f32, "bogus")


ALIGNERS = [
    pytest.param("torch", id="torch"),
    pytest.param("kernel", id="kernel", marks=needs_triton),
]
ALIGN_CASES = [(4, 2, 3, 16), (8, 8, 17, 16), (60, 4, 64, 16), (8, 2, 64, 32), (4, 1, 1, 64), (64, 8, 1, 16),
               (128, 8, 40, 16), (60, 8, 130, 64)]  # the last two: several chunks in the kernel's loops


def _align(aligner: str, ids_TK: torch.Tensor, E: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    fn = fused_moe.align_block_size if aligner == "torch" else fused_moe.align_block_size_kernel
    return fn(ids_TK, E, block_m)


@pytest.mark.parametrize("aligner", ALIGNERS)
@pytest.mark.parametrize("E,K,T,block_m", ALIGN_CASES)
def test_align_block_size(E: int, K: int, T: int, block_m: int, aligner: str) -> None:
    gen = torch.Generator().manual_seed(E * 100 + T)
    ids_TK, _ = _routing(T, E, K, gen, experts=list(range(0, E, 2)) if E > K * 2 else None)
    A = T * K
    rows_P, block_expert_B = _align(aligner, ids_TK, E, block_m)
    B = fused_moe.max_blocks(A, E, block_m)
    assert rows_P.dtype == block_expert_B.dtype == torch.int32
    assert rows_P.shape == (B * block_m,) and block_expert_B.shape == (B,)  # static: only T, K, E, BLOCK_M
    # every assignment exactly once, all other rows the dummy row A
    real_P = rows_P < A
    assert sorted(rows_P[real_P].tolist()) == list(range(A))
    assert (rows_P[~real_P] == A).all()
    # each real row lies in a block owned by its expert; blocks are in expert order, then the -1 sentinel
    ids_A = ids_TK.reshape(-1)
    block_of_P = torch.arange(B * block_m) // block_m
    assert (block_expert_B[block_of_P[real_P]].long() == ids_A[rows_P[real_P].long()]).all()
    used_B = block_expert_B >= 0
    n_used = int(used_B.sum())
    assert used_B[:n_used].all() and (block_expert_B[n_used:] == -1).all()
    assert (block_expert_B[:n_used].diff() >= 0).all()
    counts_E = torch.bincount(ids_A, minlength=E)
    assert (torch.bincount(block_expert_B[:n_used].long(), minlength=E) == (counts_E + block_m - 1) // block_m).all()
    # within an expert's group the rows keep assignment order (as the stable sort of expert_ffn)
    for e in range(E):
        rows_e = rows_P[(block_expert_B[block_of_P] == e) & real_P]
        assert rows_e.tolist() == torch.nonzero(ids_A == e).flatten().tolist()


@needs_triton
@pytest.mark.parametrize("E,K,T,block_m", ALIGN_CASES)
def test_align_kernel_equals_torch(E: int, K: int, T: int, block_m: int) -> None:
    ids_TK = torch.topk(torch.randn(T, E, generator=torch.Generator().manual_seed(T)), K).indices
    for got, want in zip(_align("kernel", ids_TK, E, block_m), _align("torch", ids_TK, E, block_m)):
        assert torch.equal(got, want)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_with_torch_alignment(dtype: torch.dtype) -> None:
    x, ids, w, w_gu, w_d = _problem(17, 8, 4, dtype, seed=6)
    args = (x, ids, w.to(dtype), w_gu, w_d)
    by_torch = fused_moe.fused_expert_ffn(*args, align="torch")
    assert torch.equal(by_torch, fused_moe.fused_expert_ffn(*args, align="kernel"))
