"""Triton kernels for the small per-layer ops of a step: RMSNorm, residual add + RMSNorm, RoPE of q and k
(with the KV cache write).

Also SwiGLU's silu(gate) * up on a fused gate/up projection's output (``silu_mul``).

Legend (shape suffixes):
  T = tokens of the step            D = the normalised (last) dim: hidden size, a projection or a head
  R = rows normalised: numel / D    H = query heads, K = KV heads, Dh = head dim (Dh / 2 = its half)

Eager torch takes ~7 launches per RMSNorm and ~5 per rotary; each op here is one. The kernels round
where eager torch rounds (every bf16/fp16 elementwise op computes in float32 and rounds its result),
so they are bitwise equal to the eager code except for the order of the sum in RMSNorm's mean
(mean = sum * fl32(1 / D), as torch's CUDA mean; the CPU mean divides, equal when D is a power of 2).
Launches use ``enable_fp_fusion=False`` so that no mul + add pair becomes an FMA that eager has not.

Shapes and launch sizes depend only on the tensors' shapes: no host sync, CUDA-graph capturable.
Triton is optional: ``supports(device, dtype)`` says whether these ops can run (triton installed, CUDA
or the interpreter on); a stage uses them when it can and the run's --triton-ops allows it, chosen once
at load (models/kernels.py). Kernels are jitted on first use, per TRITON_INTERPRET setting, as in
``fused_moe``.
"""
from __future__ import annotations

import functools
from typing import Any

import torch

from dejavu_py.models.triton_base import DTYPES, available, interpreting, tl, triton

if triton is not None:
    from dejavu_py.models.triton_base import (
        _add_combine,  # tl.sum's combine, which the interpreter runs with numpy
    )


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the Triton ops can run on ``device`` in ``dtype``: triton, CUDA (or the interpreter), a
    supported dtype."""
    return available() and (device.type == "cuda" or interpreting()) and dtype in DTYPES


# ---------------------------------------------------------------- kernels (jitted in _kernels)
# Only builtins of triton.language (see fused_moe): tl.sum is a jit function, tl.reduce is not.


def _rms_norm_kernel(
    x_ptr, delta_ptr, w_ptr, res_ptr, out_ptr,  # x, delta, res, out [R, D]; w [D]
    eps, inv_d,
    D: tl.constexpr, BLOCK: tl.constexpr, ADD: tl.constexpr,
):
    """One row: (ADD) res = x + delta; out = w * (h * rsqrt(mean(h * h) + eps)), h = float32 of x (or res)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < D
    x = tl.load(x_ptr + row * D + offs, mask=ok, other=0.0)
    if ADD:  # the residual add, rounded to its dtype as torch's add
        d = tl.load(delta_ptr + row * D + offs, mask=ok, other=0.0)
        x = (x.to(tl.float32) + d.to(tl.float32)).to(res_ptr.dtype.element_ty)
        tl.store(res_ptr + row * D + offs, x, mask=ok)
    h = x.to(tl.float32)
    ssq = tl.reduce(h * h, 0, _add_combine)
    r = tl.rsqrt(ssq * inv_d + eps)
    y = (h * r).to(x.dtype).to(tl.float32)  # eager rounds h * r to the input dtype before the weight
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * D + offs, (w * y).to(out_ptr.dtype.element_ty), mask=ok)


