#!/usr/bin/env python3
"""Decode and prefill speed of dejavu_py against transformers' generate, on the same random weights,
next to the memory-bandwidth roofline.

    python tools/bench.py --model-config configs/models/qwen1.5-moe-a2.7b.json --ckpt /dev/shm/qwen \\
        --batches 1,16,64 --stages 1,2 --out results/bench/qwen1.5-moe-a2.7b.json
    python tools/bench.py --plot results/bench/*.json --png results/bench/bench.png

For each batch size B: B requests of --prompt-len random tokens, each generating --new-tokens tokens
(end-of-sequence ignored), all admitted at once. Measured per run (dejavu: from the output timings,
counted from when the pipeline starts serving; transformers: wall clock around generate):
  TTFT      time to the first token (the prefill of all B prompts)
  TPOT      time per output token after the first
  prefill   B * prompt_len / TTFT tokens/s;   decode  B / TPOT tokens/s
Roofline: a decode step must read every weight it uses once (attention, norms, LM head, the shared
expert, and the routed experts that B tokens touch, expected E*(1-(1-k/E)^B) per layer under uniform
routing) plus the KV cache of the batch at the mean context; tokens/s = B / (bytes / HBM bandwidth).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from plotting import save_plot  # noqa: E402

HBM_BW = {"H100": 3.35e12, "H200": 4.8e12}


# -- roofline --------------------------------------------------------------------------------------
def weight_bytes_per_step(cfg: dict, batch: int, elem: int = 2) -> float:
    """Bytes of weights a decode step of ``batch`` tokens reads (uniform routing)."""
    D, L, V = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    H, K = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    Dh = cfg.get("head_dim") or D // H
    attn = D * H * Dh * 2 + D * K * Dh * 2
    E = cfg.get("num_experts") or cfg.get("num_local_experts") or 0
    k = cfg.get("num_experts_per_tok", 0)
    F = cfg.get("moe_intermediate_size") or cfg.get("intermediate_size")
    Fs = cfg.get("shared_expert_intermediate_size") or 0
    touched = E * (1 - (1 - k / E) ** batch) if E else 0
    mlp = (E * D + touched * 3 * D * F + 3 * D * Fs) if E else 3 * D * cfg["intermediate_size"]
    return (L * (attn + mlp + 2 * D) + V * D + D) * elem


def kv_bytes_per_step(cfg: dict, batch: int, ctx: float, elem: int = 2) -> float:
    H = cfg["num_attention_heads"]
    K, L = cfg.get("num_key_value_heads", H), cfg["num_hidden_layers"]
    Dh = cfg.get("head_dim") or cfg["hidden_size"] // H
    return batch * ctx * L * 2 * K * Dh * elem


def roofline(cfg: dict, batch: int, ctx: float, bw: float) -> dict:
    w, kv = weight_bytes_per_step(cfg, batch), kv_bytes_per_step(cfg, batch, ctx)
    step_s = (w + kv) / bw
    return {"weight_bytes": w, "kv_bytes": kv, "step_s": step_s, "tok_s": batch / step_s}


# -- runs ------------------------------------------------------------------------------------------
def run_dejavu(ckpt: Path, work: Path, batch: int, stages: int, a) -> dict:
    from make_requests import make_requests

    req = work / f"req-b{batch}.jsonl"
    reqs = make_requests(batch, a.vocab, (a.prompt_len, a.prompt_len), (a.new_tokens, a.new_tokens), seed=batch)
    req.write_text("".join(json.dumps(r) + "\n" for r in reqs))
    run_dir = work / f"run-s{stages}-b{batch}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a run directory with a journal would be resumed, not rerun
    total = a.prompt_len + a.new_tokens
    cmd = [sys.executable, "-m", "dejavu_py", "--nproc-per-node", str(stages), "--model", str(ckpt), "--prompts",
           str(req), "--run-dir", str(run_dir), "--device", a.device, "--dtype", a.dtype, "--ignore-eos",
           "--max-batch-size", str(batch), "--max-batch-tokens", str(batch * a.prompt_len),
           "--kv-capacity-tokens", str(max(4096, 2 * batch * total)), "--max-model-len", str(total + 16),
           "--block-size", "16", "--no-progress", *a.dejavu_args]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wait_gpu_free()
    if proc.returncode != 0:
        err = [ln for ln in proc.stderr.splitlines() if "Error" in ln or "error" in ln][-1:] or proc.stderr.splitlines()[-1:]
        return {"engine": "dejavu", "stages": stages, "batch": batch, "error": " ".join(err)[:300]}
    outs = [json.loads(x) for x in (run_dir / "outputs.jsonl").read_text().splitlines()]
    first = [o["timings"]["first_token_s"] for o in outs]
    tpot = [(o["timings"]["total_s"] - o["timings"]["first_token_s"]) / (len(o["output_ids"]) - 1) for o in outs]
    ttft = max(first)
    return {"engine": "dejavu", "stages": stages, "batch": batch, "ttft_s": ttft, "tpot_s": sum(tpot) / len(tpot),
            "prefill_tok_s": batch * a.prompt_len / ttft, "decode_tok_s": batch / (sum(tpot) / len(tpot)),
            "job_wall_s": time.time() - t0,
            "loop_ms": json.loads((run_dir / "summary.json").read_text()).get("loop_ms"),  # host vs device per step
            "steps": step_split(run_dir)}


EARLY_STEPS = 30
"""Decode steps right after the prompts (their one-time costs: with FT on, the prompts' K/V replica)."""


def step_split(run_dir: Path) -> dict:
    """The coordinator's decode steps (RUN_DIR/timeline-1.json; the first step is the prefill's): the time
    of the first ``EARLY_STEPS`` and the median of the rest, so that a one-time cost and a cost every step
    pays can be told apart."""
    step_ms = json.loads((run_dir / "timeline-1.json").read_text()).get("step_ms") or []
    early, rest = step_ms[1:EARLY_STEPS], step_ms[EARLY_STEPS:]
    return {"early_steps": len(early), "early_ms": round(sum(early), 2), "rest_steps": len(rest),
            "rest_median_ms": round(statistics.median(rest), 4) if rest else None,
            "early_step_ms": [round(x, 2) for x in early]}


def wait_gpu_free(timeout_s: float = 60) -> None:
    """Until the finished run's processes have given their GPU memory back (the next run needs it)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            used = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                  capture_output=True, text=True).stdout.split()
        except FileNotFoundError:
            return
        if used and max(int(u) for u in used) < 4096:
            return
        time.sleep(0.5)


def run_transformers(ckpt: Path, batches: list[int], a) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).to("cuda").eval()
    rows = []
    gen = torch.Generator().manual_seed(0)

    def timed(ids, n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    with torch.no_grad():
        timed(torch.randint(3, a.vocab, (1, 8), generator=gen).cuda(), 4)  # warm-up
        for b in batches:
            ids = torch.randint(3, a.vocab, (b, a.prompt_len), generator=gen).cuda()
            t1 = timed(ids, 1)
            tn = timed(ids, a.new_tokens)
            tpot = (tn - t1) / (a.new_tokens - 1)
            rows.append({"engine": "transformers", "stages": 1, "batch": b, "ttft_s": t1, "tpot_s": tpot,
                         "prefill_tok_s": b * a.prompt_len / t1, "decode_tok_s": b / tpot})
            print(json.dumps(rows[-1]), flush=True)
    model = None  # its GPU memory back before the pipeline runs
    torch.cuda.empty_cache()
    return rows


def gpu_name() -> str:
    try:  # nvidia-smi rather than torch: a CUDA context here would hold GPU memory the runs need
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "cpu"
    except FileNotFoundError:
        return "cpu"


def bench(a) -> dict:
    from make_checkpoint import make_checkpoint

    cfg = json.loads(a.model_config.read_text())
    a.vocab = cfg["vocab_size"]
    ckpt = a.ckpt
    if not (ckpt / "config.json").exists():
        make_checkpoint(ckpt, config_path=a.model_config, dtype=a.dtype, init_device=a.device, tokenizer=False)
    work = a.work or ckpt.parent / f"bench-{ckpt.name}"
    work.mkdir(parents=True, exist_ok=True)
    name = gpu_name()
    bw = next((v for k, v in HBM_BW.items() if k in name), 3.35e12)
    rows = []
    for stages in a.stages:
        for b in a.batches:
            rows.append(run_dejavu(ckpt, work, b, stages, a))
            print(json.dumps(rows[-1]), flush=True)
    if not a.no_transformers:
        rows += run_transformers(ckpt, a.batches, a)
    ctx = a.prompt_len + a.new_tokens / 2
    for r in rows:
        r["roofline_tok_s"] = roofline(cfg, r["batch"], ctx, bw)["tok_s"]
        if "decode_tok_s" in r:
            r["fraction_of_roofline"] = r["decode_tok_s"] / r["roofline_tok_s"]
    return {"model": a.model_config.stem, "gpu": name, "hbm_bytes_per_s": bw, "prompt_len": a.prompt_len,
            "new_tokens": a.new_tokens, "rows": rows, "ratios": ratios(rows),
            "command": " ".join(["python", "tools/bench.py", *sys.argv[1:]])}


def ratios(rows: list[dict]) -> dict:
    by = {(r["engine"], r["stages"], r["batch"]): r for r in rows if "decode_tok_s" in r}
    out = {}
    for (eng, st, b), r in by.items():
        if eng != "dejavu":
            continue
        hf = by.get(("transformers", 1, b))
        if hf:
            out[f"dejavu_{st}stage_vs_transformers_b{b}"] = r["decode_tok_s"] / hf["decode_tok_s"]
        one = by.get(("dejavu", 1, b))
        if one and st != 1:
            out[f"dejavu_{st}stage_vs_1stage_b{b}"] = r["decode_tok_s"] / one["decode_tok_s"]
    return out


# -- plot ------------------------------------------------------------------------------------------
def draw(plt, docs: list[dict]):
    """Decode tokens/s per batch size of each engine and stage count, beside the roofline."""
    fig, axes = plt.subplots(1, len(docs), figsize=(6 * len(docs), 4.5), squeeze=False)
    for ax, doc in zip(axes[0], docs):
        batches = sorted({r["batch"] for r in doc["rows"]})
        series = sorted({(r["engine"], r["stages"]) for r in doc["rows"]})
        width = 0.8 / (len(series) + 1)
        for i, (eng, st) in enumerate(series):
            vals = [next((r.get("decode_tok_s", 0) for r in doc["rows"] if (r["engine"], r["stages"], r["batch"]) == (eng, st, b)), 0)
                    for b in batches]
            ax.bar([j + i * width for j in range(len(batches))], vals, width, label=f"{eng} {st} stage" + ("s" if st > 1 else ""))
        roof = [next(r["roofline_tok_s"] for r in doc["rows"] if r["batch"] == b) for b in batches]
        ax.bar([j + len(series) * width for j in range(len(batches))], roof, width, label="roofline", color="lightgray")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(batches))], [f"batch {b}" for b in batches])
        ax.set_yscale("log")
        ax.set_ylabel("decode tokens/s")
        ft = next((w.split("=", 1)[1] for w in doc.get("command", "").split() if w.startswith("--dejavu-arg=--ft=")), None)
        ax.set_title(f"{doc['model']} on {doc['gpu']}" + (f", FT {ft}" if ft else ""))
        ax.legend(fontsize=8)
    return fig


def plot(paths: list[Path], png: Path) -> bool:
    docs = [json.loads(p.read_text()) for p in paths]
    return save_plot(lambda plt: draw(plt, docs), png, "bench.py", paths[0])


def add_run_args(p: argparse.ArgumentParser) -> None:
    """The model, checkpoint, work directory and batch sizes (shared with tools/bench_ft_cost.py)."""
    p.add_argument("--model-config", type=Path, help="a real model's config.json (configs/models/)")
    p.add_argument("--ckpt", type=Path, help="checkpoint directory (built from --model-config if absent)")
    p.add_argument("--work", type=Path, help="directory for request files and run dirs (default beside --ckpt)")
    p.add_argument("--batches", default="1,16,64", help="batch sizes (default 1,16,64)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(p)
    p.add_argument("--stages", default="1,2", help="pipeline stage counts on the GPU (default 1,2)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default 128)")
    p.add_argument("--new-tokens", type=int, default=128, help="generated tokens per request (default 128)")
    p.add_argument("--device", default="cuda", help="where dejavu_py runs (default cuda; cpu measures host costs)")
    p.add_argument("--dtype", default="bfloat16", help="weights and compute (default bfloat16; float32 on cpu)")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    p.add_argument("--dejavu-arg", dest="dejavu_args", action="append", default=[], help="extra flag for dejavu_py")
    p.add_argument("--out", type=Path, help="JSON to write")
    p.add_argument("--plot", type=Path, nargs="+", help="draw these JSON results instead of running")
    p.add_argument("--png", type=Path, help="PNG to write with --plot")
    a = p.parse_args(argv)
    if a.plot:
        plot(a.plot, a.png or a.plot[0].with_suffix(".png"))
        return 0
    if a.model_config is None or a.ckpt is None or a.out is None:
        p.error("--model-config, --ckpt and --out are required to run")
    a.batches = [int(x) for x in a.batches.split(",")]
    a.stages = [int(x) for x in a.stages.split(",")]
    doc = bench(a)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc["ratios"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
