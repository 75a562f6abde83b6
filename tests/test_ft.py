"""Fault tolerance on real processes: signals sent from outside by PID (tools/inject_fault.py), outputs
compared with the failure-free run, survivors keep their PIDs, recoveries are recorded phase by phase."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from e2e import (
    ROOT,
    env,
    finish,
    mixed_requests,
    run_pipeline,
    start_pipeline,
    wait_for_workers,
    write_requests,
)
from make_checkpoint import make_checkpoint

from dejavu_py.stage import replica_shm

VOCAB = 384
PHASES = ("detect_s", "replace_s", "load_s", "rebuild_s", "restore_s", "replay_s")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ck") / "olmoe", family="olmoe", seed=5)


@pytest.fixture(scope="module")
def workload(tmp_path_factory, ckpt):
    """Greedy and seeded-sampling requests arriving over ~1.5 s, and their failure-free outputs."""
    d = tmp_path_factory.mktemp("ref")
    reqs = mixed_requests(16, VOCAB, seed=41) + [{**r, "id": f"s{i}"} for i, r in
                                                  enumerate(mixed_requests(8, VOCAB, seed=42, sampled=True))]
    for i, r in enumerate(reqs):
        r["arrival_s"] = 0.06 * i
        r["max_new_tokens"] = max(r["max_new_tokens"], 12)
    rf = write_requests(d / "req.jsonl", reqs)
    ref = run_pipeline(ckpt, rf, d / "colocated", 3)
    return rf, ids(ref)


def ids(outs: dict) -> dict:
    return {k: v.get("output_ids", v.get("error")) for k, v in outs.items()}


def inject(run_dir, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "tools/inject_fault.py"), "--run-dir", str(run_dir), *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env(), stderr=subprocess.PIPE, text=True)


def faults(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "faults.jsonl").read_text().splitlines()]


def recoveries(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "recoveries.jsonl").read_text().splitlines()]


def pids(run_dir) -> dict[str, int]:
    return {w["name"]: w["pid"] for w in json.loads((run_dir / "workers.json").read_text())["workers"]}


def run_with_faults(ckpt, rf, run_dir, nproc: int, fault_args: list[list[str]], *extra: str):
    proc = start_pipeline(ckpt, rf, run_dir, nproc, *extra)
    wait_for_workers(run_dir)
    before = pids(run_dir)
    injectors = [inject(run_dir, *a) for a in fault_args]
    outs = finish(proc, run_dir)
    for i in injectors:
        assert i.wait(timeout=60) == 0, i.stderr.read()
    return outs, before, pids(run_dir)


@pytest.mark.parametrize("victim", ["s0", "s1", "s2"])
def test_kill_a_stage_at_a_chosen_step(ckpt, workload, tmp_path, victim):
    """Replicas in shared-memory files (the default) for s0 and s2; for s1 in pinned memory, every
    byte over the replica edge (--replica-shm-dir off). s2's run decodes on the static (graph) path,
    whose replica chunks are the K/V each step recorded, not read back from the cache."""
    rf, ref = workload
    run = tmp_path / "run"
    shared = victim != "s1"
    extra = () if shared else ("--replica-shm-dir", "off")
    extra += ("--cuda-graphs", "on") if victim == "s2" else ()
    outs, before, after = run_with_faults(ckpt, rf, run, 3, [["--name", victim, "--after-tokens", "120"]], *extra)
    assert ids(outs) == ref
    hit = faults(run)
    assert [f["name"] for f in hit] == [victim] and hit[0]["pid"] == before[victim] and hit[0]["signal"] == "kill"
    assert after[victim] != before[victim]
    assert {k: v for k, v in after.items() if k != victim} == {k: v for k, v in before.items() if k != victim}
    rec = recoveries(run)
    assert len(rec) == 1 and rec[0]["failed"] == [victim] and "SIGKILL" in rec[0]["cause"]
    assert set(PHASES) <= set(rec[0]["phases"]) and rec[0]["kv_source"] == "replica"
    assert rec[0]["steps_recomputed"] <= 4 + 3  # --replica-lag + microbatches in flight
    assert rec[0]["routing_mismatches"] == 0
    # a stage sends its output at launch and its routing record when the step is finished: the steps a
    # kill catches in between (at most one per microbatch in flight) replay without a record to check
    assert rec[0]["steps_replayed_unrecorded"] <= 3
    # the failure is dated by its exit report, or by the victim's last heartbeat (at most 0.1 s early)
    dated = rec[0]["resumed_at"] - rec[0]["kill_to_next_token_s"]
    assert -0.25 < dated - hit[0]["time"] < rec[0]["phases"]["detect_s"] + 1.0
    stats = json.loads((run / "ft_stats.json").read_text())
    assert stats["stages"]["s0"]["checkpoints"] > 0 and stats["stages"]["s0"]["replica_chunks"] > 0
    assert (stats["stages"]["s0"]["replica_shm_chunks"] > 0) == shared
    logs = "".join(f.read_text() for f in (run / "logs").glob("*.log"))
    assert ("from their replica file" in logs) == shared
    if shared and os.path.isdir("/dev/shm"):  # the run removed its replica files
        assert not list(Path("/dev/shm").glob(f"dejavu-{replica_shm._run_tag(run)}-*"))


@pytest.mark.parametrize("victim", ["t0", "t1", "p0"])
def test_kill_in_disaggregated_pipelines(ckpt, workload, tmp_path, victim):
    rf, ref = workload
    run = tmp_path / "run"
    when = ["--after-tokens", "60"] if victim == "p0" else ["--after-tokens", "120"]
    outs, before, after = run_with_faults(ckpt, rf, run, 3, [["--name", victim, *when]], "--prompt-stages", "1")
    assert ids(outs) == ref
    assert {k: v for k, v in after.items() if k != victim} == {k: v for k, v in before.items() if k != victim}
    rec = recoveries(run)
    assert rec[0]["failed"] == [victim] and set(PHASES) <= set(rec[0]["phases"])


def test_hang_is_detected_and_replaced(ckpt, workload, tmp_path):
    rf, ref = workload
    run = tmp_path / "run"
    outs, before, after = run_with_faults(ckpt, rf, run, 3, [["--name", "s1", "--after-tokens", "100", "--signal", "stop"]],
                                          "--hang-timeout", "1.5")
    assert ids(outs) == ref
    rec = recoveries(run)[0]
    assert rec["failed"] == ["s1"] and "hung" in rec["cause"]
    assert rec["phases"]["detect_s"] < 1.5 + 1.0  # the hang timeout plus the watcher's polling
    assert after["s0"] == before["s0"] and after["s2"] == before["s2"]


def test_kill_during_a_recovery(ckpt, workload, tmp_path):
    rf, ref = workload
    run = tmp_path / "run"
    proc = start_pipeline(ckpt, rf, run, 3)
    wait_for_workers(run)
    first = inject(run, "--name", "s1", "--after-tokens", "100")
    assert first.wait(timeout=60) == 0
    deadline = time.time() + 20  # the moment the coordinator starts recovering, kill another stage
    while time.time() < deadline and not json.loads((run / "progress.json").read_text()).get("recovering"):
        time.sleep(0.005)
    second = inject(run, "--name", "s2")
    outs = finish(proc, run)
    assert second.wait(timeout=60) == 0, second.stderr.read()
    assert ids(outs) == ref
    failed = {m for r in recoveries(run) for m in r["failed"]}
    assert failed == {"s1", "s2"}


def test_two_kills_at_once_lose_a_replica(ckpt, workload, tmp_path):
    """s2 holds s1's replica: killing both leaves s1's KV nowhere; it is recomputed from the tokens."""
    rf, ref = workload
    run = tmp_path / "run"
    proc = start_pipeline(ckpt, rf, run, 3)
    workers = {w["name"]: w for w in wait_for_workers(run)["workers"]}
    deadline = time.time() + 30
    while time.time() < deadline:
        p = run / "progress.json"
        if p.exists() and json.loads(p.read_text())["tokens"] >= 120:
            break
        time.sleep(0.01)
    os.kill(workers["s1"]["pid"], signal.SIGKILL)
    os.kill(workers["s2"]["pid"], signal.SIGKILL)
    outs = finish(proc, run)
    assert ids(outs) == ref
    rec = recoveries(run)
    assert {m for r in rec for m in r["failed"]} == {"s1", "s2"}
    assert any("recomputed" in r.get("kv_source", "") for r in rec)


def test_whole_job_killed_and_rerun_resumes(ckpt, workload, tmp_path):
    rf, ref = workload
    run = tmp_path / "run"
    proc = start_pipeline(ckpt, rf, run, 2)
    wait_for_workers(run)
    journal = run / "journal.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and journal.read_text().count('"finished"') < 5:
        time.sleep(0.02)
    _kill_tree(proc.pid)
    proc.wait(timeout=30)
    done_before = journal.read_text().count('"finished"')
    assert 5 <= done_before < len(ref)
    outs = run_pipeline(ckpt, rf, run, 2)
    assert ids(outs) == ref
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from_journal"] == done_before
    starts = [json.loads(x) for x in journal.read_text().splitlines() if '"start"' in x]
    assert [s["attempt"] for s in starts] == [1, 2]


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (the whole job dies at once)."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        c, p = map(int, line.split())
        children.setdefault(p, []).append(c)
    todo, tree = [pid], []
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_ft_off_recomputes_everything_in_flight(ckpt, workload, tmp_path):
    """Fault tolerance off: the kill ends the attempt; torchrun restarts the job, which resumes from
    the journal and recomputes what was in flight from the prompts."""
    rf, ref = workload
    run = tmp_path / "run"
    run.mkdir()
    args = ["--config", str(ROOT / "configs/tiny-cpu.yaml"), "--model", str(ckpt), "--prompts", str(rf),
            "--output", str(run / "out.jsonl"), "--run-dir", str(run), "--ft", "off"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3", "--max-restarts=1",
           "--monitor-interval=0.1", "-m", "dejavu_py", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=open(run / "console.txt", "w"), stderr=subprocess.STDOUT)
    wait_for_workers(run)
    killer = inject(run, "--name", "s1", "--after-tokens", "120")
    assert proc.wait(timeout=240) == 0, (run / "console.txt").read_text()[-3000:]
    assert killer.wait(timeout=30) == 0
    outs = {r["id"]: r for r in map(json.loads, (run / "out.jsonl").read_text().splitlines())}
    assert ids(outs) == ref
    journal = [json.loads(x) for x in (run / "journal.jsonl").read_text().splitlines()]
    assert [e["attempt"] for e in journal if e["type"] == "start"] == [1, 2]
    assert any(e["type"] == "failed" and "fault tolerance is off" in e["cause"] for e in journal)
    assert not (run / "recoveries.jsonl").exists()


def test_standby_takes_over(ckpt, workload, tmp_path):
    rf, ref = workload
    run = tmp_path / "run"
    # One standby preloads the host's first stage (s0): kill that one, so that nothing is left to load.
    outs, before, after = run_with_faults(ckpt, rf, run, 3, [["--name", "s0", "--after-tokens", "120"]],
                                          "--standby", "1", "--standby-preload")
    assert ids(outs) == ref
    rec = recoveries(run)[0]
    assert rec["takeover"] is True and rec["phases"]["load_s"] < 0.05  # weights were already loaded
    assert "preloaded s0" in (run / "logs" / "rank0-standby0.0.log").read_text()


def test_inject_fault_says_what_is_wrong(tmp_path):
    missing = inject(tmp_path / "nowhere", "--name", "s0")
    assert missing.wait(timeout=30) == 2 and "nowhere" in missing.stderr.read()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "workers.json").write_text(json.dumps({"workers": [
        {"name": "s0", "role": "stage", "stage": 0, "rank": 0, "pid": 1}]}))
    nomatch = inject(tmp_path / "run", "--role", "token")
    assert nomatch.wait(timeout=30) == 2 and "no worker matches" in nomatch.stderr.read()
