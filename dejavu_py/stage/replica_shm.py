"""KV replicas in shared host memory.

A holder keeps the replica it holds in a file of a RAM-backed directory (``--replica-shm-dir``,
/dev/shm by default) and tells its source where (``ReplicaShm``). A source on the same host then
writes its K/V into that file itself, each slot's tag (the sequence and position it now holds) behind
its bytes, and sends the holder nothing: no replica byte and no message crosses a socket, and the holder
reads what it holds off the tags when asked (``replica.covered_by_tags``). A replacement on the holder's
host maps the file and copies its KV straight to its device. Across hosts the bytes still travel over the
replica edge, into the same file. The file outlives a dead source (that is the point) and is removed when
its holder is replaced and at the end of the run.

Legend: L = the source stage's layers, N = cache slots, T = slots of a chunk, K = KV heads, D = head dim.
"""
from __future__ import annotations

import hashlib
import math
import mmap
import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from dejavu_py import log

_log = log.get(__name__)


@dataclass
class ReplicaShm:
    """Where a holder keeps a replica: this file on this host, [2, L, N, K, D] of ``dtype``. Published
    in the store (``key``) before the holder builds its edges, so a source that has an edge to it finds it."""

    holder: str
    host: str
    path: str
    shape: tuple[int, ...]
    dtype: str


class Replica(NamedTuple):
    """A replica's buffers (one file's two parts, or host memory)."""

    kv_2LNKD: torch.Tensor
    tags_LN: torch.Tensor
    """int64: per layer and slot, the tag of the position whose K/V the slot holds (0: none yet;
    ``replica.position_tags``). Written after the bytes: a tag never vouches for bytes not yet there."""


def _run_tag(run_dir: Path) -> str:
    return hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:12]


def replica_path(shm_dir: str | Path, run_dir: Path, holder: str) -> Path:
    """This process's replica file as ``holder`` (a standby preloading a stage makes one too)."""
    return Path(shm_dir) / f"dejavu-{_run_tag(run_dir)}-{holder}-{os.getpid()}.kv"


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """The file's size: the K/V, then the tags (one int64 per layer and slot)."""
    return math.prod(shape) * dtype.itemsize + math.prod(shape[1:3]) * 8


