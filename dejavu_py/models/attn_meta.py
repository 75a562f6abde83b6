"""Where a step's tokens sit: positions, KV slots and the attention layout, shared by all layers.

Legend: T = new tokens of the step (sequences packed one after another), B = decode sequences
(one new token each), L = longest context among them, S = sequences whose logits are wanted,
H = query heads, K = KV heads, D = head dim, N = KV cache slots.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dejavu_py.models import triton_attention


@dataclass
class SeqSlice:
    """One sequence's part in a step, as the runner knows it."""

    start_pos: int
    """Tokens of the sequence already in the KV cache (the first new token's position)."""
    num_tokens: int
    """New tokens this step (the prompt on prefill, 1 on decode)."""
    block_table: list[int]
    """KV blocks of the sequence, in order."""
    wants_logits: bool = True
    """Whether the last new token's logits are needed (to sample the next token)."""


@dataclass
class PrefillSeq:
    """A sequence with several new tokens, attended on its own with a causal mask."""

    row: int
    """First row of its tokens in the packed T dimension."""
    num_tokens: int
    start_pos: int
    ctx_slots: torch.Tensor
    """int64 [start_pos + num_tokens] cache slots of its whole context."""


@dataclass
class AttnMeta:
    """Everything attention needs about one step, built once per step per stage."""

    positions_T: torch.Tensor
    """int64 [T] absolute position of each new token (for RoPE)."""
    slots_T: torch.Tensor
    """int64 [T] cache slot where each new token's K/V is written."""
    decode_rows_B: torch.Tensor
    """int64 [B] row in T of each single-token sequence."""
    decode_slots_BL: torch.Tensor
    """int64 [B, L] cache slots of each decode sequence's context, padded with slot 0."""
    decode_mask_BL: torch.Tensor
    """bool [B, L] True where a context position is real."""
    decode_len_B: torch.Tensor
    """int32 [B] context length of each decode sequence, its new token included."""
    prefills: list[PrefillSeq]
    """Multi-token sequences, attended one by one."""
    logits_rows_S: torch.Tensor
    """int64 [S] rows whose hidden state yields logits (last new token of each sampling sequence)."""

    @property
    def num_tokens(self) -> int:
        return int(self.positions_T.numel())


