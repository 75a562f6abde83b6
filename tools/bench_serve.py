#!/usr/bin/env python3
"""Open-loop serving benchmark: the same Poisson trace served colocated and disaggregated, same process count.

    # CPU, tiny checkpoint, well under a minute:
    python tools/bench_serve.py --family qwen2_moe --nproc 2 --n 8 --rate 8 --scale 0.02 \\
        --max-prompt 32 --max-output 8 --out results/bench-serve/tiny.json
    # GPU, real shapes (checkpoint built like tools/bench.py when --ckpt has no config.json):
    python tools/bench_serve.py --model-config configs/models/olmoe-1b-7b.json --ckpt ckpt/olmoe-1b-7b \\
        --device cuda --nproc 3 --prompt-stages 1 --n 200 --rate 4 --max-prompt 2048 --max-output 512 \\
        --out results/bench-serve/olmoe-1b-7b.json --dejavu-arg=--max-batch-size=64

Trace: N requests with Poisson arrivals at --rate req/s (exponential gaps, the first after one gap,
``arrival_s`` seconds after serving starts) and random prompt tokens. Prompt and output lengths are drawn
independently from log-normal distributions fitted (maximum likelihood: mean and standard deviation of
ln tokens) to the Azure LLM inference trace 2023, conversation service (Patel et al., "Splitwise",
ISCA 2024; data/AzureLLMInferenceTrace_conv.csv of github.com/Azure/AzurePublicDataset, 19,366 requests;
the correlation of the two log lengths there is 0.09):
  prompt  ln L ~ N(6.633, 0.985^2): median 760, fit p10/p90 215/2686; trace mean 1155, p10/p50/p90/p99 207/1020/2735/4142
  output  ln L ~ N(5.019, 0.859^2): median 151, fit p10/p90 50/455;   trace mean 211, p10/p50/p90/p99 54/129/424/601
--scale s multiplies both medians (mu + ln s); lengths are rounded and clipped to [1, --max-prompt] and
[1, --max-output], and --max-prompt is lowered so that prompt + output fits the model's
max_position_embeddings. Requests carry ``max_new_tokens`` and the runs use --ignore-eos, so every
output has its drawn length.

Runs: ``python -m dejavu_py --nproc-per-node N`` colocated (N stages) and with ``--prompt-stages P`` (P
prompt + N-P token stages), same trace file, same --seed, same flags (plus --dejavu-arg for both,
--colocated-arg / --disagg-arg for one). Per mode, from RUN_DIR/outputs.jsonl and summary.json:
  throughput  generated tokens / generate_s (serving start to the last finish)
  TTFT        first_token_s;  TPOT = (total_s - first_token_s) / (n - 1) for n >= 2 tokens
  latency     total_s;  p50 and p99 with linear interpolation
  KV          disaggregated only: mean kv_bytes, kv_transfer_s, kv_after_prefill_s
Writes --out (JSON, with every sample) and a PNG beside it (TTFT and TPOT CDFs, throughput bars).
On a GPU the stages of a run share the visible GPUs (local rank mod GPU count) and the disaggregated
run holds the weights once per pipeline: lower --kv-capacity-tokens when memory is short. To try a
tools/plan.py split: --disagg-arg=--layers-per-stage=5,6,5 (flags given later win over the defaults).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from make_checkpoint import FAMILIES, make_checkpoint  # noqa: E402  (torch and transformers load lazily)
from plotting import save_plot  # noqa: E402

PROMPT_LOGN = (6.633, 0.985)
"""ln(prompt tokens): mean, standard deviation (Azure LLM conversation trace 2023)."""
OUTPUT_LOGN = (5.019, 0.859)
"""ln(output tokens): mean, standard deviation (same trace)."""
MODES = ("colocated", "disaggregated")


class BenchError(Exception):
    """A one-line problem for the user."""


def make_trace(n: int, rate: float, vocab: int, max_prompt: int, max_output: int, seed: int = 0, scale: float = 1.0,
               prompt_logn: tuple[float, float] = PROMPT_LOGN, output_logn: tuple[float, float] = OUTPUT_LOGN) -> list[dict]:
    """Requests with Poisson arrivals and clipped log-normal lengths (see the module docstring)."""
    rng, t, out = random.Random(seed), 0.0, []
    shift = math.log(scale)
    for i in range(n):
        t += rng.expovariate(rate)
        p = min(max(round(rng.lognormvariate(prompt_logn[0] + shift, prompt_logn[1])), 1), max_prompt)
        o = min(max(round(rng.lognormvariate(output_logn[0] + shift, output_logn[1])), 1), max_output)
        out.append({"id": f"q{i}", "input_ids": [rng.randrange(3, vocab) for _ in range(p)], "max_new_tokens": o,
                    "arrival_s": t})
    return out


def percentile(xs: list[float], q: float) -> float | None:
    """The q-th percentile (0-100), linear interpolation between order statistics; None when empty."""
    s = sorted(xs)
    if not s:
        return None
    k = (len(s) - 1) * q / 100
    lo = math.floor(k)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (k - lo)


def _stats(xs: list[float]) -> dict:
    return {"p50": percentile(xs, 50), "p99": percentile(xs, 99), "mean": sum(xs) / len(xs) if xs else None}


def metrics(outputs: list[dict], summary: dict) -> dict:
    """Per-mode figures from the output records and summary.json of one run."""
    ok = [r for r in outputs if "error" not in r]
    tm = [r["timings"] for r in ok]
    ttft = [t["first_token_s"] for t in tm]
    tpot = [(t["total_s"] - t["first_token_s"]) / (len(r["output_ids"]) - 1) for r, t in zip(ok, tm) if len(r["output_ids"]) > 1]
    tokens = sum(len(r["output_ids"]) for r in ok)
    gen_s = float(summary.get("generate_s") or 0)
    out = {"requests": len(outputs), "completed": len(ok), "failed": len(outputs) - len(ok), "output_tokens": tokens,
           "generate_s": gen_s, "throughput_tok_s": tokens / gen_s if gen_s > 0 else None,
           "ttft_s": _stats(ttft), "tpot_s": _stats(tpot), "latency_s": _stats([t["total_s"] for t in tm]),
           "samples": {"ttft_s": sorted(ttft), "tpot_s": sorted(tpot)}}
    if any("kv_bytes" in t for t in tm):
        kv = [t for t in tm if "kv_bytes" in t]
        out["kv"] = {k: sum(t[k] for t in kv) / len(kv) for k in ("kv_bytes", "kv_transfer_s", "kv_after_prefill_s")}
    return out


def ensure_checkpoint(a: argparse.Namespace) -> Path:
    """--ckpt, built (random weights, no tokenizer) from --model-config or --family when it has no config.json."""
    ckpt = a.ckpt or a.work / f"ckpt-{a.family or (a.model_config.stem if a.model_config else 'model')}"
    if (ckpt / "config.json").exists():
        return ckpt
    if a.model_config is not None:
        try:
            json.loads(a.model_config.read_text())
        except (OSError, ValueError) as e:
            raise BenchError(f"--model-config {a.model_config}: cannot read a JSON config ({e})") from None
        gpu = a.device == "cuda"
        make_checkpoint(ckpt, config_path=a.model_config, dtype="bfloat16" if gpu else "float32",
                        init_device="cuda" if gpu else "cpu", tokenizer=False)
    elif a.family is not None:
        make_checkpoint(ckpt, family=a.family, tokenizer=False)
    else:
        raise BenchError(f"--ckpt {ckpt}: no config.json there; give --model-config or --family to build one")
    return ckpt


def run_mode(mode: str, a: argparse.Namespace, ckpt: Path, req: Path, kv_tokens: int) -> dict:
    """One ``python -m dejavu_py`` run; its metrics (raises BenchError with the log tail if it fails)."""
    run_dir = a.work / mode
    shutil.rmtree(run_dir, ignore_errors=True)  # a stale run directory would be resumed
    cmd = [sys.executable, "-m", "dejavu_py", "--nproc-per-node", str(a.nproc), "--model", str(ckpt), "--prompts", str(req),
           "--run-dir", str(run_dir), "--device", a.device, "--dtype", a.dtype, "--seed", str(a.seed), "--ignore-eos",
           "--no-progress", "--kv-capacity-tokens", str(kv_tokens), "--block-size", "16"]
    cmd += ["--prompt-stages", str(a.prompt_stages)] if mode == "disaggregated" else []
    cmd += a.dejavu_args + (a.disagg_args if mode == "disaggregated" else a.colocated_args)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if a.device == "cpu":
        env.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=a.timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{mode} run exceeded --timeout {a.timeout:g}s ({' '.join(cmd)})") from None
    a.work.mkdir(parents=True, exist_ok=True)
    (a.work / f"{mode}-console.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not (run_dir / "summary.json").exists():
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise BenchError(f"{mode} run failed (exit {proc.returncode}): {tail} [log: {a.work / (mode + '-console.txt')}]")
    outs = [json.loads(x) for x in (run_dir / "outputs.jsonl").read_text().splitlines() if x.strip()]
    res = metrics(outs, json.loads((run_dir / "summary.json").read_text()))
    res.update(job_wall_s=time.time() - t0, command=" ".join(cmd[1:]))
    return res


def draw(plt, doc: dict):
    """TTFT and TPOT CDFs and throughput of both modes."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for mode, color in zip(MODES, ("tab:blue", "tab:orange")):
        m = doc["modes"][mode]
        for ax, key in zip(axes[:2], ("ttft_s", "tpot_s")):
            xs = [x * 1e3 for x in m["samples"][key]]
            if xs:
                ax.step([xs[0], *xs], [0.0] + [(i + 1) / len(xs) for i in range(len(xs))], where="post", color=color, label=mode)
    for ax, what in zip(axes[:2], ("TTFT", "TPOT")):
        ax.set_xlabel(f"{what} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{what} CDF")
        ax.grid(alpha=0.3)
        ax.legend()
    vals = [doc["modes"][m]["throughput_tok_s"] or 0 for m in MODES]
    axes[2].bar(MODES, vals, color=("tab:blue", "tab:orange"))
    for i, v in enumerate(vals):
        axes[2].text(i, v, f"{v:,.1f}", ha="center", va="bottom")
    axes[2].set_ylabel("output tokens/s")
    t = doc["trace"]
    axes[2].set_title(f"throughput ({doc['nproc']} processes, P={doc['prompt_stages']})")
    fig.suptitle(f"{doc['model']}: {t['n']} requests, Poisson {t['rate']:g} req/s, mean prompt {t['mean_prompt']:.0f}, "
                 f"output {t['mean_output']:.0f} tokens, {doc['device']}")
    return fig


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.1f}"


