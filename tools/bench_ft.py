#!/usr/bin/env python3
"""What fault tolerance costs and what it saves: one workload, four runs.

    # CPU, tiny checkpoint (about a minute):
    python tools/bench_ft.py --family qwen2_moe --nproc 3 --n 48 --rate 12 --scale 0.03 \\
        --max-prompt 48 --max-output 24 --mtbf 2.5 --faults 2 --out results/bench-ft/cpu.json
    # GPU, real shapes:
    python tools/bench_ft.py --model-config configs/models/olmoe-1b-7b.json --ckpt /dev/shm/olmoe \\
        --device cuda --nproc 2 --n 200 --rate 8 --max-prompt 512 --max-output 128 --mtbf 8 --faults 2 \\
        --out results/bench-ft/olmoe-1b-7b.json --dejavu-arg=--max-batch-size=64

The workload is tools/bench_serve.py's open-loop trace (Poisson arrivals at --rate, prompt and output
lengths log-normal as fitted there to a public chat trace). The same trace runs four times:
  ft-off           --ft off, no faults: the baseline speed
  ft-off+faults    --ft off with the fault schedule: each kill ends the attempt, torchrun restarts the
                   job (--max-restarts) and it resumes from the journal, recomputing what was in flight
  ft-on            --ft on (replicas, checkpoints), no faults: what fault tolerance costs
  ft-on+faults     --ft on with the same schedule: only the killed stage is replaced
Faults come from tools/inject_fault.py: SIGKILL of a decode stage at exponential gaps (--mtbf, from
--seed), --faults of them. Reported per run: throughput over the whole run (generated tokens / seconds
from launch to the end, restarts included) and over serving, request latency, TTFT and TPOT p50/p99,
each recovery's phases, tokens recomputed, and requests lost (must be 0). Writes --out (JSON), a
Markdown table beside it and a PNG: tokens/s over time, the four runs overlaid, faults marked.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from bench_serve import BenchError, ensure_checkpoint, make_trace, metrics  # noqa: E402
from plotting import save_plot  # noqa: E402

RUNS = (("ft-off", "off", False), ("ft-off+faults", "off", True), ("ft-on", "on", False), ("ft-on+faults", "on", True))


def _env(a) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if a.device == "cpu":
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_one(name: str, ft: str, faults: bool, a, ckpt: Path, req: Path) -> dict:
    run_dir = a.work / name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={a.nproc}",
           f"--max-restarts={a.faults if ft == 'off' and faults else 0}", "--monitor-interval=0.1", "-m", "dejavu_py",
           "--model", str(ckpt), "--prompts", str(req), "--run-dir", str(run_dir), "--device", a.device,
           "--dtype", a.dtype, "--ignore-eos", "--no-progress", "--ft", ft, *a.dejavu_args, *(a.ft_on_args if ft == "on" else [])]
    t0 = time.time()
    console = open(run_dir / "console.txt", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(a), stdout=console, stderr=subprocess.STDOUT)
    injector = None
    if faults:
        while not (run_dir / "workers.json").exists() and proc.poll() is None:
            time.sleep(0.02)
        injector = subprocess.Popen([sys.executable, str(ROOT / "tools/inject_fault.py"), "--run-dir", str(run_dir),
                                     "--role", a.role, "--mtbf", str(a.mtbf), "--count", str(a.faults),
                                     "--seed", str(a.seed), "--signal", "kill"], cwd=ROOT, env=_env(a))
    try:
        code = proc.wait(timeout=a.timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise BenchError(f"{name} exceeded --timeout {a.timeout:g}s") from None
    wall = time.time() - t0
    if injector is not None:
        injector.wait(timeout=60)
    if code != 0:
        tail = (run_dir / "console.txt").read_text().strip().splitlines()[-3:]
        raise BenchError(f"{name} failed (exit {code}): {' | '.join(tail)}")
    return collect(name, run_dir, t0, wall)


def collect(name: str, run_dir: Path, t0: float, wall: float) -> dict:
    outs = [json.loads(x) for x in (run_dir / "outputs.jsonl").read_text().splitlines() if x.strip()]
    res = metrics(outs, json.loads((run_dir / "summary.json").read_text()))
    res.pop("samples", None)
    res["wall_s"] = wall
    res["throughput_wall_tok_s"] = res["output_tokens"] / wall
    res["requests_lost"] = res["failed"]
    res["faults"] = _jsonl(run_dir / "faults.jsonl")
    res["recoveries"] = _jsonl(run_dir / "recoveries.jsonl")
    res["timeline"] = [[t - t0, tok] for t, tok in _timeline(run_dir)]
    res["fault_times"] = [f["time"] - t0 for f in res["faults"]]
    res["kill_to_next_token_s"] = kill_to_token(res["faults"], res["recoveries"])
    res["tokens_recomputed"] = _recomputed(run_dir, res["recoveries"])
    res["steps_recomputed"] = sum(r.get("steps_recomputed", 0) for r in res["recoveries"])
    return res


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def _timeline(run_dir: Path) -> list[list]:
    """Tokens over time across attempts: each attempt counts from the tokens finished before it."""
    out, base = [], 0
    for i in range(1, 20):
        p = run_dir / f"timeline-{i}.json"
        if not p.exists():
            break
        samples = json.loads(p.read_text())["samples"]
        out += [[t, base + tok] for t, tok, _ in samples]
        base = out[-1][1] if out else base
    return out


def kill_to_token(faults: list[dict], recoveries: list[dict]) -> list[float]:
    """Per recovery: from the signal (its time in faults.jsonl) to the pipeline's next token."""
    out = []
    for r in recoveries:
        sent = [f["time"] for f in faults if f["time"] <= r.get("resumed_at", 0)]
        if sent:
            out.append(round(r["resumed_at"] - max(sent), 4))
    return out