def slot_of(table: list[int], pos: int, block_size: int) -> int:
    return table[pos // block_size] * block_size + pos % block_size


def step_slots(tables: list[list[int]], start_pos: list[int], num_tokens: list[int], block_size: int) -> list[int]:
    """Cache slots of positions ``start_pos[i] .. start_pos[i] + num_tokens[i] - 1`` of each sequence, in
    order: what a step wrote, or a prompt's KV chunk holds (``slot_of``, inlined: it runs once per position of every
    step)."""
    bs = block_size
    if all(n == 1 for n in num_tokens):
        return [t[p // bs] * bs + p % bs for t, p in zip(tables, start_pos)]
    return [t[p // bs] * bs + p % bs for t, s, n in zip(tables, start_pos, num_tokens) for p in range(s, s + n)]


def context_slots(table: list[int], length: int, block_size: int) -> list[int]:
    """Cache slots of positions ``0..length-1`` of a sequence."""
    return step_slots([table], [0], [length], block_size)


def build_attn_meta(seqs: list[SeqSlice], block_size: int, device: torch.device | str = "cpu") -> AttnMeta:
    """Lay out one step: ``seqs`` in the order their tokens are packed in the step's input."""
    positions: list[int] = []
    slots: list[int] = []
    decode_rows: list[int] = []
    decode_ctx: list[list[int]] = []
    prefills: list[PrefillSeq] = []
    logits_rows: list[int] = []
    row = 0
    for s in seqs:
        end = s.start_pos + s.num_tokens
        if len(s.block_table) * block_size < end:
            raise ValueError(f"block table of {len(s.block_table)} blocks cannot hold {end} tokens")
        ctx = context_slots(s.block_table, end, block_size)
        positions.extend(range(s.start_pos, end))
        slots.extend(ctx[s.start_pos:])
        if s.num_tokens == 1:
            decode_rows.append(row)
            decode_ctx.append(ctx)
        else:
            prefills.append(PrefillSeq(row, s.num_tokens, s.start_pos, torch.tensor(ctx, dtype=torch.long, device=device)))
        if s.wants_logits:
            logits_rows.append(row + s.num_tokens - 1)
        row += s.num_tokens
    width = max((len(c) for c in decode_ctx), default=0)
    pad_slots = [c + [0] * (width - len(c)) for c in decode_ctx]
    mask = [[True] * len(c) + [False] * (width - len(c)) for c in decode_ctx]

    def t(x: list, dtype: torch.dtype = torch.long) -> torch.Tensor:
        return torch.tensor(x, dtype=dtype, device=device)

    return AttnMeta(
        positions_T=t(positions),
        slots_T=t(slots),
        decode_rows_B=t(decode_rows),
        decode_slots_BL=t(pad_slots).reshape(len(decode_ctx), width),
        decode_mask_BL=t(mask, torch.bool).reshape(len(decode_ctx), width),
        decode_len_B=t([len(c) for c in decode_ctx], torch.int32),
        prefills=prefills,
        logits_rows_S=t(logits_rows),
    )


def decode_meta(tables_BM: torch.Tensor, ctx_len_B: torch.Tensor, width: int, block_size: int) -> AttnMeta:
    """AttnMeta of a pure decode step computed on the device from block tables and context lengths,
    with no host work: what a captured CUDA graph replays. ``width`` (a multiple of ``block_size``)
    bounds every context length; rows padded past the real batch point at a scratch block."""
    B = tables_BM.shape[0]
    pos_L = torch.arange(width, device=tables_BM.device)
    slots_BL = tables_BM[:, pos_L // block_size].long() * block_size + pos_L % block_size  # [B, L]
    positions_B = ctx_len_B.long() - 1
    rows_B = torch.arange(B, device=tables_BM.device)
    return AttnMeta(
        positions_T=positions_B,
        slots_T=slots_BL.gather(1, positions_B[:, None]).squeeze(1),
        decode_rows_B=rows_B,
        decode_slots_BL=slots_BL,
        decode_mask_BL=pos_L[None, :] < ctx_len_B[:, None],
        decode_len_B=ctx_len_B,
        prefills=[],
        logits_rows_S=rows_B,
    )


def _prefill_groups(prefills: list[PrefillSeq]) -> tuple[dict[int, list[PrefillSeq]], list[PrefillSeq]]:
    """Fresh prompts (start 0) grouped by length, to attend as one batch; the rest one by one."""
    fresh: dict[int, list[PrefillSeq]] = {}
    rest = []
    for p in prefills:
        if p.start_pos == 0:
            fresh.setdefault(p.num_tokens, []).append(p)
        else:
            rest.append(p)
    return fresh, rest


def _fresh_prefill(q_THD, k_TKD, v_TKD, group: list[PrefillSeq], out_THD, scale: float) -> None:
    """Prompts of equal length from position 0: their context is exactly their new K/V."""
    n = group[0].num_tokens

    def batch(x: torch.Tensor) -> torch.Tensor:  # [G, heads, n, D]
        return torch.stack([x[p.row : p.row + n] for p in group]).transpose(1, 2)

    o_GHnD = F.scaled_dot_product_attention(batch(q_THD), batch(k_TKD), batch(v_TKD), is_causal=True, scale=scale,
                                            enable_gqa=True)
    for i, p in enumerate(group):
        out_THD[p.row : p.row + n] = o_GHnD[i].transpose(0, 1)


def paged_attention(
    q_THD: torch.Tensor,
    k_NKD: torch.Tensor,
    v_NKD: torch.Tensor,
    meta: AttnMeta,
    scale: float,
    new_k_TKD: torch.Tensor | None = None,
    new_v_TKD: torch.Tensor | None = None,
    triton: bool = False,
) -> torch.Tensor:
    """Causal attention of the step's new tokens over their cached context (new K/V already written).

    With the step's own K/V (``new_k_TKD``/``new_v_TKD``) fresh prompts of equal length are attended
    as one batch straight from them, without gathering from the cache. ``triton`` (the stage's choice,
    models/kernels.py): decode rows through the Triton kernel."""
    out_THD = torch.empty_like(q_THD)
    if meta.decode_rows_B.numel() and triton and k_NKD.dtype == q_THD.dtype:
        triton_attention.decode_attention(q_THD, k_NKD, v_NKD, meta.decode_rows_B, meta.decode_slots_BL,
                                          meta.decode_len_B, scale, out_THD)
    elif meta.decode_rows_B.numel():
        q_BH1D = q_THD[meta.decode_rows_B].unsqueeze(2)
        k_BKLD = k_NKD[meta.decode_slots_BL].transpose(1, 2)
        v_BKLD = v_NKD[meta.decode_slots_BL].transpose(1, 2)
        o_BH1D = F.scaled_dot_product_attention(
            q_BH1D, k_BKLD, v_BKLD, attn_mask=meta.decode_mask_BL[:, None, None, :], scale=scale, enable_gqa=True
        )
        out_THD[meta.decode_rows_B] = o_BH1D.squeeze(2)
    prefills = meta.prefills
    if new_k_TKD is not None and new_v_TKD is not None:
        fresh, prefills = _prefill_groups(meta.prefills)
        for group in fresh.values():
            _fresh_prefill(q_THD, new_k_TKD, new_v_TKD, group, out_THD, scale)
    for p in prefills:
        q_1HQD = q_THD[p.row : p.row + p.num_tokens].transpose(0, 1).unsqueeze(0)
        k_1KLD = k_NKD[p.ctx_slots].transpose(0, 1).unsqueeze(0)
        v_1KLD = v_NKD[p.ctx_slots].transpose(0, 1).unsqueeze(0)
        if p.start_pos == 0:
            o = F.scaled_dot_product_attention(q_1HQD, k_1KLD, v_1KLD, is_causal=True, scale=scale, enable_gqa=True)
        else:
            q_pos = torch.arange(p.start_pos, p.start_pos + p.num_tokens, device=q_THD.device)
            k_pos = torch.arange(p.start_pos + p.num_tokens, device=q_THD.device)
            mask_QL = k_pos[None, :] <= q_pos[:, None]
            o = F.scaled_dot_product_attention(q_1HQD, k_1KLD, v_1KLD, attn_mask=mask_QL, scale=scale, enable_gqa=True)
        out_THD[p.row : p.row + p.num_tokens] = o.squeeze(0).transpose(0, 1)
    return out_THD
