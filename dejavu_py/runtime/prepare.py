"""Checks a whole run can fail on, done before any worker starts (every rank does the same, so a
mistake is the same one line everywhere, and rank 0 says it; rank 0 also checks what only the
coordinator writes)."""
from __future__ import annotations

import os
from pathlib import Path

from dejavu_py.config import RunConfig
from dejavu_py.coordinator.journal import check_job, fingerprint
from dejavu_py.errors import UserError
from dejavu_py.models.config import ModelConfig, load_model_config
from dejavu_py.models.loader import check_stage
from dejavu_py.protocol.layout import Layout, build_layout


def prepare(cfg: RunConfig, world_size: int, rank: int = 0) -> tuple[ModelConfig, Layout]:
    """The model's config and the pipeline layout; raises UserError on a bad checkpoint or split, or
    a run directory or output this run cannot use. Rank 0 (the coordinator's, or the front end
    checking for the ranks) also checks what only the coordinator writes: the output and the journal."""
    model_cfg = load_model_config(cfg.model)
    layout = build_layout(cfg, model_cfg.num_layers, world_size)
    for member in layout.members:
        check_stage(cfg.model, member.stage)  # headers only: names and shapes of every tensor
    _check_writable(cfg.run_dir, "--run-dir", want_dir=True)  # every rank writes its logs there
    if rank == 0:
        _check_writable(cfg.output, "--output", want_dir=False)
        check_run_dir(cfg)
    return model_cfg, layout


def check_run_dir(cfg: RunConfig) -> None:
    """A run directory holding another job's journal (another request file or model) is refused now,
    not once every worker has loaded its weights. A request file that cannot be read is left for the
    request loader to report."""
    journal = Path(cfg.run_dir) / "journal.jsonl"
    if not journal.exists():
        return
    try:
        job = fingerprint(cfg.prompts, cfg.model)
    except OSError:
        return
    check_job(journal, job)


def _check_writable(path: Path, flag: str, want_dir: bool) -> None:
    """``path`` (a directory, or a file) can be created or written: what is there has the right kind,
    and the nearest existing folder on its way is writable."""
    path = Path(path)
    if path.exists() and path.is_dir() != want_dir:
        raise UserError(f"{flag} {path}: is a {'file' if want_dir else 'directory'}; give a "
                        f"{'directory' if want_dir else 'file path'}")
    place = path if want_dir else path.parent
    while not place.exists() and place != place.parent:
        place = place.parent
    if not place.is_dir():
        raise UserError(f"{flag} {path}: {place} is a file, not a directory; give another {flag}")
    if not os.access(place, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: cannot write in {place} (permission denied); give a writable {flag}")
