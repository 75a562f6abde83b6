#!/usr/bin/env python3
"""Two code trees side by side (the runs of tools/gpu_ab.sh): decode tokens/s of each tree per model,
stage count and batch size, the ratio B / A of their medians with each run's spread, and FT's cost
(FT on / FT off) as each tree measured it. Writes JSON and a PNG.

    python tools/ab_summary.py out/gpu-ab --labels old,new --out results/ab/old-vs-new.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plotting import save_plot  # noqa: E402


def decode_rows(folder: Path) -> dict:
    """(model, stages, batch) -> {"a": [tok/s...], "b": [...]} from bench-MODEL-TAG-REP.json."""
    out: dict = defaultdict(lambda: {"a": [], "b": []})
    for path in sorted(folder.glob("bench-*.json")):
        tag = path.stem.rsplit("-", 2)[-2]
        doc = json.loads(path.read_text())
        for r in doc["rows"]:
            if r.get("engine") == "dejavu" and "decode_tok_s" in r:
                out[(doc["model"], r["stages"], r["batch"])][tag].append(r["decode_tok_s"])
    return out


def ft_costs(folder: Path) -> dict:
    """(model, batch) -> {"a": ratio of medians, "b": ...} from ftcost-MODEL-TAG-REP.json."""
    out: dict = defaultdict(dict)
    for path in sorted(folder.glob("ftcost-*.json")):
        tag = path.stem.rsplit("-", 2)[-2]
        doc = json.loads(path.read_text())
        for b, got in doc["batches"].items():
            if "ratio_of_medians" in got:
                out[(doc["model"], int(b))][tag] = round(got["ratio_of_medians"], 4)
    return out


def summarize(folder: Path, labels: tuple[str, str]) -> dict:
    rows = []
    for (model, stages, batch), got in sorted(decode_rows(folder).items()):
        row = {"model": model, "stages": stages, "batch": batch,
               labels[0]: [round(x, 1) for x in got["a"]], labels[1]: [round(x, 1) for x in got["b"]]}
        if got["a"] and got["b"]:
            row["ratio"] = round(statistics.median(got["b"]) / statistics.median(got["a"]), 4)
            row["ratio_range"] = [round(min(got["b"]) / max(got["a"]), 4), round(max(got["b"]) / min(got["a"]), 4)]
        rows.append(row)
    ft = [{"model": m, "batch": b, **{labels[0 if k == "a" else 1]: v for k, v in got.items()}}
          for (m, b), got in sorted(ft_costs(folder).items())]
    return {"labels": list(labels), "decode": rows, "ft_cost_on_over_off": ft}


def draw(plt, doc: dict):
    rows = [r for r in doc["decode"] if "ratio" in r]
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.9), 4))
    names = [f"{r['model']}\n{r['stages']}st b{r['batch']}" for r in rows]
    ax.bar(range(len(rows)), [r["ratio"] for r in rows], color="tab:blue")
    for i, r in enumerate(rows):
        ax.plot([i, i], r["ratio_range"], color="black")
    ax.axhline(1.0, color="gray", linestyle="--")
    ax.set_xticks(range(len(rows)), names, fontsize=7)
    ax.set_ylabel(f"decode tok/s, {doc['labels'][1]} / {doc['labels'][0]}")
    ax.set_ylim(0.8, 1.2)
    ax.set_title("side by side on one GPU (bar: ratio of medians; line: run spread)")
    return fig


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path, help="where tools/gpu_ab.sh wrote its runs")
    p.add_argument("--labels", default="a,b", help="names of tree A and tree B (default a,b)")
    p.add_argument("--out", type=Path, required=True, help="JSON to write (a PNG beside it)")
    a = p.parse_args()
    doc = summarize(a.folder, tuple(a.labels.split(",", 1)))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    save_plot(lambda plt: draw(plt, doc), a.out.with_suffix(".png"), "ab_summary.py")
    for r in doc["decode"]:
        print(json.dumps(r))
    for r in doc["ft_cost_on_over_off"]:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
