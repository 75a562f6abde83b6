"""The files a run leaves in its run directory when it ends: summary.json, timeline-<attempt>.json and
ft_stats.json. The stages' own figures (their loop times, checkpoint and replica counts) come from the
store, read once for all three."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dejavu_py.comm.store import get_json, has
from dejavu_py.config import FTConfig
from dejavu_py.protocol import keys
from dejavu_py.protocol.layout import Layout


def stage_stats(store: Any, layout: Layout) -> dict[str, dict]:
    """Each stage's figures as it wrote them when it stopped (a stage that died before has none)."""
    out = {}
    for m in layout.members:
        key = keys.ft_stats(m.name)
        if has(store, key):
            out[m.name] = get_json(store, key)
    return out


def _write(path: Path, doc: dict, indent: int | None = 2) -> None:
    path.write_text(json.dumps(doc, indent=indent) + "\n")


def write_summary(run_dir: Path, summary: dict, stages: dict[str, dict], coordinator_loop: dict) -> None:
    """summary.json: ``summary`` plus every process's loop times per step."""
    loops = {"coordinator": coordinator_loop, **{name: s.get("loop") for name, s in stages.items()}}
    _write(run_dir / "summary.json", {**summary, "loop_ms": loops})


def write_timeline(run_dir: Path, attempt: int, samples: list, step_ms: list) -> None:
    _write(run_dir / f"timeline-{attempt}.json", {"samples": samples, "step_ms": step_ms}, indent=None)


def write_ft_stats(run_dir: Path, ft: FTConfig, stages: dict[str, dict], recoveries: list[dict]) -> None:
    """ft_stats.json: per stage checkpoint and replica figures, and every recovery."""
    _write(run_dir / "ft_stats.json", {"enabled": ft.enabled, "policy": ft.checkpoint_policy,
                                       "replica_lag": ft.replica_lag, "max_checkpoints": ft.max_checkpoints,
                                       "stages": stages, "recoveries": recoveries})
