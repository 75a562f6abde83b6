#!/usr/bin/env python3
"""What fault tolerance costs when nothing fails: decode tokens/s with FT off and on, side by side in one
invocation on one machine.

    python tools/bench_ft_cost.py --model-config configs/models/olmoe-1b-7b.json --ckpt /dev/shm/olmoe \\
        --stages 2 --batches 1,16,64 --new-tokens 256 --repeat 3 --out results/ft-cost/cost.json
    python tools/bench_ft_cost.py --plot results/ft-cost/cost.json

Each batch size is run ``--repeat`` times in each mode, in the order off, on, on, off, off, on... (so that
a machine warming up or slowing down over the runs weighs on both alike), after one discarded warm-up run.
A run is the same as one of tools/bench.py: B requests admitted at once, end-of-sequence ignored, decode
tokens/s from the outputs' timings. Reported per batch size: every run's tokens/s, the median of each
mode, the ratio of the medians (FT on / FT off; the target is 0.97 or more), and the ratio of each
adjacent off/on pair (their spread shows the noise); and where the difference lies: the extra time of
the first 30 decode steps (right after the prompts: a one-time cost, with FT on their K/V's replica) and
the ratio of the median step after them (the cost every step pays). The JSON carries each run's per-step
loop times (host and device time of each stage), and a PNG beside it shows the ratios.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import add_run_args, gpu_name, run_dejavu  # noqa: E402
from plotting import save_plot  # noqa: E402

TARGET = 0.97
"""FT on must keep at least this fraction of FT off's decode throughput."""


def order(repeat: int) -> list[str]:
    """off, on, on, off, off, on, ...: each mode as often first as second in a pair."""
    pairs = [("off", "on") if i % 2 == 0 else ("on", "off") for i in range(repeat)]
    return [mode for pair in pairs for mode in pair]


def summarize(runs: list[dict]) -> dict:
    """Per mode: tokens/s of each run, their median; the ratio of medians and of each adjacent pair."""
    tok = {m: [r["decode_tok_s"] for r in runs if r["ft"] == m and "decode_tok_s" in r] for m in ("off", "on")}
    out: dict = {"tok_s": tok}
    if tok["off"] and tok["on"]:
        med = {m: statistics.median(v) for m, v in tok.items()}
        out["median_tok_s"] = med
        out["ratio_of_medians"] = med["on"] / med["off"]
        pairs = [runs[i:i + 2] for i in range(0, len(runs) - 1, 2)]
        out["pair_ratios"] = [
            next(r["decode_tok_s"] for r in p if r["ft"] == "on") / next(r["decode_tok_s"] for r in p if r["ft"] == "off")
            for p in pairs if all("decode_tok_s" in r for r in p) and {r["ft"] for r in p} == {"off", "on"}]
        out["meets_target"] = out["ratio_of_medians"] >= TARGET
        split = {m: [r["steps"] for r in runs if r["ft"] == m and r.get("steps", {}).get("rest_median_ms")]
                 for m in ("off", "on")}
        if split["off"] and split["on"]:  # where the difference is: right after the prompts, or every step
            med = {m: {k: statistics.median(x[k] for x in v) for k in ("early_ms", "rest_median_ms")} for m, v in split.items()}
            out["early_extra_ms"] = round(med["on"]["early_ms"] - med["off"]["early_ms"], 2)
            out["steady_step_ratio"] = round(med["off"]["rest_median_ms"] / med["on"]["rest_median_ms"], 4)
    errors = [r["error"] for r in runs if "error" in r]
    if errors:
        out["errors"] = errors
    return out


