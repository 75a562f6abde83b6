"""The opt-in device trace of a stage worker's steps (stage/trace.py), asked for with --trace-dir and
--trace-steps."""
import json

import pytest
import torch

from dejavu_py import cli
from dejavu_py.config import RuntimeConfig
from dejavu_py.errors import UserError
from dejavu_py.stage.trace import StepTrace


def test_a_trace_covers_the_window_of_steps_and_is_off_unless_asked(tmp_path):
    assert StepTrace("s0", RuntimeConfig()).start == -1  # no flags: nothing recorded
    run, _ = cli.parse(["--model", "m", "--prompts", "p", "--trace-dir", str(tmp_path), "--trace-steps", "2:4"])
    trace = StepTrace("s1", run.runtime)
    for steps in range(6):
        trace.at(steps)
        torch.ones(8).sum()
        assert (trace.prof is not None) == (2 <= steps < 4)
    assert "traceEvents" in json.loads((tmp_path / "s1.json").read_text())


@pytest.mark.parametrize("flags, message", [
    (["--trace-steps", "100"], "--trace-steps: '100': expected FIRST:LAST step numbers, e.g. 100:120"),
    (["--trace-steps", "120:100"], "--trace-steps 120:100: FIRST must be 0 or more and less than LAST"),
    ([], "--trace-dir and --trace-steps go together"),
])
def test_a_bad_window_says_what_to_write(flags, message):
    with pytest.raises(UserError, match=message):
        cli.parse(["--model", "m", "--prompts", "p", "--trace-dir", "traces", *flags])
