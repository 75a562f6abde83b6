"""A stage worker's loop in process (CPU, a tiny model): its messages go to the handlers the worker's
core, running ahead and fault tolerance register, with the loop's special cases: control messages see
the launched steps finished, a replacement stashes plans until it is restored, plans in flight at a
failure are dropped."""
from __future__ import annotations

import time
from dataclasses import dataclass

import pytest
import torch
from make_checkpoint import make_checkpoint
from stage_harness import (
    PROMPT,
    decode,
    make_worker,
    port_members,
    prefill,
    put,
    sent,
    serve_in_thread,
)

from dejavu_py.errors import PipelineError
from dejavu_py.protocol.layout import COORD
from dejavu_py.protocol.plan import Sampled, SeqState, StepResult, Stop
from dejavu_py.protocol.recovery import ReplayHave, ReplayQuery, Restore
from dejavu_py.protocol.replica import ReplicaChunk
from dejavu_py.stage.dispatch import MessageTable


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ck") / "m", family="qwen3_moe", seed=5, tokenizer=False)


def stop(worker) -> None:
    worker.inbox.put((COORD, Stop(forward=False), None))


def steps_of(log: list, kind: type) -> list[int]:
    return [msg.step for _, msg in sent(log, kind)]


def wait_for(log: list, kind: type, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not sent(log, kind):
        assert time.monotonic() < deadline, f"no {kind.__name__} sent within {timeout_s}s"
        time.sleep(0.01)


def test_a_control_message_sees_every_launched_step_finished_first(ckpt, tmp_path):
    """Running ahead, a plan leaves the step before it launched and finishes it behind the new launch;
    a control message (here a replay query) finishes every launched step before it is answered."""
    w, log = make_worker(ckpt, tmp_path)
    assert w.ahead is not None
    put(w, prefill(0))
    put(w, decode(1))
    w.inbox.put((COORD, ReplayQuery([(0, 0)]), None))
    stop(w)
    assert w.serve() == 2
    order = [(type(m).__name__, getattr(m, "step", None)) for _, m, _ in log]
    assert order == [("Sampled", 0), ("Sampled", 1), ("StepResult", 0), ("StepResult", 1), ("ReplayHave", None)]


def test_a_replacement_stashes_plans_until_its_restore_and_serves_them_then(ckpt, tmp_path):
    w, log = make_worker(ckpt, tmp_path, generation=1)
    t, result = serve_in_thread(w)
    put(w, prefill(0))
    w.inbox.put((COORD, ReplayQuery([]), None))  # control messages are served meanwhile
    wait_for(log, ReplayHave)
    assert sent(log, Sampled) == [] and sent(log, StepResult) == []  # the plan, before the query, waits
    w.inbox.put((COORD, Restore({}, -1), None))
    wait_for(log, StepResult)
    stop(w)
    t.join(30)
    assert result == [1] and steps_of(log, StepResult) == [0]


def test_a_replacement_waits_for_its_kv_from_the_replica_as_well(ckpt, tmp_path):
    """Told its KV comes from a replica holder, a replacement serves its plans once that KV is in."""
    w, log = make_worker(ckpt, tmp_path, generation=1)
    t, result = serve_in_thread(w)
    state = SeqState(list(range(4)), 0.0, 1.0, 0, 0)
    w.inbox.put((COORD, Restore({0: state}, -1, replica_from="s0"), None))
    put(w, decode(1))
    w.inbox.put((COORD, ReplayQuery([]), None))
    wait_for(log, ReplayHave)
    assert sent(log, StepResult) == []  # Restore came, the KV not yet
    kv = w.runner.kv
    slots = list(range(len(PROMPT)))
    k_NKD = kv.k_NKD[kv.layers[0]]
    data = torch.ones(2, len(kv.layers), len(slots), *k_NKD.shape[1:])
    chunk = ReplicaChunk("s1", -1, -1, list(kv.layers), [0], [0], [len(PROMPT)], slots)
    w.inbox.put(("s0", chunk, data))
    wait_for(log, StepResult)
    stop(w)
    t.join(30)
    assert result == [1] and steps_of(log, StepResult) == [1]
    assert torch.equal(k_NKD[slots], torch.ones_like(k_NKD[slots]))  # the replica's KV is in the cache


def test_plans_in_flight_at_a_failure_are_dropped_but_a_replay_s_run(ckpt, tmp_path):
    w, log = make_worker(ckpt, tmp_path)
    w.inbox.put((COORD, Restore({0: SeqState(list(range(4)), 0.0, 1.0, 0, 0)}, 1), None))
    put(w, decode(1))  # was in flight: the coordinator re-issues it
    put(w, decode(1, replay_until="s1"))  # recomputes this stage's KV, sends nothing on
    put(w, decode(2))
    stop(w)
    assert w.serve() == 2
    assert steps_of(log, Sampled) == [2] and steps_of(log, StepResult) == [2] and w.ft.replayed == 1


@dataclass
class Ping:
    n: int


@dataclass
class LastStop(Stop):
    """A subclass: handled as the type it extends."""


def test_a_part_plugs_its_messages_into_the_table_and_unknown_ones_are_refused(ckpt, tmp_path):
    w, _ = make_worker(ckpt, tmp_path)
    pings: list[int] = []
    w.messages.register(Ping, lambda msg, _: pings.append(msg.n) or 0)
    w.inbox.put((COORD, Ping(3), None))
    w.inbox.put((COORD, LastStop(forward=False), None))
    assert w.serve() == 0 and pings == [3]
    with pytest.raises(ValueError, match="Ping has a handler already"):
        w.messages.register(Ping, lambda msg, _: 0)
    w.stopped = False
    w.inbox.put(("s0", object(), None))
    with pytest.raises(PipelineError, match="unexpected object from s0"):
        w.serve()


def test_a_table_finds_the_route_of_a_subclass_and_none_for_an_unknown_type():
    table = MessageTable()
    table.register(Stop, lambda msg, _: 0)
    assert table.lookup(LastStop) is table.routes[Stop] and table.lookup(Ping) is None
    assert table.routes[Stop].finishes_steps and not table.routes[Stop].waits_for_restore


def test_with_ft_off_the_worker_holds_a_stand_in_that_records_and_answers_nothing(ckpt, tmp_path):
    from dejavu_py.protocol.recovery import ReplicaQuery
    from dejavu_py.stage.ft_off import FTOff

    w, log = make_worker(ckpt, tmp_path, flags=("--ft", "off"))
    assert isinstance(w.ft, FTOff) and ReplicaQuery not in w.messages.routes and not w.runner.record_routing
    put(w, prefill(0))
    put(w, decode(1))
    stop(w)
    assert w.serve() == 2 and steps_of(log, StepResult) == [0, 1]
    assert all(m.relayed == [] for _, m in sent(log, StepResult)) and not w.awaiting_bookkeeping
    stats = w.ft.stats()
    assert stats["checkpoints"] == 0 and "host_buffers_allocated" in stats and "policy" in stats


def test_the_worker_has_every_member_its_parts_ports_name(ckpt, tmp_path):
    from dejavu_py.stage.ahead import AheadPort
    from dejavu_py.stage.stage_ft import FTPort

    w, _ = make_worker(ckpt, tmp_path)
    for port in (FTPort, AheadPort):
        missing = {n for n in port_members(port) if not hasattr(w, n)}
        assert not missing, f"Worker lacks {sorted(missing)} of {port.__name__}"