def _recomputed(run_dir: Path, recoveries: list[dict]) -> int:
    """FT on: tokens the recoveries recomputed. FT off: tokens generated in ended attempts for requests
    that were not finished when their attempt ended (they are all generated again)."""
    if recoveries:
        return sum(r.get("tokens_recomputed", 0) for r in recoveries)
    journal = _jsonl(run_dir / "journal.jsonl")
    attempts = [i for i, e in enumerate(journal) if e["type"] == "start"]
    wasted = 0
    for k, start in enumerate(attempts[:-1]):
        end = attempts[k + 1]
        finished = sum(len(e["record"].get("output_ids", [])) for e in journal[start:end] if e["type"] == "finished")
        samples = json.loads((run_dir / f"timeline-{k + 1}.json").read_text())["samples"]
        wasted += max((samples[-1][1] if samples else 0) - finished, 0)
    return wasted


def table(doc: dict) -> str:
    ms = lambda x: "-" if x is None else f"{1000 * x:.1f}"  # noqa: E731
    lines = ["| run | tok/s (wall) | tok/s (serving) | latency p50/p99 s | TTFT p50/p99 ms | TPOT p50/p99 ms | faults | kill to next token, s | tokens recomputed | lost |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in doc["runs"].items():
        rec = ", ".join(f"{x:.2f}" for x in r.get("kill_to_next_token_s", [])) or "-"
        lines.append(f"| {name} | {r['throughput_wall_tok_s']:.1f} | {r['throughput_tok_s'] or 0:.1f} | "
                     f"{r['latency_s']['p50']:.2f}/{r['latency_s']['p99']:.2f} | {ms(r['ttft_s']['p50'])}/{ms(r['ttft_s']['p99'])} | "
                     f"{ms(r['tpot_s']['p50'])}/{ms(r['tpot_s']['p99'])} | {len(r['faults'])} | {rec} | "
                     f"{r['tokens_recomputed']} | {r['requests_lost']} |")
    lines += ["", *[f"- {k}: {v:.3f}" for k, v in doc["ratios"].items()]]
    return "\n".join(lines) + "\n"


def draw(plt, doc: dict):
    """Tokens/s over time of the four runs, kills dotted."""
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for (name, r), color in zip(doc["runs"].items(), ("tab:gray", "tab:red", "tab:blue", "tab:green")):
        tl = r["timeline"]
        pts = [(t1, (k1 - k0) / max(t1 - t0, 1e-3)) for (t0, k0), (t1, k1) in zip(tl[::5], tl[5::5])]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, color=color)
        for ft in r["fault_times"]:
            ax.axvline(ft, color=color, linestyle=":", alpha=0.8)
    ax.set_xlabel("seconds since launch")
    ax.set_ylabel("generated tokens/s")
    ax.set_title(f"{doc['model']}: fault tolerance on vs off, with and without kills (dotted)")
    ax.legend()
    return fig


