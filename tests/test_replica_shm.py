"""Shared-memory replica files: names, stale files of dead workers, spans copied at a restore."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import torch

from dejavu_py.stage import replica_shm
from dejavu_py.stage.replica_shm import ReplicaShm


def test_spans_merge_close_slots_and_keep_far_ones_apart():
    assert replica_shm.spans([5, 3, 4, 4, 20], gap=1) == [(3, 6), (20, 21)]
    assert replica_shm.spans([5, 3, 4, 20], gap=16) == [(3, 21)]
    assert replica_shm.spans([], gap=4) == []


def test_copy_spans_moves_exactly_the_slots_asked(tmp_path):
    shape = (2, 2, 32, 2, 4)  # [2, L, N, K, D]
    src = replica_shm.create(tmp_path / "r.kv", shape, torch.float32).kv_2LNKD
    src.copy_(torch.randn(shape))
    k = {7: torch.zeros(32, 2, 4), 9: torch.zeros(32, 2, 4)}
    v = {7: torch.zeros(32, 2, 4), 9: torch.zeros(32, 2, 4)}
    slots = [1, 2, 3, 17, 30]
    replica_shm.copy_spans(src, [7, 9], slots, k, v, gap=4)
    for i, layer in enumerate([7, 9]):
        assert torch.equal(k[layer][slots], src[0, i, slots]) and torch.equal(v[layer][slots], src[1, i, slots])
        assert not k[layer][20:30].any()  # far from every slot asked: not copied


def test_attach_maps_the_same_bytes_and_refuses_other_hosts(tmp_path):
    path = tmp_path / "r.kv"
    t = replica_shm.create(path, (2, 1, 8, 1, 2), torch.bfloat16)
    assert not t.tags_LN.any() and t.tags_LN.shape == (1, 8)  # nothing held yet
    here = ReplicaShm("h", socket.gethostname(), str(path), (2, 1, 8, 1, 2), "bfloat16")
    other = replica_shm.attach(here)
    other.kv_2LNKD[1, 0, 3] = 2.5
    other.tags_LN[0, 3] = 77
    assert t.kv_2LNKD[1, 0, 3, 0, 0].item() == 2.5 and t.tags_LN[0, 3] == 77  # one file, two mappings
    assert t.kv_2LNKD[0, 0, 0, 0, 0].item() == 0 and t.tags_LN.count_nonzero() == 1  # the parts do not overlap
    assert replica_shm.attach(ReplicaShm("h", socket.gethostname() + "-elsewhere", str(path), (2, 1, 8, 1, 2), "bfloat16")) is None
    assert replica_shm.attach(ReplicaShm("h", socket.gethostname(), str(tmp_path / "gone.kv"), (2, 1, 8, 1, 2), "bfloat16")) is None


def test_stale_files_of_dead_workers_go_and_live_ones_stay(tmp_path):
    run = tmp_path / "run"
    mine = replica_shm.replica_path(tmp_path, run, "s1")
    mine.write_bytes(b"x")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = mine.with_name(mine.name.replace(f"-{os.getpid()}.kv", f"-{dead.stdout.strip()}.kv"))
    stale.write_bytes(b"x")
    other_member = replica_shm.replica_path(tmp_path, run, "s0")
    other_member.write_bytes(b"x")
    replica_shm.remove_stale(tmp_path, run, "s1")
    assert mine.exists() and not stale.exists() and other_member.exists()
    replica_shm.remove_all(str(tmp_path), run)
    assert not list(tmp_path.glob("dejavu-*.kv"))


def test_write_chunk_split_over_threads_lands_every_slot(monkeypatch):
    """A chunk written by several copy threads (token ranges of each layer) equals one index_copy; a
    chunk of some of the layers lands in those layers only."""
    monkeypatch.setattr(replica_shm, "COPY_THREADS", 3)
    monkeypatch.setattr(replica_shm, "POOL_BYTES", 0)
    replica = _replica(4, 1000, torch.float32)
    target = replica.kv_2LNKD
    kv = torch.randn(2, 4, 200, 2, 8)
    slots = torch.randperm(1000)[:200].tolist()
    tags = np.arange(1, 201, dtype=np.int64)
    replica_shm.write_chunk(replica, {10: 0, 11: 1, 12: 2, 13: 3}, [10, 11, 12, 13], slots, kv, tags)
    want = torch.zeros_like(target).index_copy_(2, torch.tensor(slots), kv)
    assert torch.equal(target, want)
    assert torch.equal(replica.tags_LN[:, slots], torch.from_numpy(tags).expand(4, 200))
    part = torch.randn(2, 1, 200, 2, 8)
    replica_shm.write_chunk(replica, {10: 0, 11: 1, 12: 2, 13: 3}, [12], slots, part, -tags)
    want[:, 2].index_copy_(1, torch.tensor(slots), part[:, 0])
    assert torch.equal(target, want)
    assert torch.equal(replica.tags_LN[2, slots], torch.from_numpy(-tags)) and torch.equal(replica.tags_LN[3, slots], torch.from_numpy(tags))


def test_a_small_chunk_lands_at_its_slots_whatever_the_order_of_its_layers():
    """bf16 (copied as int16 bytes), a chunk of consecutive layers (one copy) and one in another order
    (a copy per layer); nothing else is touched."""
    index = {10: 0, 11: 1, 12: 2, 13: 3}
    replica = _replica(4, 100, torch.bfloat16)
    target = replica.kv_2LNKD
    want = target.clone()
    kv = torch.randn(2, 2, 5, 2, 8).to(torch.bfloat16)
    tags = np.arange(5, 10, dtype=np.int64)
    replica_shm.write_chunk(replica, index, [11, 12], [3, 9, 50, 51, 99], kv, tags)
    want[:, 1:3].index_copy_(2, torch.tensor([3, 9, 50, 51, 99]), kv)
    assert torch.equal(target, want)
    replica_shm.write_chunk(replica, index, [13, 10], [0, 1, 2, 4, 5], kv.float(), tags)  # converted to the replica's dtype
    want[:, 3].index_copy_(1, torch.tensor([0, 1, 2, 4, 5]), kv[:, 0])
    want[:, 0].index_copy_(1, torch.tensor([0, 1, 2, 4, 5]), kv[:, 1])
    assert torch.equal(target, want)
    held = replica.tags_LN.count_nonzero(dim=1).tolist()
    assert held == [5, 5, 5, 5] and replica.tags_LN[1, 99] == 9 and replica.tags_LN[0, 5] == 9


def _replica(layers: int, slots: int, dtype: torch.dtype) -> replica_shm.Replica:
    return replica_shm.Replica(torch.zeros(2, layers, slots, 2, 8, dtype=dtype), torch.zeros(layers, slots, dtype=torch.int64))