def _rotary_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr,  # q, qo [T, H, Dh]; k, ko [T, K, Dh]; cos, sin [T, Dh]
    v_ptr, slots_ptr, kc_ptr, vc_ptr, stride_vt,  # CACHE: v [T, K, Dh] (rows stride_vt), slots [T], pools [N, K, Dh]
    H: tl.constexpr, K: tl.constexpr, HALF: tl.constexpr,
    H_PAD: tl.constexpr, K_PAD: tl.constexpr, HALF_PAD: tl.constexpr, CACHE: tl.constexpr,
):
    """One token, all its q and k heads: out = x * cos + rotate_half(x) * sin, each op rounded as eager.
    With CACHE the rotated k and the token's v also go into the KV pools at its slot (``KVCache.update``).

    With x = [lo, hi]: rotate_half(x) = [-hi, lo], so out_lo = lo * cos_lo - hi * sin_lo and
    out_hi = hi * cos_hi + lo * sin_hi; every product and the sum round to the output dtype.
    """
    t = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, HALF_PAD)
    j_ok = j < HALF
    cs = t * 2 * HALF + j
    c_lo = tl.load(cos_ptr + cs, mask=j_ok, other=0.0).to(tl.float32)
    c_hi = tl.load(cos_ptr + cs + HALF, mask=j_ok, other=0.0).to(tl.float32)
    s_lo = tl.load(sin_ptr + cs, mask=j_ok, other=0.0).to(tl.float32)
    s_hi = tl.load(sin_ptr + cs + HALF, mask=j_ok, other=0.0).to(tl.float32)
    c_lo, c_hi, s_lo, s_hi = c_lo[None, :], c_hi[None, :], s_lo[None, :], s_hi[None, :]

    hq = tl.arange(0, H_PAD)
    offs = t * H * 2 * HALF + hq[:, None] * 2 * HALF + j[None, :]
    ok = (hq[:, None] < H) & j_ok[None, :]
    lo = tl.load(q_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    hi = tl.load(q_ptr + offs + HALF, mask=ok, other=0.0).to(tl.float32)
    io = qo_ptr.dtype.element_ty
    out_lo = (lo * c_lo).to(io).to(tl.float32) + (-hi * s_lo).to(io).to(tl.float32)
    out_hi = (hi * c_hi).to(io).to(tl.float32) + (lo * s_hi).to(io).to(tl.float32)
    tl.store(qo_ptr + offs, out_lo.to(io), mask=ok)
    tl.store(qo_ptr + offs + HALF, out_hi.to(io), mask=ok)

    hk = tl.arange(0, K_PAD)
    offs = t * K * 2 * HALF + hk[:, None] * 2 * HALF + j[None, :]
    ok = (hk[:, None] < K) & j_ok[None, :]
    lo = tl.load(k_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    hi = tl.load(k_ptr + offs + HALF, mask=ok, other=0.0).to(tl.float32)
    io = ko_ptr.dtype.element_ty
    out_lo = (lo * c_lo).to(io).to(tl.float32) + (-hi * s_lo).to(io).to(tl.float32)
    out_hi = (hi * c_hi).to(io).to(tl.float32) + (lo * s_hi).to(io).to(tl.float32)
    tl.store(ko_ptr + offs, out_lo.to(io), mask=ok)
    tl.store(ko_ptr + offs + HALF, out_hi.to(io), mask=ok)
    if CACHE:
        slot = tl.load(slots_ptr + t).to(tl.int64)
        cache = slot * K * 2 * HALF + hk[:, None] * 2 * HALF + j[None, :]
        cdt = kc_ptr.dtype.element_ty
        tl.store(kc_ptr + cache, out_lo.to(io).to(cdt), mask=ok)
        tl.store(kc_ptr + cache + HALF, out_hi.to(io).to(cdt), mask=ok)
        v_offs = t * stride_vt + hk[:, None] * 2 * HALF + j[None, :]
        tl.store(vc_ptr + cache, tl.load(v_ptr + v_offs, mask=ok, other=0.0).to(cdt), mask=ok)
        tl.store(vc_ptr + cache + HALF, tl.load(v_ptr + v_offs + HALF, mask=ok, other=0.0).to(cdt), mask=ok)


def _silu_mul_kernel(
    gu_ptr, out_ptr,  # gu [T, >= 2F] (gate columns, then up columns), row stride STRIDE; out [T, F]
    F, STRIDE, BLOCK: tl.constexpr,
):
    """out = silu(gate) * up, each rounded to the dtype as eager (F.silu, then the product)."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < F
    g = tl.load(gu_ptr + t * STRIDE + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + t * STRIDE + F + offs, mask=ok, other=0.0).to(tl.float32)
    io = out_ptr.dtype.element_ty
    act = (g / (1.0 + tl.exp(-g))).to(io).to(tl.float32)
    tl.store(out_ptr + t * F + offs, (act * u).to(io), mask=ok)


@functools.lru_cache(maxsize=2)
def _kernels(interpret: bool) -> tuple[Any, Any, Any]:
    """(rms_norm, rotary, silu_mul) jitted; triton.jit picks the interpreter from TRITON_INTERPRET as it decorates."""
    assert triton is not None and interpret == interpreting()
    return triton.jit(_rms_norm_kernel), triton.jit(_rotary_kernel), triton.jit(_silu_mul_kernel)


# ---------------------------------------------------------------- wrappers


@functools.lru_cache(maxsize=64)
def _inv(n: int) -> float:
    """fl32(1 / n), the factor of torch's CUDA mean (exactly representable as a Python float)."""
    return float(torch.tensor(1.0, dtype=torch.float32) / torch.tensor(float(n), dtype=torch.float32))


def _warps(block: int) -> int:
    return min(16, max(1, block // 256))


def _check(*tensors: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError("triton_ops needs triton")
    for t in tensors:
        assert t.dtype in DTYPES, f"dtype {t.dtype}: one of {DTYPES} expected"
        if not t.is_cuda and not interpreting():
            raise RuntimeError("triton_ops on CPU runs only in the triton interpreter (TRITON_INTERPRET=1)")


def _norm_launch(
    x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
    res: torch.Tensor | None, out: torch.Tensor,
) -> None:
    D = x.shape[-1]
    assert weight.shape == (D,), f"weight {tuple(weight.shape)} for rows of {D}"
    rows = x.numel() // D if D else 0
    if rows == 0:
        return
    block = triton.next_power_of_2(D)
    _kernels(interpreting())[0][(rows,)](
        x, x if delta is None else delta, weight, out if res is None else res, out, float(eps), _inv(D),
        D=D, BLOCK=block, ADD=delta is not None, num_warps=_warps(block), enable_fp_fusion=False,
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``RMSNorm.forward`` over the last dim of any shape: weight * (x / rms(x)), stats in float32."""
    _check(x, weight)
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    _norm_launch(x, None, weight.contiguous(), eps, None, out)
    return out


def add_rms_norm(
    h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + delta, rms_norm(h + delta)) in one launch; the sum rounded to its dtype first, as eager."""
    _check(h, delta, weight)
    assert h.shape == delta.shape, f"h {tuple(h.shape)} vs delta {tuple(delta.shape)}"
    h, delta = h.contiguous(), delta.contiguous()
    h_new = torch.empty(h.shape, dtype=torch.promote_types(h.dtype, delta.dtype), device=h.device)
    out = torch.empty(h.shape, dtype=torch.promote_types(weight.dtype, h_new.dtype), device=h.device)
    _norm_launch(h, delta, weight.contiguous(), eps, h_new, out)
    return h_new, out


def rotary(
    q_THD: torch.Tensor, k_TKD: torch.Tensor, cos_TD: torch.Tensor, sin_TD: torch.Tensor,
    cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(``apply_rotary(q)``, ``apply_rotary(k)``) in one launch, one program per token. ``cache`` =
    (k_NKD, v_NKD, slots_T, v_TKD): the launch also writes the rotated k and v at the slots, as
    ``KVCache.update`` does (v's rows may be strided, its heads not)."""
    _check(q_THD, k_TKD, cos_TD, sin_TD)
    (T, H, Dh), K = q_THD.shape, k_TKD.shape[1]
    assert k_TKD.shape == (T, K, Dh) and cos_TD.shape == sin_TD.shape == (T, Dh) and Dh % 2 == 0, (
        f"q {tuple(q_THD.shape)}, k {tuple(k_TKD.shape)}, cos {tuple(cos_TD.shape)}, sin {tuple(sin_TD.shape)}"
    )
    cs_dtype = torch.promote_types(cos_TD.dtype, sin_TD.dtype)
    q_out = torch.empty(q_THD.shape, dtype=torch.promote_types(q_THD.dtype, cs_dtype), device=q_THD.device)
    k_out = torch.empty(k_TKD.shape, dtype=torch.promote_types(k_TKD.dtype, cs_dtype), device=k_TKD.device)
    if T == 0:
        return q_out, k_out
    if cache is not None:
        k_NKD, v_NKD, slots_T, v_TKD = cache
        assert k_NKD.is_contiguous() and v_NKD.is_contiguous() and k_NKD.shape[1:] == (K, Dh)
        assert v_TKD.shape == (T, K, Dh) and v_TKD.stride(2) == 1 and v_TKD.stride(1) == Dh, tuple(v_TKD.stride())
        extra = (v_TKD, slots_T, k_NKD, v_NKD, v_TKD.stride(0))
    else:
        extra = (k_TKD, k_TKD, k_TKD, k_TKD, 0)  # unused
    np2 = triton.next_power_of_2
    _kernels(interpreting())[1][(T,)](
        q_THD.contiguous(), k_TKD.contiguous(), cos_TD.contiguous(), sin_TD.contiguous(), q_out, k_out, *extra,
        H=H, K=K, HALF=Dh // 2, H_PAD=np2(H), K_PAD=np2(K), HALF_PAD=np2(Dh // 2), CACHE=cache is not None,
        num_warps=_warps(np2(H) * np2(Dh)), enable_fp_fusion=False,
    )
    return q_out, k_out


def silu_mul(gu_TX: torch.Tensor, width: int) -> torch.Tensor:
    """``F.silu(gu[:, :width]) * gu[:, width:2 * width]`` in one launch (a fused gate/up projection's output,
    which may hold more columns after those)."""
    _check(gu_TX)
    assert gu_TX.dim() == 2 and gu_TX.stride(1) == 1 and gu_TX.shape[1] >= 2 * width, (tuple(gu_TX.shape), width)
    T = gu_TX.shape[0]
    out = torch.empty((T, width), dtype=gu_TX.dtype, device=gu_TX.device)
    if T:
        block = 1024
        _kernels(interpreting())[2][(T, triton.cdiv(width, block))](
            gu_TX, out, width, gu_TX.stride(0), BLOCK=block, num_warps=4, enable_fp_fusion=False)
    return out
