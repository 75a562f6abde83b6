"""``python -m dejavu_py [serve] --nproc-per-node N``: check the inputs once, then start N ranks like torchrun.

Checking first means a user mistake is one line and a non-zero exit, before any process starts. A
mistake the ranks find later (user_errors.py) is printed here after they have exited, with torchrun's
own failure report left out, so that the one line is the last thing printed.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from dejavu_py.config import RunConfig
from dejavu_py.errors import UserError
from dejavu_py.runtime import user_errors

if TYPE_CHECKING:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError


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
    if cfg.serve.enabled:
        check_serving(cfg)
    else:
        Coordinator(cfg, layout, model_cfg, store=None).load_requests()


def check_serving(cfg: RunConfig) -> None:
    """What the HTTP front-end would otherwise only find once every worker has loaded its weights: the
    checkpoint's tokenizer (text in and out of the API) and a port it can listen on."""
    if not (Path(cfg.model) / "tokenizer.json").is_file():
        raise UserError(f"--model {cfg.model}: no tokenizer.json; serving needs the checkpoint's tokenizer "
                        "to turn text into tokens and back")
    with socket.socket() as sock:
        try:
            sock.bind((cfg.serve.host, cfg.serve.port))
        except OSError as e:
            raise UserError(f"--host {cfg.serve.host} --port {cfg.serve.port}: cannot listen there "
                            f"({e.strerror or e}); choose another --port") from None


@contextlib.contextmanager
def _quiet_launcher() -> Iterator[None]:
    """No log lines of torch's launcher (a rank's failure, the others stopped): the ranks say what went
    wrong, and failure_line sums it up once they have exited. This process logs nothing else meanwhile."""
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def failure_line(e: ChildFailedError, cfg: RunConfig) -> str:
    """The ranks' user error if one reported it (the root cause first), else which rank failed and how."""
    root, first = e.get_first_failure()
    for failure in (first, *e.failures.values()):
        line = user_errors.reported_line(failure.message)
        if line is not None:
            return line
    how = f"was killed by {first.signal_name()}" if first.exitcode < 0 else f"exited with code {first.exitcode}"
    return f"error: rank {root} {how}; its log is in {cfg.logs_dir}"


def launch_local(cfg: RunConfig, nproc: int, argv: list[str]) -> int:
    validate(cfg, nproc)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    os.environ.setdefault("OMP_NUM_THREADS", str(cfg.pipeline.threads))
    os.environ[user_errors.LAUNCHER_PRINTS] = "1"
    args = get_args_parser().parse_args(
        ["--standalone", "--nproc-per-node", str(nproc), "--monitor-interval", "0.1", "-m", "dejavu_py", *_strip_nproc(argv)]
    )
    try:
        with _quiet_launcher():
            run(args)
    except ChildFailedError as e:
        print(failure_line(e, cfg), file=sys.stderr, flush=True)
        codes = [f.exitcode for f in e.failures.values()]
        return next((c for c in codes if c > 0), 1)
    return 0


__all__ = ["UserError", "check_serving", "failure_line", "launch_local", "validate"]
