"""tools/plan.py (deployment planner) and tools/bench_serve.py (open-loop serving benchmark)."""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import bench
import bench_serve
import plan
import pytest

from dejavu_py.cli import parse
from dejavu_py.protocol.layout import build_layout

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {name: ROOT / "configs/models" / f"{name}.json" for name in ("olmoe-1b-7b", "qwen1.5-moe-a2.7b")}


def run_plan(config: Path, *extra: str) -> dict:
    return plan.plan(plan.build_parser().parse_args(["--model-config", str(config), *extra]))


def model_of(config: Path) -> plan.Model:
    return plan.Model.from_config(json.loads(config.read_text()), config.stem)


# -- plan.py -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("gpus,rate", [(4, 4.0), (3, 40.0)])
def test_plan_real_config_gives_a_feasible_split_and_accepted_flags(name, gpus, rate):
    doc = run_plan(CONFIGS[name], "--gpus", str(gpus), "--rate", str(rate))
    m, hw = model_of(CONFIGS[name]), plan.Hardware(80.0)
    assert doc["candidates"] and doc["suggestion"]["index"] < len(doc["candidates"])
    for c in doc["candidates"]:
        P, T = c["prompt_stages"], c["token_stages"]
        assert P + T == gpus and len(c["token_split"]) == T and sum(c["token_split"]) == m.L
        if P:
            assert len(c["prompt_split"]) == P and sum(c["prompt_split"]) == m.L
        for counts in filter(None, (c["prompt_split"], c["token_split"])):  # weights + KV fit every GPU
            for i, r in enumerate(plan.ranges(counts)):
                used = m.stage_weights(r, i == 0, i == len(counts) - 1) + c["kv_capacity_tokens"] * len(r) * m.kv_token
                assert used <= hw.usable
        assert c["max_batch_size"] * c["microbatches"] * plan.Workload(rate, 1155, 211).seq_tokens <= (
            c["kv_capacity_tokens"] * (c["microbatches"] / plan.SWAP_RESIDENT if c["swap"] else 1))
        assert all(math.isfinite(c[k]) and c[k] > 0 for k in ("prefill_tok_s", "decode_tok_s", "max_rate", "ttft_s"))
        f = plan.flags(plan.Candidate(**c), gpus, "bfloat16")
        cfg, _ = parse(f + ["--model", "ckpt", "--prompts", "requests.jsonl"])
        layout = build_layout(cfg, m.L, gpus)  # checks the splits against the model and the process count
        assert len(layout.pipeline("prompt")) == P and len(layout.decode_pipeline) == T
        assert cfg.pipeline.layers_per_stage == c["token_split"] and cfg.cache.capacity_tokens == c["kv_capacity_tokens"]
    s = doc["suggestion"]
    assert s["flags"] == plan.flags(plan.Candidate(**{k: s[k] for k in doc["candidates"][0]}), gpus, "bfloat16")
    assert s["command"].startswith("python -m dejavu_py --nproc-per-node")


def test_swap_flags_parse():
    c = plan.Candidate("colocated", 0, 4, None, [6, 6, 6, 6], 4, 8, 1024, 4096, True, 1.0, 1.0, 1.0, 1.0, 1.0, True)
    cfg, _ = parse(plan.flags(c, 4, "bfloat16") + ["--model", "m", "--prompts", "p"])
    assert cfg.cache.swap and cfg.cache.swap_resident == plan.SWAP_RESIDENT and cfg.swap_partitions == 4


@pytest.mark.parametrize("name", list(CONFIGS))
def test_decode_bytes_match_the_bench_roofline(name):
    cfg, m = json.loads(CONFIGS[name].read_text()), model_of(CONFIGS[name])
    for b, ctx in ((1, 100.0), (16, 1000.0)):
        ours = sum(m.read_bytes(l, b) for l in range(m.L)) + m.embed_bytes + m.D * m.e + b * ctx * m.L * m.kv_token
        assert ours == pytest.approx(bench.weight_bytes_per_step(cfg, b) + bench.kv_bytes_per_step(cfg, b, ctx))


def test_split_follows_costs_and_memory():
    assert plan.split_layers([1.0] * 8, 2, (0.0, 0.0), [1.0] * 8, (0.0, 0.0), 100) == [4, 4]
    assert plan.split_layers([1.0] * 8, 2, (0.0, 2.0), [1.0] * 8, (0.0, 0.0), 100) == [5, 3]  # LM head on the last
    assert plan.split_layers([1.0] * 8, 2, (0.0, 0.0), [1.0] * 8, (0.0, 0.0), 3) is None  # no 2-stage split fits


def test_calibration_from_bench_json_changes_the_estimate(tmp_path):
    rows = [{"engine": "dejavu", "stages": 1, "batch": b, "ttft_s": t, "tpot_s": p}
            for b, t, p in ((1, 0.05, 0.006), (16, 0.1, 0.011), (64, 0.2, 0.015))]
    rows.append({"engine": "transformers", "stages": 1, "batch": 1, "ttft_s": 9.0, "tpot_s": 9.0})  # ignored
    measured = tmp_path / "bench.json"
    measured.write_text(json.dumps({"model": "olmoe-1b-7b", "prompt_len": 128, "new_tokens": 128, "rows": rows}))
    args = ("--gpus", "2", "--rate", "4", "--mode", "colocated")
    analytic = run_plan(CONFIGS["olmoe-1b-7b"], *args)
    calibrated = run_plan(CONFIGS["olmoe-1b-7b"], *args, "--measured", str(measured))
    a, c = analytic["candidates"][0], calibrated["candidates"][0]
    assert c["decode_tok_s"] < a["decode_tok_s"] / 2 and c["tpot_s"] > 2 * a["tpot_s"] and c["max_rate"] < a["max_rate"]
    cal = calibrated["calibration"]
    assert [b for b, _ in cal["dec"]] == [1, 16, 64] and [n for n, _ in cal["pre"]] == [128, 2048, 8192]
    m = model_of(CONFIGS["olmoe-1b-7b"])  # the calibrated whole model reproduces the measured TPOT
    costs = plan.Costs(m, plan.Hardware(80.0), cal)
    assert costs.stages([m.L], 16, 128 + 64, "dec")[0] == pytest.approx(0.011)


