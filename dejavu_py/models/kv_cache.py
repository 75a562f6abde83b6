"""Paged KV cache of one stage: a pool of fixed-size blocks per local layer.

Legend: N = cache slots (num_blocks * block_size), K = KV heads, H = query heads, D = head dim,
T = new tokens of a step (all sequences packed).

A sequence owns a block table (list of block ids, given by the coordinator's block manager); token
``p`` of a sequence lives in slot ``table[p // block_size] * block_size + p % block_size``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CacheSpec:
    """Shape of one stage's KV cache."""

    num_blocks: int
    """Blocks per layer; capacity in tokens is ``num_blocks * block_size``."""
    block_size: int
    """Tokens per block."""
    num_kv_heads: int
    """KV heads of the model (GQA)."""
    head_dim: int
    """Per-head dimension."""

    def __post_init__(self) -> None:
        if self.num_blocks < 1 or self.block_size < 1:
            raise ValueError(f"KV cache needs at least one block of one token, got {self}")

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def bytes_per_token(self, num_layers: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * self.num_kv_heads * self.head_dim * torch.empty((), dtype=dtype).element_size()


class KVCache:
    """K and V pools for the decoder layers a stage owns, indexed by global layer number.

    One block beyond ``spec.num_blocks`` is a scratch block no sequence owns: padding rows of a
    bucketed decode step write there."""

    def __init__(self, spec: CacheSpec, layers: range, dtype: torch.dtype, device: torch.device | str) -> None:
        self.spec = spec
        self.layers = layers
        self.device = torch.device(device)
        self.scratch_block = spec.num_blocks
        # Called as on_update(layer, slots_T, k_TKD, v_TKD) after each write (prompt stages stream KV).
        self.on_update: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None
        shape = ((spec.num_blocks + 1) * spec.block_size, spec.num_kv_heads, spec.head_dim)
        self.k_NKD = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}
        self.v_NKD = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}

    def update(
        self, layer: int, slots_T: torch.Tensor, k_TKD: torch.Tensor, v_TKD: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new tokens' K/V of ``layer`` into their slots; return that layer's whole pools."""
        k_NKD, v_NKD = self.k_NKD[layer], self.v_NKD[layer]
        k_NKD.index_copy_(0, slots_T, k_TKD.to(k_NKD.dtype))
        v_NKD.index_copy_(0, slots_T, v_TKD.to(v_NKD.dtype))
        return self.written(layer, slots_T, k_TKD, v_TKD)

    def written(
        self, layer: int, slots_T: torch.Tensor, k_TKD: torch.Tensor, v_TKD: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``update`` for K/V a kernel already wrote into the pools: the hook, and the layer's pools."""
        if self.on_update is not None:
            self.on_update(layer, slots_T, k_TKD, v_TKD)
        return self.k_NKD[layer], self.v_NKD[layer]

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of ``layer`` at the given slots (copies), for replication and swapping."""
        return self.k_NKD[layer][slots], self.v_NKD[layer][slots]

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Put K/V (from a prompt stage, a replica or a host copy) into the given slots."""
        self.k_NKD[layer].index_copy_(0, slots, k.to(self.k_NKD[layer].dtype))
        self.v_NKD[layer].index_copy_(0, slots, v.to(self.v_NKD[layer].dtype))
