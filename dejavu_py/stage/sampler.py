"""Counter-based sampling: the token drawn for a sequence depends only on its logits, its sampling
parameters, its seed and the position being sampled, never on a shared generator stream.

So a seeded request gives the same tokens for any pipeline split, any batch mix or order, after a
recovery that replays steps, and on CPU or GPU (the noise is computed with exact integer ops and
float64 transcendentals, then rounded to float32).

Legend: S = sequences in the batch (rows), V = vocabulary.

Noise: ``u(seed, position, v)`` is a 32-bit murmur3-fmix hash of the 63-bit seed (two 32-bit halves),
the position and the vocabulary index, turned into a uniform on the odd multiples of 2**-24 in (0, 1)
(24 bits of precision, never 0 or 1). Gumbel-max draws the token:
``argmax(logits / T + G)``, ``G = -log(-log(u))``, over the tokens kept by top-k then top-p.

Exactness: the hash, the uniforms and the Gumbel noise are bit-identical on CPU and CUDA (checked on an
H100); given identical logits the tokens are too. Only the top-p cut goes through a softmax and a
cumsum, whose last-bit rounding may differ between devices: a token whose inclusion is decided within
~1e-7 of top_p can differ there (never between batch mixes on one device, as each row is reduced alone).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from dejavu_py.protocol.sampling import SamplingParams

MASK32 = 0xFFFFFFFF
_C1, _C2 = 0x85EBCA6B, 0xC2B2AE35  # murmur3 fmix32 multipliers
_LANE_A, _LANE_B = 0x9E3779B9, 0x7F4A7C15  # golden-ratio salts of the two 32-bit key lanes
_ELEM_SALT = 0x632BE5AB
# Rows are sampled in chunks of about this many logits: bounds the int64/float64 temporaries
# (~45 bytes a logit at the peak with top-k/top-p: ~0.7 GiB on a GPU) while keeping kernel launches few.
_CHUNK_ELEMS_CPU = 1 << 22
_CHUNK_ELEMS_GPU = 1 << 24


def fmix32_(h: Tensor) -> Tensor:
    """murmur3's 32-bit finaliser, in place, on an int64 tensor holding values in [0, 2**32).

    A bijection of that range. Each product is masked to 32 bits: a wrapped int64 product keeps its
    low 32 bits, so overflow does not matter.
    """
    h.bitwise_xor_(h >> 16).mul_(_C1).bitwise_and_(MASK32)
    h.bitwise_xor_(h >> 13).mul_(_C2).bitwise_and_(MASK32)
    return h.bitwise_xor_(h >> 16)


def fmix32(h: Tensor) -> Tensor:
    """:func:`fmix32_` on a copy."""
    return fmix32_(h.clone())


def _row_keys(seed_S: Tensor, position_S: Tensor) -> tuple[Tensor, Tensor]:
    """Two independent 32-bit keys per row from (seed, position): 64 bits, so rows never share noise.

    For one seed, distinct positions (mod 2**32) give distinct keys in each lane.
    """
    lo, hi = seed_S & MASK32, (seed_S >> 32) & MASK32
    pos = position_S & MASK32
    keys = []
    for salt in (_LANE_A, _LANE_B):
        k = fmix32_(lo ^ salt)
        k = fmix32_(k.bitwise_xor_(hi))
        keys.append(fmix32_(k.add_(pos).bitwise_and_(MASK32)))
    return keys[0], keys[1]


def random_bits(seed_S: Tensor, position_S: Tensor, vocab_size: int) -> Tensor:
    """The 32-bit hash ``h(seed, position, v)`` for every row and vocabulary index: int64 [S, V].

    Within a row all V values are distinct (a composition of bijections of v, for V <= 2**32).
    """
    ka, kb = _row_keys(seed_S.to(torch.int64), position_S.to(torch.int64))
    v = torch.arange(vocab_size, dtype=torch.int64, device=seed_S.device).mul_(_ELEM_SALT)
    h = fmix32_((v[None, :] + ka[:, None]).bitwise_and_(MASK32))
    return fmix32_(h.bitwise_xor_(kb[:, None]))


def uniform(seed_S: Tensor, position_S: Tensor, vocab_size: int) -> Tensor:
    """Uniforms in (0, 1), float64 [S, V]: ``(2k + 1) / 2**24`` with k the top 23 bits of the hash (exact)."""
    k = random_bits(seed_S, position_S, vocab_size).bitwise_right_shift_(9)
    return k.mul_(2).add_(1).to(torch.float64).mul_(2.0**-24)


def gumbel(seed_S: Tensor, position_S: Tensor, vocab_size: int) -> Tensor:
    """Gumbel(0, 1) noise, float32 [S, V], computed in float64 then rounded (same on every device)."""
    u = uniform(seed_S, position_S, vocab_size)
    return u.log_().neg_().log_().neg_().to(torch.float32)


def _filter_mask(logits_SV: Tensor, temperature_S: Tensor, top_p_S: Tensor, top_k_S: Tensor) -> Tensor:
    """bool [S, V]: tokens kept by top-k (on the raw logits, ties to the lowest id) then top-p.

    top-p keeps the fewest highest-probability tokens of softmax(logits / T), renormalised over the
    top-k set, whose sum is >= top_p; the most likely token always stays. top_k = 0 and top_p >= 1
    keep everything, exactly (no rounding can drop a token).
    """
    V = logits_SV.shape[1]
    sorted_l, order = torch.sort(logits_SV, dim=1, descending=True, stable=True)
    rank = torch.arange(V, device=logits_SV.device)[None, :]
    keep = rank < torch.where(top_k_S > 0, top_k_S, V)[:, None]
    t = torch.where(temperature_S > 0, temperature_S, 1.0).to(torch.float32)[:, None]
    scaled = sorted_l.div_(t).masked_fill_(~keep, float("-inf"))
    probs = torch.softmax(scaled, dim=1)
    del sorted_l, scaled
    # Sums in float64: a one-row cumsum may take another algorithm than a batched one (CUDA), and a
    # float32 sum could then round differently right at the top_p cut.
    before = torch.cumsum(probs, dim=1, dtype=torch.float64).sub_(probs)  # mass of better-ranked tokens
    top_p = top_p_S.to(torch.float32).double()[:, None]
    keep &= (before < top_p) | (top_p >= 1) | (rank == 0)
    return torch.zeros_like(keep).scatter_(1, order, keep)


def _draw(
    logits_SV: Tensor, temperature_S: Tensor, top_p_S: Tensor, top_k_S: Tensor, seed_S: Tensor, position_S: Tensor,
    filtered: bool,
) -> Tensor:  # fmt: skip
    """argmax(logits / T + G) per row over the kept tokens (rows with T = 0 give a value to discard)."""
    if filtered:
        keep = _filter_mask(logits_SV, temperature_S, top_p_S, top_k_S)
        logits_SV = logits_SV.masked_fill(~keep, float("-inf"))
        del keep
    t = torch.where(temperature_S > 0, temperature_S, 1.0).to(torch.float32)[:, None]
    scores = logits_SV / t
    scores += gumbel(seed_S, position_S, logits_SV.shape[1])
    return scores.argmax(dim=1)


def sample(
    logits_SV: Tensor,
    temperature_S: Tensor,
    top_p_S: Tensor,
    top_k_S: Tensor,
    seed_S: Tensor,
    position_S: Tensor,
    *,
    all_greedy: bool | None = None,
    any_filter: bool | None = None,
) -> Tensor:
    """The next token of each row, int64 [S].

    ``temperature_S`` (float, 0 = greedy), ``top_p_S`` (float in (0, 1]), ``top_k_S`` (int, 0 = off),
    ``seed_S`` (int64 in [0, 2**63)), ``position_S`` (int64: index in the full sequence of the token
    being sampled) are per-row tensors on the logits' device. ``all_greedy`` / ``any_filter`` are
    hints computed on the host (see :class:`SamplingBatch`); when None they are read from the
    tensors (a device sync). They only skip work: results are the same either way.

    Rows are processed in chunks of about ``_CHUNK_ELEMS_*`` logits (each row alone decides its
    token, so chunking changes nothing): transient memory stays under ~0.75 GiB on a GPU.
    """
    if logits_SV.dim() != 2:
        raise ValueError(f"logits must be [S, V], got shape {tuple(logits_SV.shape)}")
    logits_SV = logits_SV.float()
    greedy_tok = logits_SV.argmax(dim=1)
    S, V = logits_SV.shape
    if all_greedy is None:
        all_greedy = not bool((temperature_S > 0).any())
    if all_greedy or S == 0:
        return greedy_tok
    if any_filter is None:
        any_filter = bool(((top_k_S > 0) | (top_p_S < 1)).any())
    chunk = _CHUNK_ELEMS_CPU if logits_SV.device.type == "cpu" else _CHUNK_ELEMS_GPU
    rows = max(1, chunk // max(V, 1))
    drawn = torch.empty_like(greedy_tok)
    for a in range(0, S, rows):
        r = slice(a, min(S, a + rows))
        drawn[r] = _draw(logits_SV[r], temperature_S[r], top_p_S[r], top_k_S[r], seed_S[r], position_S[r], any_filter)
    return torch.where(temperature_S > 0, drawn, greedy_tok)


@dataclass
class SamplingBatch:
    """Per-row sampling tensors of one step, built on the host once, plus hints that spare a device sync."""

    temperature: Tensor
    """float32 [S]; 0 = greedy."""
    top_p: Tensor
    """float32 [S]."""
    top_k: Tensor
    """int64 [S]; 0 = off."""
    seed: Tensor
    """int64 [S]."""
    position: Tensor
    """int64 [S]: index in the full sequence of the token being sampled."""
    all_greedy: bool
    """No row samples: the step is a plain argmax."""
    any_filter: bool
    """Some sampling row uses top-k or top-p."""

    def sample(self, logits_SV: Tensor) -> Tensor:
        return sample(
            logits_SV,
            self.temperature,
            self.top_p,
            self.top_k,
            self.seed,
            self.position,
            all_greedy=self.all_greedy,
            any_filter=self.any_filter,
        )


def make_sampling_batch(
    params: Sequence[SamplingParams], positions: Sequence[int], device: torch.device | str = "cpu"
) -> SamplingBatch:
    """The tensors of :func:`sample` for rows with these parameters, sampling at these positions."""
    if len(params) != len(positions):
        raise ValueError(f"{len(params)} sampling params but {len(positions)} positions")
    sampling = [p for p in params if p.temperature > 0]

    def t(values: list, dtype: torch.dtype) -> Tensor:
        return torch.tensor(values, dtype=dtype, device=device)

    return SamplingBatch(
        temperature=t([p.temperature for p in params], torch.float32),
        top_p=t([p.top_p for p in params], torch.float32),
        top_k=t([p.top_k for p in params], torch.int64),
        seed=t([p.seed for p in params], torch.int64),
        position=t([int(x) for x in positions], torch.int64),
        all_greedy=not sampling,
        any_filter=any(p.top_k > 0 or p.top_p < 1 for p in sampling),
    )
