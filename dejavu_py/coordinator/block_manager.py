"""KV block accounting, owned by the coordinator: every stage's cache mirrors the same block ids.

A sequence reserves at admission every block its prompt plus its max new tokens can need, so an
admitted sequence never runs out of cache and nothing is ever preempted. With microbatch swapping the
block space is split into one partition per decode microbatch (a partition moves between device and
host memory as a whole), and a sequence takes its blocks from its microbatch's partition.
"""
from __future__ import annotations

import heapq


class BlockManager:
    """Free lists of block ids ``0..num_blocks-1`` (lowest first, so runs are reproducible), in
    ``partitions`` equal contiguous partitions."""

    def __init__(self, num_blocks: int, block_size: int, partitions: int = 1) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.partitions = partitions
        self.per_partition = num_blocks // partitions
        self._free = [list(range(p * self.per_partition, (p + 1) * self.per_partition)) for p in range(partitions)]
        for f in self._free:
            heapq.heapify(f)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_free(self, partition: int = 0) -> int:
        return len(self._free[partition])

    def can_allocate(self, num_tokens: int, partition: int = 0) -> bool:
        return self.blocks_for(num_tokens) <= len(self._free[partition])

    def allocate(self, num_tokens: int, partition: int = 0) -> list[int]:
        n, free = self.blocks_for(num_tokens), self._free[partition]
        if n > len(free):
            raise RuntimeError(f"KV cache partition {partition} full: need {n} blocks, {len(free)} free")
        return [heapq.heappop(free) for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            heapq.heappush(self._free[b // self.per_partition], b)