def _map(fd: int, shape: tuple[int, ...], dtype: torch.dtype, populate: bool) -> Replica:
    """Tensors over a shared mapping of the open file (they keep the mapping alive)."""
    flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
    try:
        mm = mmap.mmap(fd, _nbytes(shape, dtype), flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    raw = torch.frombuffer(mm, dtype=torch.uint8)
    data = math.prod(shape) * dtype.itemsize
    return Replica(raw[:data].view(dtype).view(shape), raw[data:].view(torch.int64).view(shape[1:3]))


def create(path: Path, shape: tuple[int, ...], dtype: torch.dtype, threads: int = 8) -> Replica:
    """A new replica file, mapped, every page written now by a few threads: a page first touched in a
    step costs a fault and a zeroing there, and mapping a file whose pages exist with populated page
    tables (``attach``) is much faster than one whose pages do not."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.ftruncate(fd, _nbytes(shape, dtype))
    t = _map(fd, shape, dtype, populate=False)
    flat = t.kv_2LNKD.view(-1)
    step = -(-flat.numel() // threads)
    with ThreadPoolExecutor(threads) as pool:  # zero_ leaves the GIL: the threads fault in parallel
        list(pool.map(lambda a: flat[a:a + step].zero_(), range(0, flat.numel(), step)))
    t.tags_LN.zero_()
    return t


def attach(msg: ReplicaShm) -> Replica | None:
    """Map a holder's replica file, if it is on this host and still there. Its pages are faulted in as
    they are touched (``prefault`` does it ahead, in the background)."""
    if msg.host != socket.gethostname() or not os.path.exists(msg.path):
        return None
    try:
        return _map(os.open(msg.path, os.O_RDWR), tuple(msg.shape), getattr(torch, msg.dtype), populate=False)
    except (RuntimeError, OSError, ValueError) as e:
        _log.warning("cannot map the replica at %s (%s): its bytes go over the replica edge", msg.path, e)
        return None


def prefault(t: torch.Tensor) -> threading.Thread:
    """Touch every page of a mapping on a background thread: a replacement is about to read it all, and
    a source writes a page it never touched with every slot of every step (a slot's row [K, D] is a
    page or so); one fault a page inside those copies costs more than the copy."""
    pages = t.view(torch.uint8).view(-1)[::4096]

    def touch() -> None:
        pages.sum()  # reads one byte per page; leaves the GIL while it runs

    thread = threading.Thread(target=touch, name="replica-prefault", daemon=True)
    thread.start()
    return thread


def key(holder: str) -> str:
    return f"replica_shm/{holder}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(shm_dir: str | Path, run_dir: Path, holder: str) -> None:
    """Files that dead workers of ``holder`` left: their source re-replicates to ours. Files of live
    processes stay (a standby preloaded with the same stage has one)."""
    for p in Path(shm_dir).glob(f"dejavu-{_run_tag(run_dir)}-{holder}-*.kv"):
        pid = p.stem.rsplit("-", 1)[-1]
        if not pid.isdigit() or not _alive(int(pid)):
            p.unlink(missing_ok=True)


def remove_all(shm_dir: str | None, run_dir: Path) -> None:
    """End of run: every replica file of this run on this host (mappings still open stay valid)."""
    if shm_dir:
        for p in Path(shm_dir).glob(f"dejavu-{_run_tag(run_dir)}-*.kv"):
            p.unlink(missing_ok=True)


COPY_THREADS = max(1, min(2, (os.cpu_count() or 1) // 4))
"""Threads that write a large chunk (a 16 MB piece of a prompt's replica) into a replica mapping (the
copies leave the interpreter's lock). Two write a piece well within a decode step, and every stage
process on the host writes its pieces at once, right after the prompts: more threads only compete with
the stages' own for cores, and gave no more throughput."""
POOL_BYTES = 8 << 20
"""Chunks smaller than this (a decode step's, up to a few MB) are copied by the calling thread in one
call: the pool's threads and futures take the interpreter's lock over and over, while one copy leaves
it for its whole length."""
_copy_pool: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _copy_pool
    if _copy_pool is None:
        _copy_pool = ThreadPoolExecutor(COPY_THREADS, thread_name_prefix="replica-copy")
    return _copy_pool


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _np(t: torch.Tensor):
    """A numpy view of a host tensor's bytes, as integers of its element size (numpy has no bfloat16)."""
    return t.view(_INT_OF_SIZE[t.element_size()]).numpy()


def write_chunk(target: Replica, index: dict[int, int], layers: list[int], slots: list[int],
                kv_2LTKD: torch.Tensor, tags_T: np.ndarray) -> None:
    """Write a chunk's K/V (host memory) into a replica at its slots, then the slots' tags (``tags_T``,
    one per slot) in those layers: a small chunk in one copy, a large one split over ``COPY_THREADS``.
    numpy's fancy assignment copies each slot's row [K, D] as one block (torch's index_copy_ copies
    element by element) and leaves the interpreter's lock while it runs."""
    idx_T = np.asarray(slots, dtype=np.int64)
    at = [index[layer] for layer in layers]
    run = at == list(range(at[0], at[0] + len(at)))  # consecutive layers of the replica: one slice
    _write_kv(_np(target.kv_2LNKD), at, run, idx_T, _np(kv_2LTKD.to(target.kv_2LNKD.dtype).contiguous()))
    tags = target.tags_LN.numpy()
    if run:
        tags[at[0]:at[0] + len(at), idx_T] = tags_T
    else:
        for j in at:
            tags[j, idx_T] = tags_T


def _write_kv(target, at: list[int], run: bool, idx_T: np.ndarray, kv) -> None:
    """The K/V part of ``write_chunk`` (``at``: the replica's layer index of each of the chunk's layers;
    ``run``: they are consecutive)."""
    T = len(idx_T)
    pooled = kv.nbytes >= POOL_BYTES and COPY_THREADS > 1
    if not pooled and run:
        target[:, at[0]:at[0] + len(at)][:, :, idx_T] = kv  # every layer at once
        return
    parts = max(1, min(COPY_THREADS, T // 64)) if pooled else 1  # token ranges per layer
    bounds = [T * p // parts for p in range(parts + 1)]
    jobs = [(at[i], i, a, b) for i in range(len(at)) for a, b in zip(bounds, bounds[1:])]

    def copy(job: tuple[int, int, int, int]) -> None:
        j, i, a, b = job
        target[:, j][:, idx_T[a:b]] = kv[:, i, a:b]

    if pooled and len(jobs) > 1:
        list(_pool().map(copy, jobs))
    else:
        for job in jobs:
            copy(job)


def spans(slots: list[int], gap: int) -> list[tuple[int, int]]:
    """[start, end) ranges covering ``slots``; ranges closer than ``gap`` slots are merged (copying a
    few unused slots costs less than one more copy)."""
    out: list[tuple[int, int]] = []
    for s in sorted(set(slots)):
        if out and s - out[-1][1] < gap:
            out[-1] = (out[-1][0], s + 1)
        else:
            out.append((s, s + 1))
    return out


def copy_spans(source_2LNKD: torch.Tensor, layers: list[int], slots: list[int], k_NKD: dict, v_NKD: dict,
               gap: int = 1024) -> None:
    """Copy the K/V at ``slots`` (and unused slots between them: nothing reads those before it writes
    them) of every layer out of a mapped replica into a cache of the same slot layout, as a few large
    contiguous copies (a gather over the mapping runs at a fraction of memory speed)."""
    ranges = spans(slots, gap)
    for i, layer in enumerate(layers):
        for a, b in ranges:
            k_NKD[layer][a:b].copy_(source_2LNKD[0, i, a:b])
            v_NKD[layer][a:b].copy_(source_2LNKD[1, i, a:b])
