"""The opt-in device trace of a stage worker's steps (runtime/trace.py)."""
import json

import pytest
import torch

from dejavu_py.stage.trace import StepTrace


def test_a_trace_covers_the_window_of_steps_and_is_off_unless_asked(tmp_path, monkeypatch):
    assert StepTrace("s0").start == -1  # no variables: nothing recorded
    monkeypatch.setenv("DEJAVU_TRACE_DIR", str(tmp_path))
    monkeypatch.setenv("DEJAVU_TRACE_STEPS", "2:4")
    trace = StepTrace("s1")
    for steps in range(6):
        trace.at(steps)
        torch.ones(8).sum()
        assert (trace.prof is not None) == (2 <= steps < 4)
    assert "traceEvents" in json.loads((tmp_path / "s1.json").read_text())


def test_a_bad_window_says_what_to_write(monkeypatch):
    monkeypatch.setenv("DEJAVU_TRACE_DIR", "traces")
    monkeypatch.setenv("DEJAVU_TRACE_STEPS", "100")
    with pytest.raises(SystemExit, match="DEJAVU_TRACE_STEPS='100': expected FIRST:LAST"):
        StepTrace("s0")
