#!/usr/bin/env python3
"""What fault tolerance costs one stage's thread per decode step, in one process on one GPU, without the
pipeline's noise: the host time of a step with FT's records off and on, side by side.

    python tools/bench_ft_step.py --ckpt CKPT_DIR --stages 2 --batches 1,16,64 --out results/ft-cost/step.json

The stage is the first of ``--stages`` (its share of the layers). For each batch size B (contexts of --ctx
tokens), the same decode step is run ``--iters`` times, in rounds that alternate the two modes, each step
launched before the one before it is finished (as a worker running ahead does):
  off   StageRunner.launch + finish (a graph step, as with --ft off)
  on    the same with records on (graphs that stack routing and K/V), plus what the worker does after
        the step: StageRunner.ft_record, the token-state checkpoint, and the K/V chunk handed to a replica
        sender that writes it into a replica file in --shm-dir (same host), with back-pressure
Each phase's host time per step is reported (microseconds, medians over the rounds), and the ratio of
the step's whole host time (on / off). A stage whose steps are host-bound (small batches) loses that
ratio of its throughput; the rest of a pipeline's FT cost (tools/bench_ft_cost.py) is interference.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_decode import first_stage, plan_for  # noqa: E402

from dejavu_py.models.kv_cache import KVCache  # noqa: E402
from dejavu_py.stage.checkpoints import TokenStateRing  # noqa: E402
from dejavu_py.stage.decode_graphs import DecodeGraphs  # noqa: E402
from dejavu_py.stage.replica_sender import ReplicaSender  # noqa: E402
from dejavu_py.stage.replica_store import ReplicaStore  # noqa: E402
from dejavu_py.stage.runner import StageRunner  # noqa: E402

PHASES = ("launch", "finish", "record", "checkpoint", "replica", "wait")


class Stage:
    """One stage's runner with records off or on; with them on, a checkpoint ring and a replica sender
    writing into a replica file, as ``ft.stage_ft.StageFT`` has them."""

    def __init__(self, model, kv: KVCache, spec, a, record: bool, shm_dir: Path) -> None:
        dev = kv.device
        self.graphs = DecodeGraphs(model, kv, a.block_size, max(a.batches), a.max_len, capture=True, record=record)
        self.runner = StageRunner(model, kv, spec, a.block_size, dev, self.graphs)
        self.ring = self.sender = None
        if record:
            self.runner.enable_recording()
            self.ring = TokenStateRing("all", 1, 100, model.cfg.num_experts or 0)
            store = ReplicaStore("s0", spec.layers, kv.k_NKD[spec.layers[0]].shape[0], kv.k_NKD[spec.layers[0]].shape[1],
                                 kv.k_NKD[spec.layers[0]].shape[2], model.dtype, True, shm_dir / "replica.kv")
            self.sender = ReplicaSender("s0", kv, a.lag, send=lambda m, t: None)
            self.sender.buffers = self.runner.host
            self.sender.defer_copy, self.sender.flush_deferred = self.runner.defer_copy, self.runner.flush_deferred_copies
            self.sender.attach(store.replica, str(store.path))
        self.graphs.capture_all()

    def run(self, plans: list, t: dict[str, float]) -> None:
        """Decode steps as a worker running ahead runs them: each launched before the one before it is
        finished, whose FT bookkeeping follows (``Worker.finish_through``, ``StageFT.bookkeep``); adds
        each phase's host seconds to ``t``."""
        pending = None
        for plan in [*plans, None]:
            t0 = time.perf_counter()
            if plan is not None:
                if self.sender is not None and not self.sender.wait_for(plan.mb, 10.0):
                    raise RuntimeError("the replica sender fell behind for 10 s")
                t1 = time.perf_counter()
                done = self.runner.launch(plan, None)
                t2 = time.perf_counter()
                t["wait"] += t1 - t0
                t["launch"] += t2 - t1
            else:
                done, t2 = None, time.perf_counter()
            if pending is not None:
                out = self.runner.finish(pending)
                t["finish"] += time.perf_counter() - t2
                self.keep(pending, out, t)
            pending = done

    def keep(self, done, out, t: dict[str, float]) -> None:
        if self.ring is None:
            return
        plan = done.plan
        t3 = time.perf_counter()
        rec = self.runner.ft_record(done)
        t4 = time.perf_counter()
        self.ring.record(plan.mb, plan.step, plan.seq_ids, out if isinstance(out, torch.Tensor) else None, rec.routing)
        t5 = time.perf_counter()
        self.sender.chunk(plan.mb, plan.step, plan.seq_ids, plan.start_pos, plan.num_tokens, rec.slots, rec.phys_slots,
                          rec.step_kv, rec.kv_ready)
        t6 = time.perf_counter()
        t["record"] += t4 - t3
        t["checkpoint"] += t5 - t4
        t["replica"] += t6 - t5