def report(doc: dict) -> str:
    """A table of both modes for the terminal."""
    lines = [f"{'mode':<14} {'done':>7} {'tok/s':>9} {'TTFT p50/p99 ms':>17} {'TPOT p50/p99 ms':>17} "
             f"{'latency p50/p99 s':>18} {'KV MB':>7} {'KV after prefill ms':>20}"]
    for mode in MODES:
        m = doc["modes"][mode]
        kv, lat = m.get("kv"), m["latency_s"]
        kv_mb = f"{kv['kv_bytes'] / 1e6:.2f}" if kv else "-"
        kv_ms = _ms(kv["kv_after_prefill_s"]) if kv else "-"
        lines.append(f"{mode:<14} {m['completed']:>3}/{m['requests']:<3} {m['throughput_tok_s'] or 0:>9.1f} "
                     f"{_ms(m['ttft_s']['p50']) + '/' + _ms(m['ttft_s']['p99']):>17} "
                     f"{_ms(m['tpot_s']['p50']) + '/' + _ms(m['tpot_s']['p99']):>17} "
                     f"{(lat['p50'] or 0):>8.2f}/{(lat['p99'] or 0):<9.2f} {kv_mb:>7} {kv_ms:>20}")
    return "\n".join(lines)


def bench(a: argparse.Namespace) -> dict:
    ckpt = ensure_checkpoint(a)
    cfg = json.loads((ckpt / "config.json").read_text())
    max_pos, vocab = int(cfg["max_position_embeddings"]), int(cfg["vocab_size"])
    max_output = min(a.max_output, max_pos - 1)
    max_prompt = min(a.max_prompt, max_pos - max_output)
    trace = make_trace(a.n, a.rate, vocab, max_prompt, max_output, a.seed, a.scale)
    req = a.work / "trace.jsonl"
    req.write_text("".join(json.dumps(r) + "\n" for r in trace))
    seq = [math.ceil((len(r["input_ids"]) + r["max_new_tokens"]) / 16) * 16 for r in trace]
    kv_tokens = a.kv_capacity_tokens or max(4096, min(sum(seq), 131072))
    doc = {"model": cfg.get("model_type", "?") if a.model_config is None else a.model_config.stem,
           "checkpoint": str(ckpt), "device": a.device, "dtype": a.dtype, "nproc": a.nproc, "prompt_stages": a.prompt_stages,
           "trace": {"n": a.n, "rate": a.rate, "seed": a.seed, "scale": a.scale, "max_prompt": max_prompt,
                     "max_output": max_output, "duration_s": trace[-1]["arrival_s"],
                     "mean_prompt": sum(len(r["input_ids"]) for r in trace) / a.n,
                     "mean_output": sum(r["max_new_tokens"] for r in trace) / a.n,
                     "distribution": "log-normal fit to the Azure LLM conversation trace 2023", "file": str(req)},
           "kv_capacity_tokens": kv_tokens, "modes": {}}
    for mode in MODES:
        doc["modes"][mode] = run_mode(mode, a, ckpt, req, kv_tokens)
        print(f"{mode}: {doc['modes'][mode]['completed']}/{a.n} requests, "
              f"{doc['modes'][mode]['throughput_tok_s'] or 0:.1f} tok/s", file=sys.stderr, flush=True)
    doc["command"] = " ".join(["python", "tools/bench_serve.py", *sys.argv[1:]])
    return doc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("model")
    src.add_argument("--model-config", type=Path, help="a real model's config.json (configs/models/) to build --ckpt from")
    src.add_argument("--family", choices=FAMILIES, help="tiny preset of tools/make_checkpoint.py (e.g. qwen2_moe) to build --ckpt from")
    src.add_argument("--ckpt", type=Path, help="checkpoint directory; built when it has no config.json (default WORK/ckpt-NAME)")
    tr = p.add_argument_group("trace")
    tr.add_argument("--n", type=int, default=8, help="requests (default 8)")
    tr.add_argument("--rate", type=float, default=4.0, help="Poisson arrival rate, requests/s (default 4)")
    tr.add_argument("--scale", type=float, default=1.0, help="multiply the median prompt and output lengths (default 1)")
    tr.add_argument("--max-prompt", type=int, default=2048, help="clip prompt lengths to this (default 2048)")
    tr.add_argument("--max-output", type=int, default=512, help="clip output lengths to this (default 512)")
    tr.add_argument("--seed", type=int, default=0, help="seed of the trace and of both runs (default 0)")
    rn = p.add_argument_group("runs")
    rn.add_argument("--nproc", type=int, default=2, help="processes of both runs: colocated stages, or P + T (default 2)")
    rn.add_argument("--prompt-stages", type=int, default=1, help="P of the disaggregated run; T = nproc - P (default 1)")
    rn.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the stages run (default cpu)")
    rn.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default float32 on cpu, bfloat16 on cuda")
    rn.add_argument("--kv-capacity-tokens", type=int, help="per stage (default: the whole trace at once, 4096..131072)")
    rn.add_argument("--dejavu-arg", dest="dejavu_args", action="append", default=[], help="extra flag for both runs, e.g. --dejavu-arg=--swap")
    rn.add_argument("--colocated-arg", dest="colocated_args", action="append", default=[], help="extra flag for the colocated run only")
    rn.add_argument("--disagg-arg", dest="disagg_args", action="append", default=[], help="extra flag for the disaggregated run only")
    rn.add_argument("--timeout", type=float, default=600, help="seconds per run before it counts as failed (default 600)")
    ou = p.add_argument_group("output")
    ou.add_argument("--out", type=Path, help="JSON to write (required to run)")
    ou.add_argument("--plot", type=Path, help="draw the PNG of this JSON result instead of running")
    ou.add_argument("--png", type=Path, help="plot to write (default: --out with .png)")
    ou.add_argument("--work", type=Path, help="trace, run directories and logs (default: --out without suffix + '-work')")
    return p


