"""A replacement's KV back from its replica holder, into the stage's cache: a chunk's bytes, or, when
the holder is on this host, the slots read straight out of its replica file."""
from __future__ import annotations

import socket
from typing import TYPE_CHECKING

import torch

from dejavu_py.stage import replica_shm
from dejavu_py.stage.replica_shm import ReplicaShm

if TYPE_CHECKING:
    from dejavu_py.protocol.replica import ReplicaChunk
    from dejavu_py.stage.runner import StageRunner


def restore_into_cache(runner: StageRunner, chunk: ReplicaChunk, kv: torch.Tensor | None,
                       mapped: replica_shm.Replica | None = None) -> None:
    """Write ``chunk`` (its K/V ``kv`` [2, L, T, K, D], or with ``chunk.shm_path`` the holder's file)
    at its slots. ``mapped``: that file when this stage maps it already (it replicates into it too)."""
    slots = chunk.slots
    idx = torch.tensor(slots, dtype=torch.long, device=runner.kv.device)

    def write(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        k, v = k.to(runner.kv.device, non_blocking=True), v.to(runner.kv.device, non_blocking=True)
        if runner.swapper is not None:
            runner.swapper.write(layer, slots, k, v)
        else:
            runner.kv.write(layer, idx, k, v)

    if chunk.shm_path is not None:
        shape = (2, len(chunk.layers), *runner.kv.k_NKD[chunk.layers[0]].shape)
        replica = mapped if mapped is not None else \
            replica_shm.attach(ReplicaShm("", socket.gethostname(), chunk.shm_path, shape,
                                          str(runner.model.dtype).removeprefix("torch.")))
        if replica is None:
            raise RuntimeError(f"replica file {chunk.shm_path} is gone: cannot restore the KV")
        source = replica.kv_2LNKD
        if runner.swapper is not None:  # virtual slots: gather them
            for i, layer in enumerate(chunk.layers):
                kv_2TKD = source[:, i].index_select(1, torch.tensor(slots, dtype=torch.long))
                write(layer, kv_2TKD[0], kv_2TKD[1])
        else:
            replica_shm.copy_spans(source, chunk.layers, slots, runner.kv.k_NKD, runner.kv.v_NKD)
    else:
        for i, layer in enumerate(chunk.layers):
            write(layer, kv[0, i], kv[1, i])
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
