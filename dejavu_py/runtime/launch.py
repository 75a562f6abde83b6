"""``python -m dejavu_py --nproc-per-node N``: check the inputs once, then start N ranks like torchrun.

Checking first means a user mistake is one line and a non-zero exit, before any process starts
(torchrun itself adds its own report when a rank fails).
"""
from __future__ import annotations

import os

from dejavu_py.config import RunConfig
from dejavu_py.errors import UserError


def _strip_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc-per-node":
            skip = True
        elif not a.startswith("--nproc-per-node="):
            out.append(a)
    return out


def validate(cfg: RunConfig, nproc: int) -> None:
    """Everything a whole run can get wrong that is cheap to check here."""
    from dejavu_py import log
    from dejavu_py.coordinator.coordinator import Coordinator
    from dejavu_py.runtime.prepare import prepare

    log.setup("WARNING", None, console_level=None)  # the ranks report bad lines; stay quiet here
    model_cfg, layout = prepare(cfg, nproc)
    Coordinator(cfg, layout, model_cfg, store=None).load_requests()


def launch_local(cfg: RunConfig, nproc: int, argv: list[str]) -> int:
    validate(cfg, nproc)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    os.environ.setdefault("OMP_NUM_THREADS", str(cfg.pipeline.threads))
    args = get_args_parser().parse_args(
        ["--standalone", "--nproc-per-node", str(nproc), "--monitor-interval", "0.1", "-m", "dejavu_py", *_strip_nproc(argv)]
    )
    try:
        run(args)
    except ChildFailedError as e:
        codes = [f.exitcode for f in e.failures.values()]
        return next((c for c in codes if c > 0), 1)
    return 0


__all__ = ["launch_local", "validate", "UserError"]