def check(a: argparse.Namespace) -> None:
    if a.n < 1 or a.nproc < 2 or not 1 <= a.prompt_stages < a.nproc:
        raise BenchError("need --n >= 1, --nproc >= 2 and 1 <= --prompt-stages < --nproc (both modes use --nproc processes)")
    for name in ("rate", "scale", "timeout"):
        v = getattr(a, name)
        if not (math.isfinite(v) and v > 0):
            raise BenchError(f"--{name} {v:g}: must be a positive number")
    if a.max_prompt < 1 or a.max_output < 1 or (a.kv_capacity_tokens is not None and a.kv_capacity_tokens < 16):
        raise BenchError("--max-prompt and --max-output must be >= 1, --kv-capacity-tokens >= 16")
    if a.family is not None and a.model_config is not None:
        raise BenchError("give --family or --model-config, not both")


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if a.plot:
        doc = json.loads(a.plot.read_text())
        return 0 if save_plot(lambda plt: draw(plt, doc), a.png or a.plot.with_suffix(".png"), "bench_serve.py", a.plot) else 1
    if a.out is None:
        p.error("--out is required to run")
    a.dtype = a.dtype or ("bfloat16" if a.device == "cuda" else "float32")
    a.work = a.work or a.out.with_name(a.out.stem + "-work")
    try:
        check(a)
        a.work.mkdir(parents=True, exist_ok=True)
        doc = bench(a)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=2) + "\n")
    png = a.png or a.out.with_suffix(".png")
    save_plot(lambda plt: draw(plt, doc), png, "bench_serve.py", a.out)
    print(report(doc))
    print(f"wrote {a.out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
