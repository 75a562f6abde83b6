"""What the Triton kernels of dejavu_py share: the optional import, whether kernels can run, and the
sum combine for ``tl.reduce`` / ``tl.associative_scan``.

Triton is optional: every kernel module imports without it; ``available()`` says whether it is
installed, ``interpreting()`` whether kernels run in its numpy interpreter (TRITON_INTERPRET=1, how
the CPU tests run them). Kernels are jitted on first use, per interpreter setting.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU CI without triton: only the pure-torch paths work
    triton = None
    tl = None

if triton is not None:
    # the sum for tl.reduce / tl.associative_scan: triton's own (tl.sum's), which the interpreter runs
    # with numpy; else ours (the interpreter calls its .fn element by element: correct, slow)
    _add_combine = getattr(tl.standard, "_sum_combine", None)
    if _add_combine is None:

        @triton.jit
        def _add_combine(a, b):
            return a + b

    _max_combine = getattr(tl.standard, "_elementwise_max", None)  # the interpreter runs these with numpy too
    if _max_combine is None:

        @triton.jit
        def _max_combine(a, b):
            return tl.maximum(a, b)

    _min_combine = getattr(tl.standard, "_elementwise_min", None)
    if _min_combine is None:

        @triton.jit
        def _min_combine(a, b):
            return tl.minimum(a, b)

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
"""Activation and weight dtypes the kernels take (routing weights may differ)."""


def available() -> bool:
    """Whether triton is installed (kernels also need CUDA, or TRITON_INTERPRET=1 on CPU)."""
    return triton is not None


def interpreting() -> bool:
    """Whether triton runs kernels in its numpy interpreter (TRITON_INTERPRET=1)."""
    return triton is not None and bool(triton.knobs.runtime.interpret)