def run(a) -> dict:
    from make_checkpoint import make_checkpoint

    cfg = json.loads(a.model_config.read_text())
    a.vocab = cfg["vocab_size"]
    if not (a.ckpt / "config.json").exists():
        make_checkpoint(a.ckpt, config_path=a.model_config, dtype=a.dtype, init_device=a.device, tokenizer=False)
    work = a.work or a.ckpt.parent / f"bench-ft-cost-{a.ckpt.name}"
    work.mkdir(parents=True, exist_ok=True)
    base = list(a.dejavu_args)
    a.dejavu_args = [*base, "--ft=on"]
    warm = run_dejavu(a.ckpt, work, a.batches[-1], a.stages, a)  # page cache, compiled kernels: not measured
    print(f"warm-up: {warm.get('decode_tok_s', warm.get('error'))}", file=sys.stderr, flush=True)
    by_batch = {}
    for b in a.batches:
        runs = []
        for mode in order(a.repeat):
            a.dejavu_args = [*base, f"--ft={mode}"]
            t0 = time.time()
            row = {"ft": mode, **run_dejavu(a.ckpt, work, b, a.stages, a)}
            runs.append(row)
            print(f"batch {b} FT {mode}: {row.get('decode_tok_s', row.get('error'))} tok/s ({time.time() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
        by_batch[str(b)] = {"runs": runs, **summarize(runs)}
    model = a.model_config.stem if a.model_config.stem != "config" else a.model_config.parent.name
    return {"model": model, "gpu": gpu_name(), "stages": a.stages, "prompt_len": a.prompt_len,
            "new_tokens": a.new_tokens, "repeat": a.repeat, "target": TARGET, "batches": by_batch,
            "command": " ".join(["python", "tools/bench_ft_cost.py", *sys.argv[1:]])}


def draw(plt, doc: dict):
    """Each pair's FT on / FT off ratio per batch size, the ratio of medians, and the target."""
    fig, ax = plt.subplots(figsize=(6, 4))
    batches = list(doc["batches"])
    for i, b in enumerate(batches):
        got = doc["batches"][b]
        ax.scatter([i] * len(got.get("pair_ratios", [])), got.get("pair_ratios", []), color="tab:blue", alpha=0.6,
                   label="off/on pair" if i == 0 else None)
        if "ratio_of_medians" in got:
            ax.scatter([i], [got["ratio_of_medians"]], color="tab:red", marker="_", s=600,
                       label="ratio of medians" if i == 0 else None)
    ax.axhline(doc["target"], color="gray", linestyle="--", label=f"target {doc['target']}")
    ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    ax.set_ylabel("decode tok/s, FT on / FT off")
    ax.set_title(f"{doc['model']}, {doc['stages']} stages on {doc['gpu']}")
    ax.legend(fontsize=8)
    return fig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(p)
    p.add_argument("--stages", type=int, default=2, help="pipeline stages, sharing the GPU (default 2)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default 128)")
    p.add_argument("--new-tokens", type=int, default=256, help="generated tokens per request (default 256)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each mode per batch size (default 3)")
    p.add_argument("--device", default="cuda", help="where dejavu_py runs (default cuda)")
    p.add_argument("--dtype", default="bfloat16", help="weights and compute (default bfloat16)")
    p.add_argument("--dejavu-arg", dest="dejavu_args", action="append", default=[],
                   help="extra flag for every run (--ft is set by this tool)")
    p.add_argument("--out", type=Path, help="JSON to write (a PNG beside it)")
    p.add_argument("--plot", type=Path, help="draw the PNG of this JSON result instead of running")
    a = p.parse_args(argv)
    if a.plot:
        save_plot(lambda plt: draw(plt, json.loads(a.plot.read_text())), a.plot.with_suffix(".png"), "bench_ft_cost.py", a.plot)
        return 0
    if a.model_config is None or a.ckpt is None or a.out is None:
        p.error("--model-config, --ckpt and --out are required to run")
    if a.repeat < 1:
        p.error(f"--repeat {a.repeat}: at least 1")
    if any(x.startswith("--ft") for x in a.dejavu_args):
        p.error("--dejavu-arg: --ft is set by this tool, once off and once on")
    a.batches = [int(x) for x in a.batches.split(",")]
    doc = run(a)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    save_plot(lambda plt: draw(plt, doc), a.out.with_suffix(".png"), "bench_ft_cost.py", a.out)
    print(json.dumps({b: {k: v for k, v in got.items() if k not in ("runs",)} for b, got in doc["batches"].items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
