"""Microbatch swapping (DejaVu): more decode microbatches in flight than device memory holds.

The coordinator gives each decode microbatch its own partition of the (virtual) block space. A stage
keeps ``resident`` partitions in its device cache and every partition's home in (pinned) host memory.
Before a microbatch's step its partition is brought in, the least recently used one written back; and
after each step the next microbatch's partition is prefetched on a side stream, so on a GPU the copies
overlap the other microbatches' compute. Block tables stay virtual; the runner translates them.

Legend: P = partitions (microbatches), R = resident partitions, Pb = blocks per partition,
bs = block size, N = slots.
"""
from __future__ import annotations

import contextlib
import time

import torch

from dejavu_py import log
from dejavu_py.models.kv_cache import KVCache

_log = log.get(__name__)


class Swapper:
    def __init__(self, kv: KVCache, partitions: int, resident: int, blocks_per_partition: int) -> None:
        self.kv, self.P, self.R, self.Pb = kv, partitions, resident, blocks_per_partition
        self.bs = kv.spec.block_size
        self.rows = self.Pb * self.bs  # slots of one partition
        pin = kv.device.type == "cuda"
        shape = lambda t: (self.P * self.rows, *t.shape[1:])  # noqa: E731
        self.host_k = {l: torch.zeros(shape(t), dtype=t.dtype, pin_memory=pin) for l, t in kv.k_NKD.items()}
        self.host_v = {l: torch.zeros(shape(t), dtype=t.dtype, pin_memory=pin) for l, t in kv.v_NKD.items()}
        self.slot_of: dict[int, int] = {}  # partition -> device slot
        self.lru: list[int] = []  # resident partitions, least recently used first
        self.stream = torch.cuda.Stream(kv.device) if kv.device.type == "cuda" else None
        self.ready: dict[int, torch.cuda.Event] = {}
        self.swaps = 0
        self.bytes = 0
        self.seconds = 0.0

    # -- placement -------------------------------------------------------------------------------
    def ensure(self, partition: int) -> None:
        """``partition`` is resident (and its swap-in finished) before the caller uses the device cache."""
        if partition not in self.slot_of:
            self._swap_in(partition)
        self.lru.remove(partition)
        self.lru.append(partition)
        ev = self.ready.pop(partition, None)
        if ev is not None:
            torch.cuda.current_stream(self.kv.device).wait_event(ev)

    def prefetch(self, partition: int) -> None:
        """Start bringing ``partition`` in (asynchronously on a GPU), evicting another if needed."""
        if partition not in self.slot_of:
            self._swap_in(partition)

    def _swap_in(self, partition: int) -> None:
        t0 = time.perf_counter()
        if len(self.slot_of) < self.R:
            slot = next(s for s in range(self.R) if s not in self.slot_of.values())
        else:
            victim = self.lru.pop(0)
            slot = self.slot_of.pop(victim)
            self._copy(victim, slot, to_host=True)
        self._copy(partition, slot, to_host=False)
        self.slot_of[partition] = slot
        self.lru.append(partition)
        self.swaps += 1
        self.seconds += time.perf_counter() - t0

    def _copy(self, partition: int, slot: int, to_host: bool) -> None:
        dev = slice(slot * self.rows, (slot + 1) * self.rows)
        host = slice(partition * self.rows, (partition + 1) * self.rows)
        main = torch.cuda.current_stream(self.kv.device) if self.stream is not None else None
        if self.stream is not None:
            self.stream.wait_stream(main)  # the device blocks hold the latest step's K/V
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            for layer in self.kv.layers:
                for dev_t, host_t in ((self.kv.k_NKD[layer], self.host_k[layer]), (self.kv.v_NKD[layer], self.host_v[layer])):
                    if to_host:
                        host_t[host].copy_(dev_t[dev], non_blocking=True)
                    else:
                        dev_t[dev].copy_(host_t[host], non_blocking=True)
                    self.bytes += host_t[host].numel() * host_t.element_size()
        if self.stream is not None:
            ev = torch.cuda.Event()
            ev.record(self.stream)
            if to_host:
                ev.synchronize()  # the host copy must be whole before anyone writes that partition there
            else:
                self.ready[partition] = ev

    # -- addressing ------------------------------------------------------------------------------
    def translate(self, table: list[int]) -> list[int]:
        """Virtual block ids of a resident partition -> device block ids."""
        return [self.slot_of[b // self.Pb] * self.Pb + b % self.Pb for b in table]

    def write(self, layer: int, virtual_slots: list[int], k_TKD: torch.Tensor, v_TKD: torch.Tensor) -> None:
        """K/V arriving for sequences of any partition (prompt KV): to the device if resident, else home."""
        dev_rows, dev_idx, host_rows, host_idx = [], [], [], []
        for i, s in enumerate(virtual_slots):
            part, off = divmod(s, self.rows)
            if part in self.slot_of:
                dev_rows.append(i)
                dev_idx.append(self.slot_of[part] * self.rows + off)
            else:
                host_rows.append(i)
                host_idx.append(s)
        if dev_rows:
            self.ensure_ready_all()
            r = torch.tensor(dev_rows, device=k_TKD.device)
            self.kv.write(layer, torch.tensor(dev_idx, device=self.kv.device), k_TKD[r], v_TKD[r])
        if host_rows:
            r = torch.tensor(host_rows, device=k_TKD.device)
            idx = torch.tensor(host_idx)
            self.host_k[layer][idx] = k_TKD[r].to("cpu", self.host_k[layer].dtype)
            self.host_v[layer][idx] = v_TKD[r].to("cpu", self.host_v[layer].dtype)

    def read(self, layer: int, virtual_slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V at these (virtual) slots, from the device where resident, else from host memory."""
        self.ensure_ready_all()
        k = torch.empty((len(virtual_slots), *self.host_k[layer].shape[1:]), dtype=self.host_k[layer].dtype)
        v = torch.empty_like(k)
        for i, s in enumerate(virtual_slots):
            part, off = divmod(s, self.rows)
            if part in self.slot_of:
                j = self.slot_of[part] * self.rows + off
                k[i], v[i] = self.kv.k_NKD[layer][j].cpu(), self.kv.v_NKD[layer][j].cpu()
            else:
                k[i], v[i] = self.host_k[layer][s], self.host_v[layer][s]
        return k, v

    def ensure_ready_all(self) -> None:
        for ev in self.ready.values():
            torch.cuda.current_stream(self.kv.device).wait_event(ev)
        self.ready.clear()

    def stats(self) -> dict:
        return {"swaps": self.swaps, "swap_bytes": self.bytes, "swap_s": round(self.seconds, 4)}
