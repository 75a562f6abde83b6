"""CUDA: what a graph decode step hands fault tolerance on the host. Small steps copy their K/V and
routing right behind their kernels; large ones copy the K/V later, on the copy stream, when the next
step is launched (or when the worker flushes it: no step behind it). Either way the host copy must be the K/V the
step wrote into the cache (so the step also found its block tables, uploaded from pinned buffers taken
in turn), and the routing the one an eager run of the same steps records."""
from __future__ import annotations

import threading

import pytest
import torch
from make_checkpoint import make_checkpoint

from dejavu_py.models.config import load_model_config
from dejavu_py.models.kv_cache import CacheSpec, KVCache
from dejavu_py.models.loader import load_stage
from dejavu_py.protocol.plan import SeqState, StepPlan
from dejavu_py.protocol.split import split_stages
from dejavu_py.stage import runner as runner_mod
from dejavu_py.stage.decode_graphs import DecodeGraphs
from dejavu_py.stage.runner import StageRunner

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: the copy streams")
BS = 4
TABLES = {0: [0, 1, 2, 3, 4], 1: [5, 6, 7, 8, 9], 2: [10, 11, 12, 13, 14]}
STEPS = 12
"""More decode steps than ``UPLOAD_SLOTS``: the pinned buffers the block tables go up from come round again."""
PROMPTS = {0: [5, 9, 11, 3, 7], 1: [8, 2, 6], 2: [4, 4, 9, 10]}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ck") / "m", family="qwen3_moe", seed=5, tokenizer=False)


def runner_for(ckpt, graphs: bool) -> StageRunner:
    cfg = load_model_config(ckpt)
    spec = split_stages(cfg.num_layers, 1)[0]
    dev = torch.device("cuda")
    model = load_stage(ckpt, spec, torch.float32, dev)
    kv = KVCache(CacheSpec(20, BS, cfg.num_kv_heads, cfg.head_dim), spec.layers, torch.float32, dev)
    g = DecodeGraphs(model, kv, BS, 4, 32, capture=True, record=True) if graphs else None
    r = StageRunner(model, kv, spec, BS, dev, g)
    r.enable_recording()
    return r


def decode_steps(r: StageRunner, steps: int) -> list:
    """A prefill, then ``steps`` decode steps, each launched before the one before it is finished (as a
    worker running ahead does: its tokens are the sampled ids on the device); returns each decode step's
    plan and FT record."""
    sids = sorted(PROMPTS)
    first = StepPlan(0, 0, sids, [0] * 3, [len(PROMPTS[s]) for s in sids], [t for s in sids for t in PROMPTS[s]],
                     [True] * 3, new_seqs={s: SeqState(TABLES[s], 0.0, 1.0, 0, 0) for s in sids})
    r.step(first, None)
    out, prev = [], None
    for k in range(1, steps + 1):
        pos = [len(PROMPTS[s]) + k - 1 for s in sids]
        done = r.launch(StepPlan(0, k, sids, pos, [1] * 3, [-1, -2, -3], [True] * 3, follows=k - 1), None)
        if prev is not None:
            r.finish(prev)
            out.append((prev.plan, r.ft_record(prev)))
        prev = done
    r.finish(prev)
    last = r.ft_record(prev)
    if last.kv_ready is not None:  # no step was launched behind the last one: its copy waits for a flush
        assert not last.kv_ready.synchronize(timeout_s=0.05)
        r.flush_deferred_copies()
    return out + [(prev.plan, last)]


@pytest.mark.parametrize("deferred", [False, True], ids=["inline", "deferred"])
def test_graph_steps_hand_their_written_kv_and_routing_to_the_host(ckpt, monkeypatch, deferred):
    monkeypatch.setattr(runner_mod, "INLINE_COPY_BYTES", 0 if deferred else 1 << 40)
    r = runner_for(ckpt, graphs=True)
    recs = decode_steps(r, STEPS)
    eager = {plan.step: rec for plan, rec in decode_steps(runner_for(ckpt, graphs=False), STEPS)}
    torch.cuda.synchronize()
    assert len(recs) == STEPS and all(rec.step_kv is not None for _, rec in recs)
    assert all((rec.kv_ready is not None) == deferred for _, rec in recs)
    for plan, rec in recs:
        if rec.kv_ready is not None:
            rec.kv_ready.synchronize()
        idx = torch.tensor(rec.phys_slots, device="cuda")
        for i, layer in enumerate(r.kv.layers):
            assert torch.equal(rec.step_kv[0, i].cuda(), r.kv.k_NKD[layer][idx]), (plan.step, layer)
            assert torch.equal(rec.step_kv[1, i].cuda(), r.kv.v_NKD[layer][idx]), (plan.step, layer)
        want = eager[plan.step].routing
        assert rec.routing.layers == want.layers and (rec.routing.ids == want.ids).all(), plan.step
        assert abs(rec.routing.weights - want.weights).max() < 1e-5


def test_a_copy_asked_for_by_another_thread_goes_with_the_next_step(ckpt):
    """The replica sender's pieces of a prompt's KV: queued with the stage's next launch, not before."""
    r = runner_for(ckpt, graphs=True)
    src = torch.arange(1 << 16, dtype=torch.float32, device="cuda")
    dst = torch.zeros(1 << 16, dtype=torch.float32).pin_memory()
    asked: list = []
    t = threading.Thread(target=lambda: asked.append(r.defer_copy(src, dst)))
    t.start()
    t.join()
    assert not asked[0].synchronize(timeout_s=0.05)  # no step launched yet
    decode_steps(r, 1)
    assert asked[0].synchronize(timeout_s=10) and torch.equal(dst, src.cpu())
    again = r.defer_copy(src * 2, dst)
    r.flush_deferred_copies()  # no step coming: the worker flushes
    assert again.synchronize(timeout_s=10) and torch.equal(dst, (src * 2).cpu())
