#!/usr/bin/env python
"""Routed-expert paths on CUDA: the Triton fused kernels vs torch grouped_mm vs the per-expert loop.

    python tools/bench_moe_kernel.py                      # olmoe + qwen1.5-moe shapes, T 1..1024, bf16 + fp32
    python tools/bench_moe_kernel.py --sweep --dtypes bf16  # also time other block configs of the fused path

One JSON line per (model, dtype, T): errors against the loop and against a float32 reference on the
same (rounded) inputs, and ms per call eager and under a captured CUDA graph. Each timed run cycles
over ROUTINGS different routings so that consecutive calls touch different experts (less L2 reuse).
``fused_gbps`` = bytes of the experts touched / graph time per call. With --sweep, one more line per
(case, block config). Random weights; routing as the models' router (softmax, top-k, weights renormalised).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dejavu_py.models import fused_moe  # noqa: E402
from dejavu_py.models.moe import expert_ffn  # noqa: E402

MODELS = {
    "olmoe": dict(E=64, D=2048, F=1024, K=8),
    "qwen1.5-moe": dict(E=60, D=2048, F=1408, K=4),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ROUTINGS = 8
SWEEP = [  # BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages
    (16, 32, 128, 4, 4), (16, 64, 128, 4, 3), (16, 64, 128, 4, 4), (16, 64, 256, 4, 3), (16, 128, 128, 4, 3),
    (16, 128, 64, 4, 4), (32, 64, 128, 4, 3), (32, 128, 64, 4, 4), (64, 64, 64, 4, 3), (64, 128, 64, 8, 3),
    (64, 128, 64, 4, 4), (128, 128, 64, 8, 3),
]
Fn = Callable[[int], torch.Tensor]  # routing index -> y_TD


def routings(T: int, E: int, K: int, dtype: torch.dtype, gen: torch.Generator) -> list[tuple[torch.Tensor, ...]]:
    """ROUTINGS (ids_TK, weights_TK) pairs; weights in the model dtype, as olmoe and qwen cast them."""
    out = []
    for _ in range(ROUTINGS):
        probs_TE = torch.softmax(torch.randn(T, E, generator=gen, device="cuda"), dim=-1)
        w_TK, ids_TK = torch.topk(probs_TE, K, dim=-1)
        out.append((ids_TK, (w_TK / w_TK.sum(-1, keepdim=True)).to(dtype)))
    return out


def time_eager(fn: Fn, iters: int) -> float:
    for i in range(ROUTINGS):
        fn(i)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(iters):
        fn(i % ROUTINGS)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def time_graph(fn: Fn, replays: int) -> float:
    """ms per call of a graph holding one call per routing (graph launch amortised over ROUTINGS calls)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compiles triton kernels) off the capture
        for i in range(ROUTINGS):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(ROUTINGS):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (replays * ROUTINGS)


def attempt(what: Callable[[], float | torch.Tensor], errors: dict[str, str], name: str):
    try:
        return what()
    except Exception as e:  # report and go on: e.g. grouped_mm without fp32, a config out of shared memory
        errors[name] = f"{type(e).__name__}: {str(e)[:200]}"
        return None


def max_err(a: torch.Tensor | None, b: torch.Tensor | None) -> float | None:
    return None if a is None or b is None else (a.float() - b.float()).abs().max().item()


def errors_vs_loop(paths: dict[str, Fn], y_ref: torch.Tensor, errors: dict[str, str]) -> dict[str, float | None]:
    """Max abs error of fused and grouped against the loop, and of each path against the fp32 reference."""
    y_loop = paths["loop"](0)
    ys = {k: attempt(lambda k=k: paths[k](0), errors, k) for k in ("fused", "grouped")}
    err = {f"{k}_vs_loop": max_err(y, y_loop) for k, y in ys.items()}
    err.update({f"{k}_vs_ref": max_err(y, y_ref) for k, y in {**ys, "loop": y_loop}.items()})
    err["ref_max_abs"] = y_ref.abs().max().item()
    return err


def is_ok(err: dict[str, float | None], dtype: torch.dtype) -> bool:
    """Fused within tolerance of the loop and not much further from the reference than the loop."""
    tol, scale = (1e-4 if dtype == torch.float32 else 2e-2), err["ref_max_abs"]
    if err["fused_vs_loop"] is None:
        return False
    near_loop = err["fused_vs_loop"] <= tol * max(scale, 1.0)
    return near_loop and err["fused_vs_ref"] <= 1.5 * err["loop_vs_ref"] + tol * scale


