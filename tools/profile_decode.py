#!/usr/bin/env python3
"""Where a decode step's time goes, in one process on one GPU: the floor the serving loop adds to.

    python tools/profile_decode.py --ckpt CKPT_DIR --out results/profile-decode.json

For each batch size B (contexts of --ctx tokens, every row its own blocks):
  graph_ms     one captured decode step replayed back to back (GPU time only, no host in the loop)
  runner_ms    StageRunner.step on the same plan, host work and the sampled ids read back included
  kernels      eager step under torch.profiler: CUDA time per kernel family (attention, moe, gemm, ...)
The gap between runner_ms and a served step's TPOT (tools/bench.py) is the serving loop's own cost.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dejavu_py.models.config import load_model_config  # noqa: E402
from dejavu_py.models.kv_cache import CacheSpec, KVCache  # noqa: E402
from dejavu_py.models.loader import load_stage  # noqa: E402
from dejavu_py.protocol.plan import SeqState, StepPlan  # noqa: E402
from dejavu_py.protocol.split import split_stages  # noqa: E402
from dejavu_py.stage.decode_graphs import DecodeGraphs  # noqa: E402
from dejavu_py.stage.runner import StageRunner  # noqa: E402

FAMILIES = (("attn", ("attn", "flash", "sdpa", "softmax", "fmha")), ("moe", ("fused_moe", "moe", "expert")),
            ("gemm", ("gemm", "gemv", "cutlass", "sm90", "nvjet", "splitk")), ("norm", ("norm", "rsqrt")),
            ("copy", ("copy", "index", "scatter", "gather", "cat")), ("topk", ("topk", "sort", "argmax")))


def family(name: str) -> str:
    low = name.lower()
    for fam, keys in FAMILIES:
        if any(k in low for k in keys):
            return fam
    return "other"


def plan_for(batch: int, ctx: int, block_size: int, step: int) -> tuple[StepPlan, dict[int, SeqState]]:
    blocks = -(-(ctx + 1) // block_size)
    states = {s: SeqState(list(range(s * blocks, (s + 1) * blocks)), 0.0, 1.0, 0, 0) for s in range(batch)}
    plan = StepPlan(mb=0, step=step, seq_ids=list(range(batch)), start_pos=[ctx] * batch, num_tokens=[1] * batch,
                    input_ids=[7] * batch, wants_token=[True] * batch, new_seqs=states)
    return plan, states


def first_stage(ckpt: Path, stages: int, dtype: torch.dtype, dev: torch.device, max_batch: int, ctx: int,
                block_size: int):
    """(spec, model, KV cache) of the first of ``stages`` stages, with blocks for ``max_batch`` rows of
    ``ctx`` tokens each (every row its own blocks, ``plan_for``)."""
    mcfg = load_model_config(ckpt)
    spec = split_stages(mcfg.num_layers, stages)[0]
    model = load_stage(ckpt, spec, dtype, dev)
    blocks = max_batch * -(-(ctx + 1) // block_size) + 8
    kv = KVCache(CacheSpec(blocks, block_size, mcfg.num_kv_heads, mcfg.head_dim), spec.layers, dtype, dev)
    return spec, model, kv


def time_graph(graphs: DecodeGraphs, tables, ctx_lens, x, iters: int) -> float:
    graphs.run(tables, ctx_lens, x)
    entry = graphs.graphs[graphs._last]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        entry[0].replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def time_runner(runner: StageRunner, batch: int, ctx: int, bs: int, iters: int) -> float:
    runner.step(plan_for(batch, ctx, bs, 1)[0], None)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(iters):
        runner.step(plan_for(batch, ctx, bs, 2 + i)[0], None)
    return (time.perf_counter() - t0) * 1000 / iters


def kernel_families(runner: StageRunner, batch: int, ctx: int, bs: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    graphs, runner.graphs = runner.graphs, None  # eager: the profiler sees every kernel
    try:
        runner.step(plan_for(batch, ctx, bs, 1)[0], None)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            runner.step(plan_for(batch, ctx, bs, 2)[0], None)
            torch.cuda.synchronize()
    finally:
        runner.graphs = graphs
    fams: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", 0.0) or getattr(ev, "cuda_time_total", 0.0)
        if t <= 0 or ev.key.startswith(("ProfilerStep", "aten::")):
            continue
        fams[family(ev.key)] += t / 1000
        counts[family(ev.key)] += ev.count
    top = sorted(((ev.key, (getattr(ev, "device_time_total", 0.0) or 0) / 1000, ev.count) for ev in prof.key_averages()
                  if not ev.key.startswith("aten::")), key=lambda r: -r[1])[:40]
    return {"ms": {k: round(v, 4) for k, v in fams.items()}, "launches": dict(counts),
            "top": [{"kernel": k[:120], "ms": round(ms, 4), "count": n} for k, ms, n in top]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, required=True, help="Hugging Face checkpoint directory")
    ap.add_argument("--batches", default="1,16,64", help="batch sizes, comma-separated")
    ap.add_argument("--ctx", type=int, default=192, help="tokens already in each row's cache")
    ap.add_argument("--iters", type=int, default=200, help="timed steps per measurement")
    ap.add_argument("--block-size", type=int, default=16, help="KV block size")
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    a = ap.parse_args()
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    batches = [int(b) for b in a.batches.split(",")]
    spec, model, kv = first_stage(a.ckpt, 1, torch.bfloat16, dev, max(batches), a.ctx, a.block_size)
    graphs = DecodeGraphs(model, kv, a.block_size, max(batches), 512, capture=True)
    runner = StageRunner(model, kv, spec, a.block_size, dev, graphs)
    rows = []
    for b in batches:
        plan, states = plan_for(b, a.ctx, a.block_size, 0)
        x = torch.full((b,), 7, dtype=torch.long, device=dev)
        row = {"batch": b, "ctx": a.ctx,
               "graph_ms": round(time_graph(graphs, [s.block_table for s in states.values()], [a.ctx + 1] * b, x, a.iters), 4),
               "runner_ms": round(time_runner(runner, b, a.ctx, a.block_size, a.iters), 4),
               "kernels": kernel_families(runner, b, a.ctx, a.block_size)}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "kernels"}), row["kernels"]["ms"], flush=True)
    doc = {"gpu": torch.cuda.get_device_name(dev), "model": str(a.ckpt.name), "rows": rows,
           "command": "python tools/profile_decode.py " + " ".join(sys.argv[1:])}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
