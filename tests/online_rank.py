"""One rank of an online-serving job in tests, under torchrun: the RunConfig comes pickled (the CLI's
serve subcommand lives elsewhere), the rest is what the CLI does for a rank."""
from __future__ import annotations

import logging
import os
import pickle
import sys

from dejavu_py.comm.store import RankInfo
from dejavu_py.runtime.rank import run_rank

if __name__ == "__main__":
    with open(sys.argv[1], "rb") as f:
        cfg = pickle.load(f)
    code = run_rank(cfg, RankInfo.from_env(), lambda e: print(f"error: {e}", file=sys.stderr, flush=True))
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
