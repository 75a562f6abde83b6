"""RUN_DIR/workers.json: every worker and supervisor of the run, kept current (fault scripts read it)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from dejavu_py.comm.store import get_json
from dejavu_py.protocol import keys
from dejavu_py.protocol.layout import Layout


def collect(store, layout: Layout) -> list[dict]:
    """One entry per member from the store: role, stage, rank, pid, host, device, supervisor pid."""
    sups = {r: get_json(store, keys.supervisor(r)) for r in sorted({m.rank for m in layout.members})}
    by_zygote = {s["zygote_pid"]: s for s in sups.values()}
    out = []
    for m in layout.members:
        info = get_json(store, keys.member(m.name))
        sup = by_zygote.get(info.get("zygote_pid"), sups[m.rank])  # a standby's supervisor may be another rank's
        out.append(
            {
                "name": m.name,
                "role": m.role,
                "stage": m.stage.index,
                "layers": [m.stage.first_layer, m.stage.first_layer + m.stage.num_layers - 1],
                "rank": m.rank,
                "pid": info["pid"],
                "supervisor_pid": sup["pid"],
                "host": info["host"],
                "device": info["device"],
                "generation": info.get("generation", 0),
                "state": info.get("state"),
            }
        )
    return out


def write(path: Path, workers: list[dict], coordinator_pid: int, status: str = "running") -> None:
    """Atomically replace the file."""
    doc = {"updated": time.time(), "status": status, "coordinator_pid": coordinator_pid, "workers": workers}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)
