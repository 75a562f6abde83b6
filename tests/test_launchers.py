"""The launchers people use: the README's demo script (in CI), and mpirun, which must give the same
outputs as torchrun on the same run."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
from e2e import ROOT, env, logs_of, mixed_requests, run_pipeline, write_requests
from make_checkpoint import make_checkpoint

VOCAB = 384
BIN = os.path.dirname(sys.executable)
MPIRUN = shutil.which("mpirun", path=BIN + os.pathsep + os.environ.get("PATH", ""))
HAVE_MPI4PY = importlib.util.find_spec("mpi4py") is not None


def test_demo_kills_a_worker_and_shows_the_recovery(tmp_path):
    demo = tmp_path / "demo"
    proc = subprocess.run(["bash", "launch/demo.sh"], cwd=ROOT, env={**env(), "DEMO_DIR": str(demo)},
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "== recovery of s" in proc.stdout and "phases (s): detect" in proc.stdout
    assert "all four runs gave the same 40 outputs: True" in proc.stdout
    doc = json.loads((demo / "bench-ft.json").read_text())
    assert {r: v["requests_lost"] for r, v in doc["runs"].items()} == dict.fromkeys(doc["runs"], 0)
    assert len(doc["runs"]["ft-on+faults"]["faults"]) == 1 and doc["runs"]["ft-on+faults"]["recoveries"]
    assert (demo / "bench-ft.md").exists() and (demo / "bench-ft.png").exists()


@pytest.mark.skipif(MPIRUN is None or not HAVE_MPI4PY,
                    reason="mpirun or mpi4py missing: pip install -e '.[mpi]' (Open MPI and mpi4py wheels) to run it")
def test_mpirun_gives_the_torchrun_outputs(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ck", family="qwen3_moe", seed=4)
    reqs = mixed_requests(10, VOCAB, seed=51) + [{**r, "id": f"s{i}"} for i, r in
                                                 enumerate(mixed_requests(4, VOCAB, seed=52, sampled=True))]
    rf = write_requests(tmp_path / "req.jsonl", reqs)
    ref = run_pipeline(ckpt, rf, tmp_path / "torchrun", 3)
    run = tmp_path / "mpirun"
    args = ["--config", str(ROOT / "configs/tiny-cpu.yaml"), "--model", str(ckpt), "--prompts", str(rf),
            "--output", str(run / "out.jsonl"), "--run-dir", str(run)]
    e = {**env(), "PATH": BIN + os.pathsep + os.environ.get("PATH", "")}
    proc = subprocess.run(["bash", "launch/mpirun.sh", "3", *args], cwd=ROOT, env=e, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}\n{logs_of(run)}"
    outs = {r["id"]: r["output_ids"] for r in map(json.loads, (run / "out.jsonl").read_text().splitlines())}
    assert outs == {k: v["output_ids"] for k, v in ref.items()}
    workers = json.loads((run / "workers.json").read_text())["workers"]
    assert sorted(w["rank"] for w in workers) == [0, 1, 2]
