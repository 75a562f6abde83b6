"""How a user's mistake found by a rank reaches the person: one line, ``error: <what to change>``, last.

Under torchrun, when a rank exits non-zero the launcher prints its own failure report after whatever
the ranks printed: a traceback of torchrun itself and a block per failed rank. The block's last entry
is the root cause, whose ``traceback :`` line is the message of the error file that torchrun gives
each rank (``TORCHELASTIC_ERROR_FILE``), or a link to torch's docs when there is none. So every rank
that ends because of a user error writes its line there: the report then ends with it, whichever
rank torchrun saw fail first. Rank 0 also prints it when it happens.

``python -m dejavu_py --nproc-per-node N`` (launch.py) runs torchrun's launcher in this process: it
keeps the launcher quiet, and after the ranks have exited prints the root cause's line itself (it tells
its ranks so, through ``LAUNCHER_PRINTS``, and rank 0 does not print it twice).
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

ERROR_FILE = "TORCHELASTIC_ERROR_FILE"
"""Where torch's elastic launcher reads a failed rank's error (torch.distributed.elastic.multiprocessing.errors)."""
LAUNCHER_PRINTS = "DEJAVU_LAUNCHER_PRINTS_ERRORS"
"""Set by launch_local for its ranks: it prints a rank's user error after the ranks have exited."""


def report(message: str, rank: int) -> None:
    """A user error that ends this rank: into the launcher's error file; on rank 0's console too, unless
    the launcher prints it."""
    line = f"error: {message}"
    path = os.environ.get(ERROR_FILE)
    if path:
        _write_error_file(path, line)
    if rank == 0 and not os.environ.get(LAUNCHER_PRINTS):
        print(line, file=sys.stderr, flush=True)


def _write_error_file(path: str, line: str) -> None:
    """The error file as torch's ErrorHandler writes it, with our line in place of a Python traceback."""
    data = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError:  # the console line (rank 0) still says it
        pass


def reported_line(message: Any) -> str | None:
    """The line ``report`` wrote, from a failure's error-file message (torch's ProcessFailure.message)."""
    if isinstance(message, dict) and isinstance(message.get("message"), str):
        line = message["message"]
        return line if line.startswith("error: ") else None
    return None
