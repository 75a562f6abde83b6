"""The coordinator's Restore to a replaced decode stage: it names the replica holder as the KV's source only
when the holder ships something (it ships nothing for an empty coverage, and a replacement told to wait for
a chunk would wait forever: a kill while the stage held no sequence hung a run)."""
from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

from dejavu_py.config import FTConfig
from dejavu_py.coordinator.recovery import Recovery, RecoveryRecord
from dejavu_py.protocol.plan import SeqState
from dejavu_py.protocol.recovery import Restore
from dejavu_py.protocol.replica import ReplicaCoverage


def _next(inbox: list, timeout_s: float):
    """RecoveryPort.next_message over a list: the first message, else None after ``timeout_s``."""
    if inbox:
        return inbox.pop(0)
    time.sleep(timeout_s)
    return None


def _coordinator(coverage: ReplicaCoverage, seqs: dict):
    """The part of a RecoveryPort that restoring uses."""
    members = {n: SimpleNamespace(name=n, prev=p) for n, p in (("s0", "coord"), ("s1", "s0"))}
    layout = SimpleNamespace(decode_pipeline=list(members.values()), by_name=members.__getitem__,
                             replica_holder={"s0": "s1", "s1": "s0"}.__getitem__,
                             replica_source={"s0": "s1", "s1": "s0"}.__getitem__)
    sched = SimpleNamespace(seqs={sid: SimpleNamespace(num_cached=n) for sid, n in seqs.items()}, history={})
    sent: list = []
    inbox = [("s0", coverage)]
    coord = SimpleNamespace(layout=layout, driver=SimpleNamespace(decode_scheduler=sched),
                            next_message=lambda timeout_s: _next(inbox, timeout_s),
                            send=lambda to, msg: sent.append((to, msg)))
    return coord, sent


def _restore_sent(coverage: ReplicaCoverage, seqs: dict) -> Restore:
    coord, sent = _coordinator(coverage, seqs)
    states = {sid: SeqState([sid], 0.0, 1.0, 0, 0) for sid in seqs}
    info = SimpleNamespace(states_for=lambda name: states, redo=[])
    recovery = Recovery(coord, FTConfig(recovery_timeout_s=5.0), Path("unused"))
    recovery._restore({"s1"}, info, 7, None, RecoveryRecord(["s1"], "killed", 0.0), [])
    return next(msg for to, msg in sent if to == "s1" and isinstance(msg, Restore))


def test_nothing_covered_means_no_replica_to_wait_for():
    got = _restore_sent(ReplicaCoverage("s1", {}, 0), {})
    assert got.replica_from is None and got.replay == 0 and got.drop_through == 7


def test_a_covered_sequence_comes_back_from_the_holder():
    got = _restore_sent(ReplicaCoverage("s1", {3: 5}, 4096), {3: 5})
    assert got.replica_from == "s0" and got.replay == 0
