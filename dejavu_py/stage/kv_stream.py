"""Prompt-token disaggregation: KV travels layer by layer from prompt stages to token stages.

The prompt side hooks the stage's KV cache: the moment a layer's K/V of a prefill step is written,
it is sent (asynchronously) to the token stage that owns the layer, so the transfer overlaps the rest
of the prefill. The token side writes arriving chunks into its own cache, at the slots of the token
pipeline's block table, and reports each sequence once all of its layers are in.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from dejavu_py.models.kv_cache import KVCache
from dejavu_py.protocol.plan import KVChunk, SeqState, StepPlan
from dejavu_py.stage.swap import Swapper


class KVStreamer:
    """Prompt stage: ``on_update(layer, slots, k, v)`` is the KV cache hook; ``begin(plan)`` says which
    sequences the following updates belong to."""

    def __init__(self, send: Callable[[str, KVChunk, torch.Tensor], None], owner_of_layer: Callable[[int], str]):
        self._send, self._owner = send, owner_of_layer
        self._chunk: KVChunk | None = None

    def begin(self, plan: StepPlan, seqs: dict[int, SeqState]) -> None:
        tables = [seqs[s].kv_table for s in plan.seq_ids]
        if any(t is None for t in tables):
            raise RuntimeError(f"prefill plan {plan.step} lacks token-pipeline block tables")
        self._chunk = KVChunk(-1, plan.seq_ids, plan.start_pos, plan.num_tokens, tables)

    def on_update(self, layer: int, slots_T: torch.Tensor, k_TKD: torch.Tensor, v_TKD: torch.Tensor) -> None:
        if self._chunk is None:
            return
        c = self._chunk
        chunk = KVChunk(layer, c.seq_ids, c.start_pos, c.num_tokens, c.tables)
        self._send(self._owner(layer), chunk, torch.stack((k_TKD, v_TKD)))


class KVReceiver:
    """Token stage: puts chunks into the cache; a sequence is complete when all its layers arrived."""

    def __init__(self, kv: KVCache, block_size: int, swapper: Swapper | None = None) -> None:
        self.kv, self.block_size, self.swapper = kv, block_size, swapper
        self._layers_seen: dict[int, set[int]] = {}
        self._bytes: dict[int, int] = {}

    def apply(self, chunk: KVChunk, kv_2TKD: torch.Tensor, slots: list[int]) -> list[tuple[int, int]]:
        """Write one chunk at its cache ``slots`` (``attn_meta.step_slots`` of its tables and positions);
        returns (sequence, bytes) for those whose KV became complete."""
        k_TKD, v_TKD = kv_2TKD[0].to(self.kv.device), kv_2TKD[1].to(self.kv.device)
        if self.swapper is not None:  # the sequence's partition may be in host memory right now
            self.swapper.write(chunk.layer, slots, k_TKD, v_TKD)
        else:
            self.kv.write(chunk.layer, torch.tensor(slots, dtype=torch.long, device=self.kv.device), k_TKD, v_TKD)
        per_token = kv_2TKD[0, 0].numel() * 2 * kv_2TKD.element_size()
        done = []
        for sid, n in zip(chunk.seq_ids, chunk.num_tokens):
            seen = self._layers_seen.setdefault(sid, set())
            seen.add(chunk.layer)
            self._bytes[sid] = self._bytes.get(sid, 0) + n * per_token
            if seen >= set(self.kv.layers):
                done.append((sid, self._bytes.pop(sid)))
                del self._layers_seen[sid]
        return done

    def forget(self, seq_ids: list[int]) -> None:
        for sid in seq_ids:
            self._layers_seen.pop(sid, None)
            self._bytes.pop(sid, None)
