"""Supervisor commands through the store: a reader never blocks on a command whose counter moved
before its body was set (rank 0 shares one store client between the poster and the reader, and a
client serialises its calls: a blocking wait there held up the very set it waited for)."""
from __future__ import annotations

import time

import torch.distributed as dist

from dejavu_py.comm.commands import CommandReader, post


def test_reader_returns_at_once_while_a_body_is_missing_then_reads_it():
    store = dist.HashStore()
    reader = CommandReader(store, 0)
    post(store, 0, {"op": "kill", "pid": 1})
    store.add("cmd/0/n", 1)  # a poster between its add and its set
    t0 = time.monotonic()
    assert reader.poll() == [{"op": "kill", "pid": 1}]
    assert time.monotonic() - t0 < 1.0 and reader.poll() == []
    store.set("cmd/0/2", '{"op": "replace", "member": "s1", "generation": 1}')
    assert reader.poll() == [{"op": "replace", "member": "s1", "generation": 1}]
    assert reader.seen == 2
