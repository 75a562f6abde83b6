"""Helpers for end-to-end tests: checkpoints, request files, real torchrun runs, transformers references."""
from __future__ import annotations

import functools
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN_TIMEOUT_S = 240


def write_requests(path: Path, requests: list[dict], extra_lines: tuple[str, ...] = ()) -> Path:
    lines = [json.dumps(r) for r in requests] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def mixed_requests(n: int, vocab: int, seed: int, sampled: bool = False, max_prompt: int = 40) -> list[dict]:
    """Prompts of mixed lengths and mixed max_new_tokens; optionally seeded sampling settings."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        r = {
            "id": f"r{i}",
            "input_ids": [rng.randrange(3, vocab) for _ in range(rng.randint(1, max_prompt))],
            "max_new_tokens": rng.randint(1, 24),
        }
        if sampled:
            r.update(temperature=rng.choice([0.7, 1.0, 1.3]), top_p=rng.choice([1.0, 0.9]), top_k=rng.choice([0, 20]), seed=rng.randrange(1 << 40))
        out.append(r)
    return out


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def torchrun(nproc: int, args: list[str], timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--monitor-interval=0.1", "-m", "dejavu_py", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)


def dejavu(args: list[str], timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    """``python -m dejavu_py ARGS`` (the front end that checks inputs before launching)."""
    cmd = [sys.executable, "-m", "dejavu_py", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)


def logs_of(run_dir: Path) -> str:
    parts = []
    for f in sorted((run_dir / "logs").glob("*.log")) if (run_dir / "logs").exists() else []:
        parts.append(f"--- {f.name}\n{f.read_text()[-3000:]}")
    return "\n".join(parts)


def run_pipeline(ckpt: Path, requests_file: Path, run_dir: Path, nproc: int, *extra: str) -> dict[str, dict]:
    """Run the pipeline under torchrun and return the output records by id (fails with the logs)."""
    out = run_dir / "out.jsonl"
    args = ["--config", str(ROOT / "configs/tiny-cpu.yaml"), "--model", str(ckpt), "--prompts", str(requests_file),
            "--output", str(out), "--run-dir", str(run_dir), *extra]
    proc = torchrun(nproc, args)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstderr:\n{proc.stderr[-4000:]}\n{logs_of(run_dir)}"
    return {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}


@functools.lru_cache(maxsize=8)
def hf_model(ckpt: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()


def hf_greedy(ckpt: Path, request: dict, eos: list[int]) -> list[int]:
    """transformers' generate (greedy) for one request: the reference output ids."""
    import torch

    model = hf_model(str(ckpt))
    ids = torch.tensor([request["input_ids"]])
    stop = list(eos) + list(request.get("stop_token_ids", []))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=request["max_new_tokens"], do_sample=False, eos_token_id=stop or None,
                             pad_token_id=0, attention_mask=torch.ones_like(ids))
    gen = out[0, ids.shape[1]:].tolist()
    for i, t in enumerate(gen):  # generate pads after a stop; keep through the stop token
        if t in stop:
            return gen[: i + 1]
    return gen


def eos_ids(ckpt: Path) -> list[int]:
    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        p = ckpt / name
        if p.exists():
            v = json.loads(p.read_text()).get("eos_token_id")
            ids.update([v] if isinstance(v, int) else (v or []))
    return sorted(ids)


def start_pipeline(ckpt: Path, requests_file: Path, run_dir: Path, nproc: int, *extra: str) -> subprocess.Popen:
    """Start a torchrun job in the background (for fault tests); its output goes to run_dir/console.txt."""
    run_dir.mkdir(parents=True, exist_ok=True)
    args = ["--config", str(ROOT / "configs/tiny-cpu.yaml"), "--model", str(ckpt), "--prompts", str(requests_file),
            "--output", str(run_dir / "out.jsonl"), "--run-dir", str(run_dir), *extra]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--monitor-interval=0.1", "-m", "dejavu_py", *args]
    console = open(run_dir / "console.txt", "w")
    return subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=console, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_workers(run_dir: Path, timeout: float = 120) -> dict:
    """workers.json once every worker is up."""
    import time

    deadline = time.time() + timeout
    path = run_dir / "workers.json"
    while time.time() < deadline:
        if path.exists():
            return json.loads(path.read_text())
        time.sleep(0.05)
    console = run_dir / "console.txt"
    raise TimeoutError(f"no {path} after {timeout}s\n{console.read_text()[-4000:] if console.exists() else ''}\n{logs_of(run_dir)}")


def finish(proc: subprocess.Popen, run_dir: Path, timeout: float = RUN_TIMEOUT_S) -> dict[str, dict]:
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:  # take the whole job down (it runs in its own session) and show why
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"no exit after {timeout}s\n{(run_dir / 'console.txt').read_text()[-4000:]}\n"
                             f"{logs_of(run_dir)}") from None
    console = (run_dir / "console.txt").read_text()
    assert code == 0, f"exit {code}\n{console[-4000:]}\n{logs_of(run_dir)}"
    return {r["id"]: r for r in map(json.loads, (run_dir / "out.jsonl").read_text().splitlines())}
