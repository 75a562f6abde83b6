"""A stage's decode step runs the stage's own code and the leaves under it, nothing of another process:
one step through a worker's loop, in process on a tiny model, under a profiler that notes every
Python function of the package that runs."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from make_checkpoint import make_checkpoint
from stage_harness import decode, make_worker, prefill, put

import dejavu_py
from dejavu_py.protocol.layout import COORD
from dejavu_py.protocol.plan import Stop

PACKAGE = Path(dejavu_py.__file__).resolve().parent
STAGE_SIDE = {"stage", "models", "comm", "protocol"}
"""Folders a stage's step may run code of."""
LEAVES = {"timing.py", "log.py", "errors.py"}
"""Top-level modules it may run code of (config.py is read, never run, on the way)."""


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ck") / "m", family="qwen3_moe", seed=5, tokenizer=False)


def package_files_run(fn) -> set[str]:
    """The files of the package (relative to it) whose Python functions ran during ``fn()`` on this thread."""
    seen: set[str] = set()

    def profile(frame, event, arg) -> None:
        if event == "call":
            seen.add(frame.f_code.co_filename)

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    out = set()
    for name in seen:
        path = Path(name).resolve()
        if path.is_relative_to(PACKAGE):
            out.add(path.relative_to(PACKAGE).as_posix())
    return out


def outside_the_stage(files: set[str]) -> set[str]:
    return {f for f in files if f.split("/")[0] not in STAGE_SIDE and f not in LEAVES}


@pytest.mark.parametrize("name", ["s0", "s1"], ids=["first-stage", "last-stage"])
def test_a_decode_step_runs_only_the_stage_s_code(ckpt, tmp_path, name):
    """Fault tolerance on and running ahead (the defaults), so their parts are in the step."""
    w, log = make_worker(ckpt, tmp_path, name=name)
    put(w, prefill(0))
    w.inbox.put((COORD, Stop(forward=False), None))
    assert w.serve() == 1  # the prompt first, untraced: the decode step is what is looked at
    w.stopped = False
    put(w, decode(1))
    w.inbox.put((COORD, Stop(forward=False), None))
    steps: list[int] = []
    ran = package_files_run(lambda: steps.append(w.serve()))
    assert steps == [1] and len(log) > 0
    assert {"stage/loop.py", "stage/runner.py", "stage/stage_ft.py", "stage/ahead.py"} <= ran
    assert any(f.startswith("models/") for f in ran)  # the profiler saw the step's model code
    assert outside_the_stage(ran) == set(), f"a stage's decode step ran code of {sorted(outside_the_stage(ran))}"


def test_the_scope_check_names_files_of_other_processes():
    ran = {"stage/loop.py", "models/qwen3.py", "comm/edge.py", "log.py", "coordinator/scheduler.py", "runtime/rank.py",
           "config.py"}
    assert outside_the_stage(ran) == {"coordinator/scheduler.py", "runtime/rank.py", "config.py"}
