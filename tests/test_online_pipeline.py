"""Online serving from real stage processes (torchrun, tests/online_rank.py): rank 0 starts its front-end
(here tests/online_relay.py, which lets the test speak for it) and serves the batch command's exact
tokens, through a stage's death, a cancellation and SIGTERM."""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

from e2e import ROOT, env, mixed_requests, run_pipeline, write_requests
from make_checkpoint import make_checkpoint
from online_harness import Client

from dejavu_py.comm.local_link import LinkAddress
from dejavu_py.comm.store import free_port
from dejavu_py.config import (
    CacheConfig,
    GenerationConfig,
    PipelineConfig,
    RunConfig,
    RuntimeConfig,
    SchedulerConfig,
    ServeConfig,
)
from dejavu_py.protocol.serving import Cancel, EngineState, ServerInfo, Submit, Tokens


def serve_config(ckpt: Path, run_dir: Path, port: int) -> RunConfig:
    """configs/tiny-cpu.yaml's settings, serving online through the relay (tests/online_relay.py)."""
    return RunConfig(
        model=ckpt, prompts=None, run_dir=run_dir,
        pipeline=PipelineConfig(device="cpu", dtype="float32", threads=1),
        scheduler=SchedulerConfig(max_batch_size=4, max_batch_tokens=512),
        cache=CacheConfig(capacity_tokens=4096, block_size=8),
        generation=GenerationConfig(max_new_tokens=32),
        runtime=RuntimeConfig(comm_timeout_s=60, startup_timeout_s=120, progress=False),
        serve=ServeConfig(enabled=True, port=port, served_model_name="tiny", frontend_module="online_relay"),
    )


def start_serving(cfg: RunConfig, nproc: int) -> tuple[subprocess.Popen, Client]:
    """torchrun with tests/online_rank.py; the test's client connected through the relay."""
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "cfg.pkl").write_bytes(pickle.dumps(cfg))
    e = env()
    e["PYTHONPATH"] = f"{ROOT / 'tests'}{os.pathsep}{e['PYTHONPATH']}"
    e["DEJAVU_TEST_RELAY_FILE"] = str(cfg.run_dir / "relay.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--monitor-interval=0.1", str(ROOT / "tests/online_rank.py"), str(cfg.run_dir / "cfg.pkl")]
    console = open(cfg.run_dir / "console.txt", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=console, stderr=subprocess.STDOUT, start_new_session=True)
    relay = cfg.run_dir / "relay.json"
    deadline = time.monotonic() + 120
    while not relay.exists():
        assert proc.poll() is None and time.monotonic() < deadline, (cfg.run_dir / "console.txt").read_text()[-3000:]
        time.sleep(0.05)
    doc = json.loads(relay.read_text())
    assert doc["args"] == {"--link": doc["args"]["--link"], "--host": "127.0.0.1", "--port": str(cfg.serve.port),
                           "--checkpoint": str(cfg.model), "--max-waiting": "1024", "--log-level": "info",
                           "--served-model-name": "tiny"}
    return proc, Client(LinkAddress(doc["host"], doc["port"], doc["key"]))


def as_submit(r: dict) -> Submit:
    """A request file's line as a front-end submits it."""
    return Submit(r["id"], r["input_ids"], r["max_new_tokens"], r.get("temperature", 0.0), r.get("top_p", 1.0),
                  r.get("top_k", 0), r.get("seed"), tuple(r.get("stop_token_ids", ())), r.get("ignore_eos", False))


def stream_of(c: Client, rid: str, since: int = 0) -> list[int]:
    """The tokens of ``rid`` heard from log position ``since`` on, checked to come in order, each once."""
    out: list[int] = []
    for m in c.log[since:]:
        if isinstance(m, Tokens):
            for r, i, toks in m.items:
                if r == rid:
                    assert i == len(out), f"{rid}: tokens from {i}, {len(out)} heard"
                    out += toks
    return out