def run_case(model: str, shape: dict[str, int], dtype_name: str, T: int, weights32, args) -> None:
    E, D, F, K = shape["E"], shape["D"], shape["F"], shape["K"]
    dtype = DTYPES[dtype_name]
    w_gu, w_d = (w.to(dtype) for w in weights32)
    gen = torch.Generator(device="cuda").manual_seed(T)
    x_TD = torch.randn(T, D, generator=gen, device="cuda").to(dtype)
    routes = routings(T, E, K, dtype, gen)
    cfg = fused_moe.pick_config(T * K, E, dtype)
    errors: dict[str, str] = {}

    def fused(**kw) -> Fn:
        return lambda i: fused_moe.fused_expert_ffn(x_TD, *routes[i], w_gu, w_d, **kw)

    def unfused(kernel: str) -> Fn:
        return lambda i: expert_ffn(x_TD, *routes[i], w_gu, w_d, kernel)

    def align(fn) -> Fn:
        return lambda i: fn(routes[i][0], E, cfg["BLOCK_M"])[0]

    paths = {"fused": fused(), "grouped": unfused("grouped"), "loop": unfused("loop")}
    ids0, w0 = routes[0]
    y_ref = expert_ffn(x_TD.float(), ids0, w0.float(), w_gu.float(), w_d.float(), kernel="loop")
    err = errors_vs_loop(paths, y_ref, errors)
    has_grouped = "grouped" not in errors
    eager = {
        "fused": attempt(lambda: time_eager(paths["fused"], args.iters), errors, "fused_eager"),
        "grouped": attempt(lambda: time_eager(paths["grouped"], args.iters), errors, "grouped_eager")
        if has_grouped else None,
        "loop": time_eager(paths["loop"], max(5, args.iters // 5)),
    }
    graphs = {
        "fused": paths["fused"], "fused_align_torch": fused(align="torch"),
        "grouped": paths["grouped"] if has_grouped else None,
        "align_kernel_only": align(fused_moe.align_block_size_kernel),
        "align_torch_only": align(fused_moe.align_block_size),
    }
    graph = {k: attempt(lambda fn=fn: time_graph(fn, args.replays), errors, f"{k}_graph") if fn else None
             for k, fn in graphs.items()}
    touched = sum(r[0].unique().numel() for r in routes) / ROUTINGS  # experts per call, averaged
    touched_bytes = touched * 3 * F * D * w_gu.element_size()
    print(json.dumps({
        "model": model, "dtype": dtype_name, "T": T, **shape, "ok": is_ok(err, dtype), "experts_touched": touched,
        "touched_mb": round(touched_bytes / 1e6, 1), "config": cfg, "err": err, "eager_ms": eager, "graph_ms": graph,
        "fused_gbps": round(touched_bytes / graph["fused"] / 1e6, 1) if graph["fused"] else None,
        "errors": errors, "device": torch.cuda.get_device_name(),
    }), flush=True)
    if args.sweep:
        sweep(model, dtype_name, T, fused, paths["loop"](0), args)


def sweep(model: str, dtype_name: str, T: int, fused: Callable[..., Fn], y_loop: torch.Tensor, args) -> None:
    for bm, bn, bk, warps, stages in SWEEP:
        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
        errs: dict[str, str] = {}
        y = attempt(lambda: fused(config=cfg)(0), errs, "run")
        ms = attempt(lambda: time_graph(fused(config=cfg), args.replays), errs, "graph") if y is not None else None
        print(json.dumps({"sweep": model, "dtype": dtype_name, "T": T, "config": cfg, "graph_ms": ms,
                          "err_vs_loop": max_err(y, y_loop), "errors": errs}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--tokens", default="1,16,64,256,1024")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--iters", type=int, default=50, help="eager calls timed")
    ap.add_argument("--replays", type=int, default=20, help="graph replays timed (each ROUTINGS calls)")
    ap.add_argument("--sweep", action="store_true", help="also time the SWEEP block configs")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs CUDA"
    assert fused_moe.available(), "needs triton"
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 loop/reference in true fp32
    for model in args.models.split(","):
        shape = MODELS[model]
        E, D, F = shape["E"], shape["D"], shape["F"]
        gen = torch.Generator(device="cuda").manual_seed(0)
        weights32 = (torch.randn(E, 2 * F, D, generator=gen, device="cuda") / D**0.5,
                     torch.randn(E, D, F, generator=gen, device="cuda") / F**0.5)
        for dtype_name in args.dtypes.split(","):
            for T in map(int, args.tokens.split(",")):
                run_case(model, shape, dtype_name, T, weights32, args)
        del weights32
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
