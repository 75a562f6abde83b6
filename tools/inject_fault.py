#!/usr/bin/env python3
"""Inject real failures into a running dejavu_py job: signals sent from outside, by PID.

    python tools/inject_fault.py --run-dir runs/x --role token --stage 1 --after-tokens 200 --signal kill
    python tools/inject_fault.py --run-dir runs/x --role any --mtbf 5 --count 3 --seed 1
    python tools/inject_fault.py --run-dir runs/x --name s1 --after-seconds 2 --signal stop --resume-after 3

Targets come from RUN_DIR/workers.json (re-read before every injection, so a replaced worker is hit
under its new PID): --role prompt|token|stage|any, --stage N (index within its pipeline), --rank R,
or --name (e.g. t1). When: --after-tokens N (progress read from RUN_DIR/progress.json),
--after-seconds S (from when the workers are up), or --mtbf S (exponential gaps from --seed, --count
times). The fault: --signal kill (SIGKILL), term (SIGTERM) or stop (SIGSTOP: a hang; --resume-after S
sends SIGCONT). Each injection is appended to RUN_DIR/faults.jsonl (time, pid, name, role, stage,
signal). The script exits when its faults are done or the run ends.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

SIGNALS = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "stop": signal.SIGSTOP}


class Fail(Exception):
    """A one-line problem with the arguments or the run directory."""


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not yet written, or being replaced
        return None


def run_over(run_dir: Path) -> bool:
    """The job is finished for good ("ended" means an attempt ended and a restart may follow)."""
    return (read_json(run_dir / "workers.json") or {}).get("status") in ("done", "failed")


def wait_for(cond, run_dir: Path, timeout_s: float, what: str) -> bool:
    """Poll ``cond`` until true; False when the run ended first."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if cond():
            return True
        if run_over(run_dir):
            return False
        time.sleep(0.02)
    raise Fail(f"timed out after {timeout_s:.0f}s waiting for {what}")


def pick(workers: list[dict], a: argparse.Namespace, rng: random.Random) -> dict:
    cands = [w for w in workers
             if (a.role == "any" or w["role"] == a.role) and (a.stage is None or w["stage"] == a.stage)
             and (a.rank is None or w["rank"] == a.rank) and (a.name is None or w["name"] == a.name)]
    if not cands:
        have = ", ".join(f"{w['name']} ({w['role']} stage {w['stage']}, rank {w['rank']})" for w in workers)
        raise Fail(f"no worker matches --role {a.role} --stage {a.stage} --rank {a.rank} --name {a.name}; the run has {have}")
    return rng.choice(cands)


def inject(run_dir: Path, target: dict, sig: str, resume_after: float | None) -> dict:
    os.kill(target["pid"], SIGNALS[sig])  # ProcessLookupError: handled by the caller
    entry = {"time": time.time(), "pid": target["pid"], "name": target["name"], "role": target["role"],
             "stage": target["stage"], "rank": target["rank"], "signal": sig}
    with open(run_dir / "faults.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")
    print(f"inject_fault: {sig} {target['name']} (pid {target['pid']})", file=sys.stderr, flush=True)
    if sig == "stop" and resume_after is not None:
        time.sleep(resume_after)
        try:
            os.kill(target["pid"], signal.SIGCONT)
        except ProcessLookupError:  # killed meanwhile (e.g. found hung and replaced)
            pass
    return entry


def schedule(a: argparse.Namespace, rng: random.Random) -> list[tuple[str, float]]:
    """(kind, amount) of each injection: tokens to reach, or seconds to wait."""
    if a.mtbf is not None:
        return [("gap", rng.expovariate(1.0 / a.mtbf)) for _ in range(a.count)]
    if a.after_tokens is not None:
        return [("tokens", a.after_tokens)]
    return [("seconds", a.after_seconds or 0.0)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", type=Path, required=True, help="the job's --run-dir (holds workers.json)")
    p.add_argument("--role", default="any", choices=["prompt", "token", "stage", "any"], help="which kind of worker (default any)")
    p.add_argument("--stage", type=int, help="stage index within its pipeline")
    p.add_argument("--rank", type=int, help="rank whose worker to hit")
    p.add_argument("--name", help="worker name as in workers.json (s1, p0, t2)")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--after-tokens", type=int, help="inject once the run has generated this many tokens")
    when.add_argument("--after-seconds", type=float, help="inject this long after the workers are up")
    when.add_argument("--mtbf", type=float, help="mean seconds between failures (exponential), with --count")
    p.add_argument("--count", type=int, default=1, help="failures to inject with --mtbf (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed for --mtbf gaps and target choice (default 0)")
    p.add_argument("--signal", default="kill", choices=sorted(SIGNALS), help="kill, term or stop (default kill)")
    p.add_argument("--resume-after", type=float, help="with --signal stop: send SIGCONT after this many seconds")
    p.add_argument("--timeout", type=float, default=600, help="give up after this many seconds (default 600)")
    a = p.parse_args(argv)
    try:
        return run(a)
    except Fail as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(a: argparse.Namespace) -> int:
    if not a.run_dir.is_dir():
        raise Fail(f"--run-dir {a.run_dir}: no such directory (start the job first; it creates it)")
    rng = random.Random(a.seed)
    workers_file = a.run_dir / "workers.json"
    if not wait_for(lambda: read_json(workers_file) is not None, a.run_dir, a.timeout, f"{workers_file}"):
        return 0
    for kind, amount in schedule(a, rng):
        if kind == "tokens":
            ok = wait_for(lambda: (read_json(a.run_dir / "progress.json") or {}).get("tokens", 0) >= amount,
                          a.run_dir, a.timeout, f"{amount} tokens")
        else:
            t_end = time.time() + amount
            ok = wait_for(lambda: time.time() >= t_end, a.run_dir, a.timeout, f"{amount:.1f}s")
        if not ok:
            print("inject_fault: the run ended first", file=sys.stderr)
            return 0
        for attempt in range(20):  # the target may be mid-replacement: workers.json is rewritten after it
            if run_over(a.run_dir):
                print("inject_fault: the run ended first", file=sys.stderr)
                return 0
            try:
                inject(a.run_dir, pick(read_json(workers_file)["workers"], a, rng), a.signal, a.resume_after)
                break
            except ProcessLookupError:
                time.sleep(0.1)
        else:
            raise Fail(f"the target's process kept disappearing ({workers_file} is not current)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