def bench(a) -> dict:
    ckpt = ensure_checkpoint(a)
    vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    a.work.mkdir(parents=True, exist_ok=True)
    req = a.work / "trace.jsonl"
    trace = make_trace(a.n, a.rate, vocab, a.max_prompt, a.max_output, seed=a.seed, scale=a.scale)
    req.write_text("".join(json.dumps(r) + "\n" for r in trace))
    runs = {}
    for name, ft, faults in RUNS:
        runs[name] = run_one(name, ft, faults, a, ckpt, req)
        print(f"bench_ft: {name}: {runs[name]['throughput_wall_tok_s']:.1f} tok/s, lost {runs[name]['requests_lost']}",
              file=sys.stderr, flush=True)
    tw = {k: v["throughput_wall_tok_s"] for k, v in runs.items()}
    ratios = {"ft_on_vs_off_no_faults": tw["ft-on"] / tw["ft-off"],
              "ft_on_vs_off_with_faults": tw["ft-on+faults"] / tw["ft-off+faults"],
              "ft_on_faults_vs_no_faults": tw["ft-on+faults"] / tw["ft-on"]}
    return {"model": a.model_config.stem if a.model_config else a.family, "device": a.device, "nproc": a.nproc,
            "trace": {"n": a.n, "rate": a.rate, "scale": a.scale, "max_prompt": a.max_prompt, "max_output": a.max_output},
            "faults": {"mtbf_s": a.mtbf, "count": a.faults, "role": a.role, "seed": a.seed},
            "runs": runs, "ratios": ratios, "command": " ".join(["python", "tools/bench_ft.py", *sys.argv[1:]])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", help="tiny preset checkpoint (tools/make_checkpoint.py) when no --ckpt exists")
    p.add_argument("--model-config", type=Path, help="a real model's config.json to build the checkpoint from")
    p.add_argument("--ckpt", type=Path, help="checkpoint directory (built when it has no config.json)")
    p.add_argument("--work", type=Path, default=Path("runs/bench-ft"), help="run directories (default runs/bench-ft)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the stages run (default cpu)")
    p.add_argument("--dtype", default=None, help="compute dtype (default float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--nproc", type=int, default=3, help="pipeline processes (stages) (default 3)")
    p.add_argument("--n", type=int, default=48, help="requests in the trace (default 48)")
    p.add_argument("--rate", type=float, default=12.0, help="arrivals per second (default 12)")
    p.add_argument("--scale", type=float, default=1.0, help="multiplies the median prompt and output lengths")
    p.add_argument("--max-prompt", type=int, default=2048, help="prompt length cap (default 2048)")
    p.add_argument("--max-output", type=int, default=512, help="output length cap (default 512)")
    p.add_argument("--mtbf", type=float, default=3.0, help="mean seconds between kills (default 3)")
    p.add_argument("--faults", type=int, default=2, help="kills per faulty run (default 2)")
    p.add_argument("--role", default="any", choices=["token", "stage", "any"], help="which workers are killed (default any)")
    p.add_argument("--seed", type=int, default=0, help="seed of the trace and of the fault schedule")
    p.add_argument("--timeout", type=float, default=900, help="seconds a run may take (default 900)")
    p.add_argument("--dejavu-arg", dest="dejavu_args", action="append", default=[], help="extra flag for every run")
    p.add_argument("--ft-on-arg", dest="ft_on_args", action="append", default=[],
                   help="extra flag for the FT-on runs only, e.g. --ft-on-arg=--standby=2 --ft-on-arg=--standby-preload")
    p.add_argument("--out", type=Path, help="JSON to write (a .md table and a .png beside it)")
    p.add_argument("--plot", type=Path, help="draw the PNG of this JSON result instead of running")
    a = p.parse_args(argv)
    if a.plot:
        doc = json.loads(a.plot.read_text())
        return 0 if save_plot(lambda plt: draw(plt, doc), a.plot.with_suffix(".png"), "bench_ft.py", a.plot) else 1
    if a.out is None:
        p.error("--out is required to run")
    a.dtype = a.dtype or ("float32" if a.device == "cpu" else "bfloat16")
    a.work = a.work.resolve()
    try:
        doc = bench(a)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    a.out.with_suffix(".md").write_text(table(doc))
    save_plot(lambda plt: draw(plt, doc), a.out.with_suffix(".png"), "bench_ft.py", a.out)
    print(table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
