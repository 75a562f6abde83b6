"""KV block accounting, owned by the coordinator: every stage's cache mirrors the same block ids.

A sequence reserves at admission every block its prompt plus its max new tokens can need, so an
admitted sequence never runs out of cache and nothing is ever preempted.
"""
from __future__ import annotations

import heapq


class BlockManager:
    """Free-list of block ids ``0..num_blocks-1`` (lowest first, so runs are reproducible)."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks))
        heapq.heapify(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= len(self._free)

    def allocate(self, num_tokens: int) -> list[int]:
        n = self.blocks_for(num_tokens)
        if n > len(self._free):
            raise RuntimeError(f"KV cache full: need {n} blocks, {len(self._free)} free")
        return [heapq.heappop(self._free) for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            heapq.heappush(self._free, b)
