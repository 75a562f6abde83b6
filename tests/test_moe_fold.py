"""The folded MoE block (models/fuse.py ``fold_moe``: one routing kernel, the shared expert as more
experts of the fused kernels) against the unfolded eager block of the same checkpoint.

Kernels run in triton's interpreter (TRITON_INTERPRET=1 for this module, bf16 casts rounding to nearest
as on the GPU, as in test_fused_moe). Float32: the same experts and outputs to the last bits of a sum's
order; bf16: the same experts, outputs within one bf16 rounding.
"""
from __future__ import annotations

import pytest
import torch

from dejavu_py.models import fused_moe, moe_router

pytestmark = pytest.mark.skipif(not fused_moe.available(), reason="triton is not installed")


@pytest.fixture(autouse=True)
def _interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    from test_fused_moe import _round_bf16_to_nearest

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _round_bf16_to_nearest(monkeypatch)


def _moe_blocks(tmp_path, family: str, dtype: torch.dtype):
    """(eager, folded) copies of layer 0's MoE block of a tiny checkpoint of ``family``."""
    from make_checkpoint import make_checkpoint

    from dejavu_py.config import KernelConfig
    from dejavu_py.models.config import load_model_config
    from dejavu_py.models.fuse import foldable, fuse_projections
    from dejavu_py.models.loader import load_stage
    from dejavu_py.protocol.split import split_stages

    path = make_checkpoint(tmp_path / family, family=family, seed=5, tokenizer=False)
    spec = split_stages(load_model_config(path).num_layers, 1)[0]
    eager = load_stage(path, spec, dtype, "cpu").model.layers["0"].mlp
    folded_model = load_stage(path, spec, dtype, "cpu")
    folded = folded_model.model.layers["0"].mlp
    assert foldable(folded, KernelConfig())
    assert not foldable(folded, KernelConfig(fold_moe=False)) and not foldable(folded, KernelConfig(moe_kernel="loop"))
    fuse_projections(folded_model, KernelConfig())  # on CPU under the interpreter: folds as a CUDA stage does
    assert folded.folded and hasattr(folded, "router_w_XD")
    assert not hasattr(folded, "shared_expert") and not folded.has_shared
    return eager, folded


@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe", "mixtral"])  # shared expert; 8 of 16; fp32 weights
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_folded_block_matches_eager(tmp_path, family: str, dtype: torch.dtype) -> None:
    eager, folded = _moe_blocks(tmp_path, family, dtype)
    x_TD = (torch.randn(6, eager.experts.gate_up_proj.shape[2], generator=torch.Generator().manual_seed(1))).to(dtype)
    seen: dict[str, list] = {"eager": [], "folded": []}
    with torch.no_grad():
        want = eager(x_TD, lambda layer, ids, w: seen["eager"].append((ids, w)))
        got = folded(x_TD, lambda layer, ids, w: seen["folded"].append((ids, w)))
    (ids_e, w_e), (ids_f, w_f) = seen["eager"][0], seen["folded"][0]
    assert torch.equal(ids_f, ids_e)  # the same experts, in the same order
    torch.testing.assert_close(w_f, w_e, atol=1e-6, rtol=1e-6)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=1.6e-2)


def test_forced_routing_replaces_the_routers_choice(tmp_path) -> None:
    """A replay forces recorded routing: the folded block uses it, the sink still sees the router's own."""
    eager, folded = _moe_blocks(tmp_path, "qwen2_moe", torch.float32)
    x_TD = torch.randn(3, eager.experts.gate_up_proj.shape[2], generator=torch.Generator().manual_seed(2))
    K = eager.gate.top_k
    forced = (torch.tensor([[0, 1]] * 3)[:, :K], torch.full((3, K), 0.5))
    seen: list = []
    with torch.no_grad():
        want = eager(x_TD, None, forced)
        got = folded(x_TD, lambda layer, ids, w: seen.append(ids.clone()), forced)
        own, _ = eager.gate(x_TD)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(seen[0], own)


def test_router_ties_go_to_the_lower_index() -> None:
    """Equal logits at the top-k boundary: the lower expert index wins (torch.topk leaves ties unspecified)."""
    E, K, D = 6, 2, 16
    w_XD = torch.zeros(E, D)
    w_XD[1, 0] = w_XD[3, 0] = w_XD[4, 0] = 1.0  # three experts tie for the top
    x_TD = torch.zeros(1, D)
    x_TD[0, 0] = 2.0
    ids_TJ, weights_TJ = moe_router.route(x_TD, w_XD, E, K)
    assert ids_TJ.tolist() == [[1, 3]]
    torch.testing.assert_close(weights_TJ[0, 0], weights_TJ[0, 1])
