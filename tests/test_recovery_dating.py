"""recoveries.jsonl dates a failure by the supervisor's exit report once it is in, not by the last
heartbeat, when the broken connection was noticed first; a hung worker (killed by us after it was
noticed) stays dated by its last heartbeat."""
from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from dejavu_py.comm.store import put_json
from dejavu_py.coordinator.recovery_log import RecoveryLog, RecoveryRecord
from dejavu_py.protocol import keys


def _recovery() -> tuple[RecoveryLog, dist.Store]:
    store = dist.HashStore()
    return RecoveryLog(lambda: store, Path("unused")), store


def test_an_exit_report_that_lands_after_the_failure_was_noticed_dates_it():
    rec_, store = _recovery()
    rec = RecoveryRecord(["s1"], "lost its connection", t_failure=100.0, t_noticed=101.2, gens={"s1": 3})
    rec.phases["detect_s"] = 1.2  # dated by the last heartbeat, 100.0
    put_json(store, keys.exit_("s1", 3), {"time": 101.1, "how": "killed by signal 9"})
    rec_._redate(rec)
    assert rec.t_failure == 101.1 and abs(rec.phases["detect_s"] - 0.1) < 1e-9


def test_a_worker_killed_after_it_was_noticed_keeps_its_last_heartbeat():
    rec_, store = _recovery()
    rec = RecoveryRecord(["s0", "s1"], "hung", t_failure=100.0, t_noticed=103.0, gens={"s0": 0, "s1": 1})
    rec.phases["detect_s"] = 3.0
    put_json(store, keys.exit_("s0", 0), {"time": 102.0, "how": "exit 1"})
    rec_._redate(rec)  # s1's report is not in yet
    assert rec.t_failure == 100.0
    put_json(store, keys.exit_("s1", 1), {"time": 103.5, "how": "killed by signal 9"})  # we killed it
    rec_._redate(rec)
    assert rec.t_failure == 100.0 and rec.phases["detect_s"] == 3.0