def measure(stage: Stage, batch: int, a, step0: int) -> dict[str, float]:
    """Host microseconds per step of each phase over ``a.iters`` steps (the device drained first)."""
    plan, _ = plan_for(batch, a.ctx, a.block_size, step0)
    stage.runner.step(plan, None)
    torch.cuda.synchronize()
    t = dict.fromkeys(PHASES, 0.0)
    stage.run([plan_for(batch, a.ctx, a.block_size, step0 + 1 + i)[0] for i in range(a.iters)], t)
    stage.runner.flush_deferred_copies()
    if stage.sender is not None:
        stage.sender.flush()
    torch.cuda.synchronize()
    return {k: v * 1e6 / a.iters for k, v in t.items()}


def kernels(stage: Stage, batch: int, a, step0: int, steps: int = 40) -> dict:
    """The device's work per step (torch.profiler over ``steps`` steps run as ``measure`` runs them): each
    kernel and copy's microseconds and count per step, largest first, and their sum."""
    from torch.profiler import ProfilerActivity, profile

    plans = [plan_for(batch, a.ctx, a.block_size, step0 + i)[0] for i in range(steps)]
    stage.run(plans[:4], dict.fromkeys(PHASES, 0.0))
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        stage.run(plans[4:], dict.fromkeys(PHASES, 0.0))
        stage.runner.flush_deferred_copies()
        torch.cuda.synchronize()
    n = steps - 4
    rows = sorted(((e.key, e.count / n, e.device_time_total / n) for e in prof.key_averages() if e.device_time_total > 0),
                  key=lambda r: -r[2])
    return {"device_us": round(sum(r[2] for r in rows), 1),
            "top": [[k[:90], round(c, 2), round(us, 2)] for k, c, us in rows[:25]]}


def bench(a) -> dict:
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    spec, model, kv = first_stage(a.ckpt, a.stages, getattr(torch, a.dtype), dev, max(a.batches), a.ctx, a.block_size)
    with tempfile.TemporaryDirectory(dir=a.shm_dir) as shm:
        stages = {"off": Stage(model, kv, spec, a, False, Path(shm)), "on": Stage(model, kv, spec, a, True, Path(shm))}
        rows = []
        for b in a.batches:
            rounds: dict[str, list[dict]] = {"off": [], "on": []}
            for r in range(a.rounds):
                for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
                    rounds[mode].append(measure(stages[mode], b, a, 1 + 10_000 * r))
            med = {m: {k: statistics.median(x[k] for x in rs) for k in PHASES} for m, rs in rounds.items()}
            total = {m: sum(v.values()) for m, v in med.items()}
            row = {"batch": b, "host_us": {m: {k: round(v, 1) for k, v in d.items()} for m, d in med.items()},
                   "step_host_us": {m: round(v, 1) for m, v in total.items()},
                   "ft_extra_us": round(total["on"] - total["off"], 1),
                   "ratio_on_off": round(total["on"] / total["off"], 3),
                   "rounds_total_us": {m: [round(sum(x.values()), 1) for x in rs] for m, rs in rounds.items()}}
            if a.kernels:
                row["kernels"] = {m: kernels(stages[m], b, a, 900_000 + 1_000 * len(rows)) for m in ("off", "on")}
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("batch", "step_host_us", "ft_extra_us", "ratio_on_off")}), flush=True)
    return {"gpu": torch.cuda.get_device_name(dev), "model": a.ckpt.name, "stages": a.stages, "stage_layers": len(spec.layers),
            "ctx": a.ctx, "iters": a.iters, "rounds": a.rounds, "lag": a.lag, "rows": rows,
            "command": "python tools/bench_ft_step.py " + " ".join(sys.argv[1:])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, required=True, help="Hugging Face checkpoint directory")
    ap.add_argument("--stages", type=int, default=2, help="the stage measured is the first of this many (default 2)")
    ap.add_argument("--batches", default="1,16,64", help="batch sizes, comma-separated (default 1,16,64)")
    ap.add_argument("--ctx", type=int, default=192, help="tokens already in each row's cache (default 192)")
    ap.add_argument("--max-len", type=int, default=512, help="longest context the graphs cover (default 512)")
    ap.add_argument("--iters", type=int, default=200, help="steps per round (default 200)")
    ap.add_argument("--rounds", type=int, default=6, help="rounds per mode, alternating (default 6)")
    ap.add_argument("--lag", type=int, default=8, help="replica lag in steps, as --replica-lag (default 8)")
    ap.add_argument("--block-size", type=int, default=16, help="KV block size (default 16)")
    ap.add_argument("--dtype", default="bfloat16", help="weights and compute (default bfloat16)")
    ap.add_argument("--shm-dir", default="/dev/shm", help="where the replica file goes (default /dev/shm)")
    ap.add_argument("--kernels", action="store_true",
                    help="also profile the device's kernels and copies per step in each mode (torch.profiler)")
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a GPU: on a CPU a stage's steps run eagerly and FT copies nothing to the host")
    a.batches = [int(b) for b in a.batches.split(",")]
    doc = bench(a)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
