"""The recovery data path, in one process: a stage's KV streamed to a replica that falls behind, a fresh
cache restored from the replica, the gap replayed from the plan ring: the KV must come back bit for
bit, routing must match the record, and a replayed step must not touch blocks its finished
sequences gave away."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from make_checkpoint import make_checkpoint

from dejavu_py.coordinator.replay import for_replay, replay_steps
from dejavu_py.models.config import load_model_config
from dejavu_py.models.kv_cache import CacheSpec, KVCache
from dejavu_py.models.loader import load_stage
from dejavu_py.protocol.plan import SeqState, StepPlan
from dejavu_py.protocol.replica import ReplicaChunk
from dejavu_py.protocol.split import split_stages
from dejavu_py.stage import replica_shm
from dejavu_py.stage.checkpoints import routing_mismatches
from dejavu_py.stage.decode_graphs import DecodeGraphs
from dejavu_py.stage.kv_restore import restore_into_cache
from dejavu_py.stage.replica_sender import ReplicaSender
from dejavu_py.stage.replica_store import ReplicaStore, covered_slots
from dejavu_py.stage.runner import StageRunner

BS = 4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ck") / "m", family="qwen3_moe", seed=9, tokenizer=False)


def runner_for(ckpt, static: bool = False) -> StageRunner:
    """``static``: decode steps take the bucketed path of the CUDA graphs (uncaptured here), replays
    included, with the step record (routing, new K/V) that fault tolerance reads."""
    cfg = load_model_config(ckpt)
    spec = split_stages(cfg.num_layers, 1)[0]
    model = load_stage(ckpt, spec, torch.float32, "cpu")
    kv = KVCache(CacheSpec(32, BS, cfg.num_kv_heads, cfg.head_dim), spec.layers, torch.float32, "cpu")
    # buckets 1, 2, 3: no padding rows, whose routing (by the router, on stale inputs) would change the
    # per-expert GEMM shapes of the CPU loop path and so the real rows' rounding
    graphs = DecodeGraphs(model, kv, BS, 3, 64, capture=False, record=True) if static else None
    r = StageRunner(model, kv, spec, BS, torch.device("cpu"), graphs)
    r.enable_recording()
    return r


def state(blocks: list[int]) -> SeqState:
    return SeqState(blocks, 0.0, 1.0, 0, 0)


def _send(store: ReplicaStore, shared: bool):
    def send(msg, kv) -> None:
        assert not shared, "a source writing into the holder's file sends nothing"
        assert msg.shm_path is None and kv is not None
        store.apply(msg, kv)
    return send


@pytest.mark.parametrize("shared", [False, True], ids=["bytes-over-edge", "shared-file+static"])
def test_restore_and_replay_give_back_the_exact_kv(ckpt, tmp_path, shared):
    """With a shared replica file the source writes its K/V into the holder's file itself (a separate
    mapping, as another process has) and the replacement reads it back from the file. That variant
    decodes on the bucketed static path: replica chunks come from the step record, and replays run
    in their bucket with their recorded routing."""
    a = runner_for(ckpt, static=shared)
    path = tmp_path / "replica.kv" if shared else None
    store = ReplicaStore("x", a.kv.layers, (32 + 1) * BS, a.kv.spec.num_kv_heads, a.kv.spec.head_dim, torch.float32, False, path)
    lagging = {"on": True}
    sender = ReplicaSender("x", a.kv, lag=100, send=_send(store, shared))
    if shared:
        sender.attach(replica_shm.attach(store.describe("holder")), str(store.path))
    tables = {0: [0, 1, 2], 1: [3, 4, 5], 2: [6, 7]}
    prompts = {0: [5, 9, 11, 3, 7], 1: [8, 2, 6], 2: [4, 4, 9, 10]}
    tokens = {s: list(p) for s, p in prompts.items()}
    history: dict[int, list[StepPlan]] = {0: []}
    step = 0

    def run(plan: StepPlan) -> None:
        res = a.step(plan, None)
        plan.routing = {"x": a.routing}
        if lagging["on"]:  # else the step's chunk is lost on its way (the source died before sending it)
            sender.chunk(plan.mb, plan.step, plan.seq_ids, plan.start_pos, plan.num_tokens, a.slots, written=a.step_kv)
            sender.flush()  # the sender thread has written it before the next step
        history[0].append(plan)
        for sid, tok in zip(res.seq_ids, res.token_ids):
            tokens[sid].append(tok)

    def plan_for(sids, new=()):
        nonlocal step
        step += 1
        start = [len(tokens[s]) - (len(prompts[s]) if s in new else 1) for s in sids]
        inputs = [t for s, st in zip(sids, start) for t in tokens[s][st:]]
        n = [len(tokens[s]) - st for s, st in zip(sids, start)]
        return StepPlan(0, step, list(sids), start, n, inputs, [True] * len(sids),
                        new_seqs={s: state(tables[s]) for s in new})

    run(plan_for([0, 1, 2], new=(0, 1, 2)))
    for _ in range(2):
        run(plan_for([0, 1, 2]))
    lagging["on"] = False  # from here on the replica misses every step
    for _ in range(2):
        run(plan_for([0, 1, 2]))
    # Sequence 2 finishes; a new sequence 3 takes its blocks and runs a step.
    done2 = plan_for([0, 1])
    done2.release = [2]
    run(done2)
    tables[3], prompts[3], tokens[3] = [6, 7], [1, 2, 3], [1, 2, 3]
    run(plan_for([0, 1, 3], new=(3,)))

    live = {0: len(tokens[0]) - 1, 1: len(tokens[1]) - 1, 3: len(tokens[3]) - 1}  # positions in the KV
    covered = store.coverage({s: tables[s] for s in live}, BS)
    assert all(covered[s] < live[s] for s in (0, 1))  # the replica really lags

    b = runner_for(ckpt, static=shared)  # the replacement: an empty cache
    b.seqs.update({s: state(tables[s]) for s in live})
    slots = covered_slots({s: tables[s] for s in live}, covered, BS)
    sids = sorted(live)
    chunk = ReplicaChunk("x", -1, -1, list(store.layers), sids, [0] * len(sids), [covered[s] for s in sids], slots)
    if shared:  # a replacement on the holder's host maps the file and copies the slots out of it
        restore_into_cache(b, dataclasses.replace(chunk, shm_path=str(store.path)), None)
    else:
        restore_into_cache(b, chunk, store.read(slots))
    plans, recompute = replay_steps(history, live, covered)
    assert not recompute and 0 < len(plans) <= len(history[0])
    assert any(for_replay(p, "x", set(live)).scratch_seqs for p in plans)  # a finished sequence is in there
    for p in plans:
        rp = for_replay(p, "x", set(live))
        b.step(rp, None)
        assert routing_mismatches(rp, b.routing) == 0
    for s, n in live.items():
        idx = torch.tensor([tables[s][q // BS] * BS + q % BS for q in range(n)])
        for layer in a.kv.layers:
            assert torch.equal(b.kv.k_NKD[layer][idx], a.kv.k_NKD[layer][idx]), (s, layer)
            assert torch.equal(b.kv.v_NKD[layer][idx], a.kv.v_NKD[layer][idx]), (s, layer)


def test_replay_steps_recomputes_what_the_ring_no_longer_has():
    mk = lambda step, sids, starts, ns: StepPlan(0, step, sids, starts, ns, [], [True] * len(sids))  # noqa: E731
    history = {0: [mk(5, [1, 2], [7, 3], [1, 1]), mk(6, [1, 2], [8, 4], [1, 1])], 1: [mk(7, [3], [0], [6])]}
    plans, recompute = replay_steps(history, need={1: 9, 2: 5, 3: 6}, covered={1: 8, 2: 2, 3: 6})
    assert [p.step for p in plans] == [6]  # seq 1 misses position 8 only
    assert recompute == {2}  # seq 2 misses position 2, written before the ring's first step