@pytest.mark.parametrize("extra,message", [
    (("--model-config", "no/such/config.json"), "no such file"),
    (("--model-config", "BAD"), "config has no 'hidden_size'"),
    (("--model-config", str(CONFIGS["olmoe-1b-7b"]), "--rate", "-3"), "--rate -3: must be a positive number"),
    (("--model-config", str(CONFIGS["olmoe-1b-7b"]), "--gpu-mem", "4"), "no split over 2 GPU(s)"),
    (("--model-config", str(CONFIGS["olmoe-1b-7b"]), "--measured", "no/such.json"), "--measured no/such.json: no such file"),
])
def test_plan_bad_input_is_one_line(tmp_path, capsys, extra, message):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model_type": "olmoe", "num_hidden_layers": 4}))
    assert plan.main(["--gpus", "2", "--rate", "1", *(x.replace("BAD", str(bad)) for x in extra)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


# -- bench_serve.py ----------------------------------------------------------------------------------
def test_trace_is_poisson_with_clipped_lengths():
    rate, n = 5.0, 20000
    trace = bench_serve.make_trace(n, rate, vocab=50, max_prompt=64, max_output=16, seed=3, scale=0.05)
    t = [r["arrival_s"] for r in trace]
    assert all(b > a for a, b in zip(t, t[1:])) and t[0] > 0
    gaps = [t[0]] + [b - a for a, b in zip(t, t[1:])]
    assert statistics.mean(gaps) == pytest.approx(1 / rate, rel=0.03)
    assert statistics.stdev(gaps) == pytest.approx(1 / rate, rel=0.05)  # exponential: sd = mean
    prompts, outputs = [len(r["input_ids"]) for r in trace], [r["max_new_tokens"] for r in trace]
    assert min(prompts) >= 1 and max(prompts) == 64 and min(outputs) >= 1 and max(outputs) == 16
    assert all(3 <= x < 50 for r in trace[:100] for x in r["input_ids"])
    assert statistics.median(prompts) == pytest.approx(math.exp(bench_serve.PROMPT_LOGN[0]) * 0.05, rel=0.1)
    assert bench_serve.make_trace(5, rate, 50, 64, 16, seed=3) == bench_serve.make_trace(5, rate, 50, 64, 16, seed=3)


def test_metrics_and_percentiles():
    assert bench_serve.percentile([4, 1, 3, 2], 50) == 2.5 and bench_serve.percentile([], 50) is None
    outs = [{"output_ids": [1, 2, 3], "timings": {"first_token_s": 0.1, "total_s": 0.5, "kv_bytes": 10,
                                                  "kv_transfer_s": 0.01, "kv_after_prefill_s": 0.002}},
            {"output_ids": [1], "timings": {"first_token_s": 0.2, "total_s": 0.2, "kv_bytes": 30,
                                            "kv_transfer_s": 0.03, "kv_after_prefill_s": 0.004}},
            {"line": 3, "id": "x", "error": "bad"}]
    m = bench_serve.metrics(outs, {"generate_s": 2.0})
    assert (m["completed"], m["failed"], m["output_tokens"], m["throughput_tok_s"]) == (2, 1, 4, 2.0)
    assert m["tpot_s"]["p50"] == pytest.approx(0.2) and m["ttft_s"]["p50"] == pytest.approx(0.15)
    assert m["kv"]["kv_bytes"] == 20 and m["kv"]["kv_after_prefill_s"] == pytest.approx(0.003)


def test_bench_serve_cpu_end_to_end(tmp_path):
    out = tmp_path / "serve.json"
    argv = ["--family", "qwen2_moe", "--nproc", "2", "--prompt-stages", "1", "--n", "8", "--rate", "10", "--scale", "0.03",
            "--max-prompt", "24", "--max-output", "6", "--seed", "1", "--out", str(out)]
    assert bench_serve.main(argv) == 0
    doc = json.loads(out.read_text())
    assert set(doc["modes"]) == {"colocated", "disaggregated"}
    for mode, m in doc["modes"].items():
        assert m["completed"] == 8 and m["failed"] == 0 and m["throughput_tok_s"] > 0
        for key in ("ttft_s", "tpot_s", "latency_s"):
            assert all(math.isfinite(m[key][q]) and m[key][q] >= 0 for q in ("p50", "p99")), (mode, key)
    kv = doc["modes"]["disaggregated"]["kv"]
    assert kv["kv_bytes"] > 0 and kv["kv_after_prefill_s"] >= 0 and "kv" not in doc["modes"]["colocated"]
    trace = [json.loads(x) for x in Path(doc["trace"]["file"]).read_text().splitlines()]
    assert len(trace) == 8 and all(1 <= r["max_new_tokens"] <= 6 and len(r["input_ids"]) <= 24 for r in trace)
    assert out.with_suffix(".png").stat().st_size > 10_000
