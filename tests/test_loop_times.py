"""timing.LoopTimes: a batch run reports every step; a server keeps the latest steps only (its memory
stays bounded) while its step count and means still cover every step."""
from __future__ import annotations

import statistics

import pytest

from dejavu_py.config import ServeConfig
from dejavu_py.timing import LoopTimes


def _run(times: LoopTimes, steps: list[dict[str, float]]) -> LoopTimes:
    for step in steps:
        for phase, s in step.items():
            times.add(phase, s)
        times.end_step()
    return times


STEPS = [{"idle": 0.001 * (i % 7), "plan": 0.002} if i % 3 else {"plan": 0.010 + 0.001 * i} for i in range(50)]


def test_a_batch_run_keeps_every_step():
    times = _run(LoopTimes(), STEPS)
    assert times.kept == times.steps == 50
    assert times.step_ms() == [round(1e3 * sum(d.values()), 3) for d in STEPS]
    got = times.per_step_ms()
    assert got["steps"] == 50
    for phase in ("idle", "plan"):
        values = [d.get(phase, 0.0) for d in STEPS]
        assert got[f"{phase}_ms"] == round(1e3 * statistics.median(values), 4)
        assert got["mean"][f"{phase}_ms"] == round(1e3 * statistics.fmean(values), 4)


def test_a_server_keeps_the_latest_steps_and_means_over_all():
    times = _run(LoopTimes(keep=8), STEPS)
    assert times.steps == 50 and times.kept == 8
    assert times.step_ms() == [round(1e3 * sum(d.values()), 3) for d in STEPS[-8:]]
    got = times.per_step_ms()
    assert got["steps"] == 50
    for phase in ("idle", "plan"):
        latest = [d.get(phase, 0.0) for d in STEPS[-8:]]
        every = [d.get(phase, 0.0) for d in STEPS]
        assert got[f"{phase}_ms"] == round(1e3 * statistics.median(latest), 4)
        assert got["mean"][f"{phase}_ms"] == pytest.approx(round(1e3 * statistics.fmean(every), 4), abs=1e-4)


def test_a_phase_only_in_older_steps_still_has_its_mean():
    times = _run(LoopTimes(keep=2), [{"prefill": 0.5}, {"idle": 0.1}, {"idle": 0.1}])
    got = times.per_step_ms()
    assert got["prefill_ms"] == 0.0 and got["mean"]["prefill_ms"] == round(1e3 * 0.5 / 3, 4)


def test_keep_must_be_positive():
    with pytest.raises(ValueError, match="keep=0"):
        LoopTimes(keep=0)


def test_only_a_server_bounds_its_history():
    assert ServeConfig().kept_history() is None  # a batch run: every step and sample
    assert ServeConfig(enabled=True, history=5).kept_history() == 5
