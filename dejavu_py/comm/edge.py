"""One pipeline edge: a two-member process group between neighbours, under its own store prefix.

Every pair of pipeline members that talk (coordinator -> stage 0, stage i -> stage i+1, last stage ->
coordinator, and later prompt -> token stages and KV replicas) gets its own group, keyed by the two
member names and a generation: ``edge/<a>~<b>/gen<g>``. When a member is replaced, only the edges that
touch it are rebuilt, at a new generation, and everyone else keeps their groups (see
design-notes: a single global group would force everyone to tear down).

A message is a small picklable object plus an optional tensor. Control bytes always travel over gloo
(CPU); the tensor travels over the data group: the same gloo group on CPU, an NCCL group when the two
ends own different GPUs. Between two processes sharing a GPU, a tensor sent ``fast`` goes through a
ring in shared host memory, ordered on the devices' streams (comm/host_ring.py): neither host waits.
"""
from __future__ import annotations

import collections
import pickle
import threading
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from dejavu_py import log
from dejavu_py.comm.host_ring import HostRing, RingRead
from dejavu_py.protocol import keys

_log = log.get(__name__)
_TAG = 0




class Edge:
    """Ordered, asynchronous-send, blocking-receive channel between two named members."""

    def __init__(
        self,
        store: dist.Store,
        me: str,
        peer: str,
        generation: int,
        timeout_s: float,
        data_backend: str = "gloo",
        device: torch.device | None = None,
        max_pending: int = 64,
        channel: str = "main",
        inbound_bytes: int = 0,
    ) -> None:
        """``data_backend``: 'gloo', 'nccl', or 'ring' (same GPU: gloo, and tensors sent ``fast`` through
        host rings; this end receives up to ``inbound_bytes`` per tensor that way)."""
        self.me, self.peer, self.generation, self.channel = me, peer, generation, channel
        self.name = keys.edge(me, peer, channel, generation)
        self.rank = sorted((me, peer)).index(me)
        self.peer_rank = 1 - self.rank
        self.timeout = timedelta(seconds=timeout_s)
        self.device = device if device is not None else torch.device("cpu")
        prefixed = dist.PrefixStore(self.name + "/", store)
        self.inbound = self.outbound = None
        if data_backend == "ring" and inbound_bytes > 0:  # before the group forms: the peer opens it after
            self.inbound = HostRing.create(self.name.replace("/", "_").replace("~", "-"), inbound_bytes)
            prefixed.set(f"ring/{self.rank}", self.inbound.path)
        self.ctl = dist.ProcessGroupGloo(dist.PrefixStore("ctl/", prefixed), self.rank, 2, self.timeout)
        self.data_backend = data_backend
        self.data = self._nccl(prefixed) if data_backend == "nccl" else self.ctl
        if data_backend == "ring":
            self._open_rings(prefixed)
        self._pending: collections.deque = collections.deque()
        self._max_pending = max_pending
        self._send_lock = threading.Lock()  # a message is 2-3 sends that must not interleave
        self.bytes_sent = 0
        self.bytes_received = 0
        self.closed = False
        _log.debug("edge %s up (rank %d, data over %s)", self.name, self.rank, data_backend)

    def _nccl(self, prefixed: dist.Store) -> dist.ProcessGroup:
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = self.timeout
        return dist.ProcessGroupNCCL(dist.PrefixStore("nccl/", prefixed), self.rank, 2, opts)

    def _open_rings(self, prefixed: dist.Store) -> None:
        """Map the peer's ring (it made it before joining the group), then, both ends mapped, unlink ours."""
        key = f"ring/{self.peer_rank}"
        if prefixed.check([key]):
            self.outbound = HostRing.open(prefixed.get(key).decode())
        self.ctl.barrier().wait(self.timeout)
        if self.inbound is not None:
            self.inbound.unlink()

    # -- sending -------------------------------------------------------------------------------
    def reserve(self, nbytes: int) -> int | None:
        """A place in the peer's ring for a tensor sent later (``send(ring=...)`` now, ``put`` once it is
        queued on the device); None without a ring or when it does not fit."""
        return self.outbound.reserve(nbytes) if self.outbound is not None else None

    def put(self, seq: int, tensor: torch.Tensor) -> None:
        """Queue the reserved tensor ``seq`` into the peer's ring (reserved order)."""
        self.outbound.put(seq, tensor)

    def send(self, msg: Any, tensor: torch.Tensor | None = None, fast: bool = False,
             ring: tuple[int, tuple[int, ...], torch.dtype] | None = None) -> None:
        """Queue ``msg`` (and ``tensor``) for the peer; returns without waiting for delivery. ``fast``:
        the tensor may go through the peer's ring; ``ring``: (sequence number, shape, dtype) of a tensor
        reserved there and put later. The receiver takes or skips ring tensors (``RingRead``) in order."""
        info = None
        if fast and tensor is not None and tensor.is_cuda and ring is None:
            seq = self.reserve(tensor.numel() * tensor.element_size())
            if seq is not None:
                self.put(seq, tensor)
                ring, tensor = (seq, tuple(tensor.shape), tensor.dtype), None
        if ring is not None:
            info = (tuple(ring[1]), str(ring[2]).removeprefix("torch."), ring[0])
        elif tensor is not None:
            tensor = self._for_wire(tensor)
            info = (tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))
        payload = torch.frombuffer(bytearray(pickle.dumps((msg, info), protocol=5)), dtype=torch.uint8)
        header = torch.tensor([payload.numel()], dtype=torch.int64)
        with self._send_lock:
            self._post(self.ctl, header)
            self._post(self.ctl, payload)
            self.bytes_sent += payload.numel() + 8
            if tensor is not None:
                self._post(self.data, tensor)
                self.bytes_sent += tensor.numel() * tensor.element_size()
            self._reap()

    def _for_wire(self, t: torch.Tensor) -> torch.Tensor:
        if self.data_backend != "nccl" and t.device.type != "cpu":
            torch.cuda.current_stream(t.device).synchronize()  # waits without the GIL; the copy then does not wait
            return t.to("cpu", non_blocking=False)
        return t.contiguous()

    def _post(self, pg: dist.ProcessGroup, t: torch.Tensor) -> None:
        self._pending.append((pg.send([t], self.peer_rank, _TAG), t))

    def _reap(self) -> None:
        while self._pending and (self._pending[0][0].is_completed() or len(self._pending) > self._max_pending):
            work, _ = self._pending.popleft()
            work.wait(self.timeout)

    def flush(self) -> None:
        """Wait until everything sent has been delivered."""
        with self._send_lock:
            while self._pending:
                work, _ = self._pending.popleft()
                work.wait(self.timeout)

    # -- receiving -----------------------------------------------------------------------------
    def recv(self, timeout_s: float | None = None) -> tuple[Any, torch.Tensor | RingRead | None]:
        """The next message from the peer (blocks at most the edge timeout, or ``timeout_s``); a tensor
        sent through the ring comes as a ``RingRead``."""
        timeout = self.timeout if timeout_s is None else timedelta(seconds=timeout_s)
        header = torch.empty(1, dtype=torch.int64)
        self.ctl.recv([header], self.peer_rank, _TAG).wait(timeout)
        payload = torch.empty(int(header.item()), dtype=torch.uint8)
        self.ctl.recv([payload], self.peer_rank, _TAG).wait(timeout)
        msg, info = pickle.loads(payload.numpy().tobytes())
        self.bytes_received += payload.numel() + 8
        if info is None:
            return msg, None
        if len(info) == 3:
            assert self.inbound is not None, f"{self.name}: a ring tensor without a ring"
            return msg, RingRead(self.inbound, info[2], info[0], getattr(torch, info[1]), self.device)
        shape, dtype = info
        on = self.device if self.data_backend == "nccl" else torch.device("cpu")
        t = torch.empty(shape, dtype=getattr(torch, dtype), device=on)
        self.data.recv([t], self.peer_rank, _TAG).wait(timeout)
        self.bytes_received += t.numel() * t.element_size()
        if t.device != self.device:
            t = t.to(self.device, non_blocking=False)
        return msg, t

    def release(self) -> None:
        """The peer died: let this process's streams pass every wait on its rings."""
        for ring in (self.inbound, self.outbound):
            if ring is not None:
                ring.release()

    def close(self) -> None:
        """Drop the groups (after a failure, without waiting for the dead peer) and retire the rings."""
        for ring in (self.inbound, self.outbound):
            if ring is not None:
                ring.retire()
        self.closed = True
        self._pending.clear()
        for pg in {id(self.ctl): self.ctl, id(self.data): self.data}.values():
            try:
                pg.abort()
            except Exception as e:  # already broken: nothing more to release
                _log.debug("abort of %s: %s", self.name, e)
