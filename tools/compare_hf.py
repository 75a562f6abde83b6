#!/usr/bin/env python3
"""Compare dejavu_py's outputs with transformers' greedy generate on the same checkpoint.

    python tools/compare_hf.py --model CKPT --prompts req.jsonl --outputs out.jsonl \\
        --dtype bfloat16 --device cuda --first 32 --json parity.json

For every greedy request of the request file it runs transformers' generate (batch 1, the
reference) and reports: requests whose first N tokens are identical, the mean length of the agreeing
prefix, and the position-wise match rate over the first N tokens. Exit code 1 with --require-exact
when any request differs.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def reference(model, input_ids: list[int], max_new: int, eos: list[int], device: str) -> list[int]:
    import torch

    ids = torch.tensor([input_ids], device=device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                         eos_token_id=eos or None, pad_token_id=0)
    gen = out[0, len(input_ids):].tolist()
    for i, t in enumerate(gen):
        if t in eos:
            return gen[: i + 1]
    return gen


def compare(ours: list[int], ref: list[int], first: int) -> dict:
    a, b = ours[:first], ref[:first]
    prefix = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    n = max(len(a), len(b))
    same = sum(x == y for x, y in zip(a, b))
    return {"exact": a == b, "prefix": prefix, "positions": n, "matches": same}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="checkpoint directory")
    p.add_argument("--prompts", type=Path, required=True, help="the request file dejavu_py ran")
    p.add_argument("--outputs", type=Path, required=True, help="dejavu_py's output JSONL")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="transformers' dtype")
    p.add_argument("--device", default="cpu", help="transformers' device (cpu, cuda)")
    p.add_argument("--first", type=int, default=32, help="compare the first N generated tokens (default 32)")
    p.add_argument("--json", type=Path, help="write the report here")
    p.add_argument("--require-exact", action="store_true", help="exit 1 unless every request matches exactly")
    a = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=getattr(torch, a.dtype)).to(a.device).eval()
    cfg = json.loads((a.model / "config.json").read_text())
    gen_cfg = a.model / "generation_config.json"
    eos: set[int] = set()
    for src in (cfg, json.loads(gen_cfg.read_text()) if gen_cfg.exists() else {}):
        v = src.get("eos_token_id")
        eos.update([v] if isinstance(v, int) else (v or []))
    outs = {r["id"]: r for r in _read_jsonl(a.outputs) if "output_ids" in r}
    rows = []
    with torch.no_grad():
        for req in _read_jsonl(a.prompts):
            rid = str(req.get("id"))
            if rid not in outs or req.get("temperature", 0) not in (0, 0.0):
                continue
            ours = outs[rid]["output_ids"]
            ref = reference(model, req["input_ids"], len(ours), sorted(eos | set(req.get("stop_token_ids", []))), a.device)
            rows.append({"id": rid, **compare(ours, ref, a.first)})
    total_pos = sum(r["positions"] for r in rows)
    report = {
        "model": str(a.model),
        "dtype": a.dtype,
        "device": a.device,
        "first": a.first,
        "requests": len(rows),
        "exact_requests": sum(r["exact"] for r in rows),
        "mean_agreeing_prefix": sum(r["prefix"] for r in rows) / max(len(rows), 1),
        "position_match_rate": sum(r["matches"] for r in rows) / max(total_pos, 1),
        "seconds": round(time.time() - t0, 1),
        "per_request": rows,
    }
    text = json.dumps(report, indent=2)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(text + "\n")
    summary = {k: v for k, v in report.items() if k != "per_request"}
    print(json.dumps(summary))
    if a.require_exact and report["exact_requests"] != report["requests"]:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
