"""tools/bench_ft_cost.py: the run order and the summary of FT off/on runs (the runs are benchmarks)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import bench_ft_cost  # noqa: E402


def test_each_mode_leads_a_pair_as_often_as_the_other():
    assert bench_ft_cost.order(1) == ["off", "on"]
    assert bench_ft_cost.order(4) == ["off", "on", "on", "off", "off", "on", "on", "off"]


def test_summary_ratios_are_on_over_off_of_medians_and_of_adjacent_pairs():
    toks = [("off", 100.0), ("on", 90.0), ("on", 99.0), ("off", 110.0), ("off", 105.0), ("on", 100.0)]
    got = bench_ft_cost.summarize([{"ft": m, "decode_tok_s": t} for m, t in toks])
    assert got["median_tok_s"] == {"off": 105.0, "on": 99.0}
    assert got["ratio_of_medians"] == pytest.approx(99 / 105)
    assert got["pair_ratios"] == pytest.approx([0.9, 0.9, 100 / 105])
    assert got["meets_target"] is False


def test_a_failed_run_is_reported_and_left_out_of_its_pair():
    runs = [{"ft": "off", "decode_tok_s": 100.0}, {"ft": "on", "error": "boom"},
            {"ft": "on", "decode_tok_s": 98.0}, {"ft": "off", "decode_tok_s": 100.0}]
    got = bench_ft_cost.summarize(runs)
    assert got["errors"] == ["boom"]
    assert got["pair_ratios"] == pytest.approx([0.98])
    assert got["meets_target"] is True


def test_the_split_tells_the_steps_after_the_prompts_from_the_steady_ones(tmp_path):
    import json

    import bench

    (tmp_path / "timeline-1.json").write_text(json.dumps({"step_ms": [300.0] + [9.0] * 29 + [6.0, 6.2, 6.1]}))
    split = bench.step_split(tmp_path)
    assert split == {"early_steps": 29, "early_ms": 261.0, "rest_steps": 3, "rest_median_ms": 6.1,
                     "early_step_ms": [9.0] * 29}
    runs = [{"ft": "off", "decode_tok_s": 100.0, "steps": {"early_ms": 200.0, "rest_median_ms": 6.0}},
            {"ft": "on", "decode_tok_s": 95.0, "steps": split}]
    got = bench_ft_cost.summarize(runs)
    assert got["early_extra_ms"] == 61.0 and got["steady_step_ratio"] == pytest.approx(6.0 / 6.1, abs=1e-4)