def test_serving_from_stage_processes_matches_the_batch_command(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ck", family="olmoe", seed=5)
    reqs = mixed_requests(5, 384, seed=61) + [{**r, "id": f"s{i}"} for i, r in
                                              enumerate(mixed_requests(4, 384, seed=62, sampled=True))]
    reqs[1]["ignore_eos"] = True
    reqs[2]["stop_token_ids"] = [7, 9]
    del reqs[6]["seed"]  # derived from the run's seed and its id, the same way by both
    batch = run_pipeline(ckpt, write_requests(tmp_path / "req.jsonl", reqs), tmp_path / "batch", 2)
    proc, c = start_serving(serve_config(ckpt, tmp_path / "serve", free_port()), 2)
    try:
        info = c.until(lambda m: True)
        assert isinstance(info, ServerInfo) and info.model == "tiny" and info.max_model_len == 256
        assert info.max_prompt_tokens == 255 and info.eos_token_ids == (2,) and info.default_max_tokens == 32
        c.until(lambda m: isinstance(m, EngineState) and m.serving, timeout_s=120)
        start = len(c.log)
        for r in reqs:
            c.send(as_submit(r))
        for r in reqs:  # the same tokens as the batch command's, streamed in order
            end = c.finished(r["id"]).record
            assert end["output_ids"] == batch[r["id"]]["output_ids"] == stream_of(c, r["id"], start), r["id"]
            assert end["finish_reason"] == batch[r["id"]]["finish_reason"]
            assert "text" in batch[r["id"]] and "text" not in end  # the front-end detokenizes

        start = len(c.log)  # again, with stage s1 killed while they stream: its replacement takes over
        for r in reqs:
            c.send(as_submit(r))
        c.until(lambda m: isinstance(m, Tokens))
        workers = json.loads((tmp_path / "serve" / "workers.json").read_text())["workers"]
        os.kill(next(w["pid"] for w in workers if w["name"] == "s1"), signal.SIGKILL)
        for r in reqs:
            end = c.finished(r["id"]).record
            assert end["output_ids"] == batch[r["id"]]["output_ids"] == stream_of(c, r["id"], start), r["id"]
        after = c.until(lambda m: isinstance(m, EngineState) and m.counters["recoveries_total"], timeout_s=60)
        assert after.counters["recoveries_total"] == {("crash", "cold"): 1} and after.serving
        (seconds,) = after.counters["recovery_seconds"]
        assert seconds > 0 and "replay_s" in after.counters["recovery_phase_seconds"]
        states = [m for m in c.log[start:] if isinstance(m, EngineState)]
        assert any(m.recovering for m in states) and all(m.serving for m in states)  # paused, never down

        c.send(Submit("too-long", [5] * 256, 4))
        assert "256 tokens" in c.finished("too-long").record["error"]

        c.send(Submit("cancel-me", [5, 6, 7], 200, ignore_eos=True))
        c.until(lambda m: isinstance(m, EngineState) and m.running == 1 and m.counters["kv_blocks_used"] > 0)
        c.send(Cancel("cancel-me"))
        end = c.finished("cancel-me").record
        assert end["finish_reason"] == "abort" and 0 < len(end["output_ids"]) < 200
        idle = c.until(lambda m: isinstance(m, EngineState) and m.running == 0)
        assert idle.counters["kv_blocks_used"] == 0 and idle.counters["workers"] == {"ready": 2}

        c.send(Submit("last", [5, 6, 7], 40, ignore_eos=True))  # in flight when rank 0 is told to stop
        c.until(lambda m: isinstance(m, Tokens) and any(r == "last" for r, _, _ in m.items))
        coordinator = json.loads((tmp_path / "serve" / "workers.json").read_text())["coordinator_pid"]
        os.kill(coordinator, signal.SIGTERM)
        assert len(c.finished("last").record["output_ids"]) == 40  # finished, not cut short
        assert proc.wait(timeout=60) == 0, (tmp_path / "serve" / "console.txt").read_text()[-3000:]
        journal = (tmp_path / "serve" / "journal.jsonl").read_text().splitlines()
        assert {json.loads(x)["type"] for x in journal} == {"start", "member_lost"}  # no request is journaled
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
