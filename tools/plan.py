#!/usr/bin/env python3
"""Suggest a deployment: prompt stages P, token stages T, layer splits, microbatches, batch size, swapping.

    python tools/plan.py --model-config configs/models/olmoe-1b-7b.json --gpus 4 --gpu-mem 80 \\
        --rate 4 --prompt-len 1155 --output-len 211 [--measured results/bench-olmoe-1b-7b.json] [--json OUT]

Cost model (DejaVu's planner), per decoder layer l; e bytes per element, D hidden size, H / K query / KV
heads of width Dh, E experts of which k are active, F expert and Fs shared-expert width, V vocabulary:
  params   attn = 2*D*H*Dh + 2*D*K*Dh; a MoE layer adds router E*D, experts E*3*D*F, shared 3*D*Fs (a
           dense layer 3*D*intermediate); active = attn + router + k*3*D*F + 3*D*Fs
  touched  experts a step of n tokens reads: E*(1 - (1 - k/E)^n) (uniform routing, as tools/bench.py)
  memory   weights W_l = e*(attn + 2*D + all experts);  KV per token kv_l = 2*K*Dh*e
  decode   b sequences at mean context c = prompt + output/2: bytes = e*(attn + 2D + router +
           touched(b)*3DF + 3DFs) + b*c*kv_l, flops = 2*b*active + 4*b*c*H*Dh
  prefill  N prompt tokens of mean length p: bytes as decode with touched(N) and N*kv_l written,
           flops = 2*N*active + 2*N*p*H*Dh (causal)
  time     t = max(bytes / HBM bandwidth, flops / FLOP/s): decode is memory-bound, prefill grows with
           prompt tokens; the first stage adds the embedding gather, the last the LM head (V*D*e bytes)
Calibration (--measured, the JSON of tools/bench.py): a dejavu row times a whole model on one GPU (TPOT =
one decode step of every layer at its batch, TTFT = one prefill of batch*prompt_len tokens); the ratio
measured/analytic (the smallest over rows of the same batch) scales every per-layer time, interpolated
in log(batch or tokens) and clamped outside the measured range.
Pipelines: a stage's time is the sum of its layers' times; with M microbatches over S stages a round
takes max(sum_s t_s, M*max_s t_s), so the slowest stage bounds throughput:
  token pipeline   decode tok/s = M*b / round(b) and TPOT = round(b)
  prompt pipeline  prefill tok/s = M*N / round(N), N = --max-batch-tokens per step
Splits are the contiguous layer counts minimising the slowest stage (a dynamic programme), each stage's
weights plus one sequence's KV within memory. usable = mem*util - reserve per GPU; a stage holds
(usable - weights) / sum kv_l KV tokens and --kv-capacity-tokens is one number for all stages (the
smallest counts). A sequence reserves prompt + output tokens from admission, so without swapping
M*b*seq <= capacity. Swapping (R = 2 resident partitions, M > R) gives each microbatch capacity/R, but a
stage copies a whole partition out and in before each step (2*part*kv/PCIe s); it pays only when that
hides behind the step, so b is the largest batch whose copy fits in the stage's decode time.
Choosing P:T: disaggregated (P >= 1) sustains rate_max = min(prefill tok/s / prompt, decode tok/s /
output, link*min(P,T) / (prompt*sum kv_l)) (the KV stream); colocated (P = 0, N stages) shares each
stage: rate_max = 1 / max_s(prompt*t_pre_s/N + output*t_dec_s(b)/b), and prefill stretches TPOT by
1/(1 - rate*prompt*max_s t_pre_s/N). The decode batch at --rate is the smallest meeting rate*output
tok/s. Among candidates sustaining --rate the lowest TPOT wins (within 10%, the larger rate_max); if
none does, the largest rate_max, with a warning. TTFT is one prompt's prefill, without queueing.
Default figures are H100 SXM: HBM 3.35e12 B/s, ~7e14 bf16 FLOP/s achievable, PCIe 5.0 x16 5e10 B/s.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

GIB = 2**30
BLOCK = 16
CHUNKS = (1024, 2048, 4096, 8192, 16384)
SWAP_RESIDENT = 2


class PlanError(Exception):
    """Bad input or no feasible deployment: one line for the user."""


@dataclass(frozen=True)
class Hardware:
    mem_gib: float
    hbm_bw: float = 3.35e12
    flops: float = 7e14
    pcie_bw: float = 5e10
    link_bw: float = 1e11
    host_mem_gib: float = 64.0
    mem_util: float = 0.9
    reserve_gib: float = 2.0

    @property
    def usable(self) -> float:
        return self.mem_gib * GIB * self.mem_util - self.reserve_gib * GIB


@dataclass(frozen=True)
class Workload:
    rate: float
    prompt: float
    output: float

    @property
    def ctx(self) -> float:
        return self.prompt + self.output / 2

    @property
    def seq_tokens(self) -> int:
        return math.ceil((self.prompt + self.output) / BLOCK) * BLOCK


@dataclass(frozen=True)
class Model:
    """Shapes of a config.json (names as in the module docstring); sparse[l]: layer l is MoE."""

    name: str
    L: int
    D: int
    H: int
    K: int
    Dh: int
    V: int
    E: int
    k: int
    F: int
    Fs: int
    I: int
    sparse: tuple[bool, ...]
    e: int = 2

    @classmethod
    def from_config(cls, cfg: dict, name: str, elem: int = 2) -> "Model":
        try:
            D, L, H, V = (int(cfg[x]) for x in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"))
            E = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)
            skip, step = set(cfg.get("mlp_only_layers") or []), int(cfg.get("decoder_sparse_step") or 1)
            m = cls(name, L, D, H, int(cfg.get("num_key_value_heads") or H), int(cfg.get("head_dim") or D // max(H, 1)),
                    V, E, int(cfg.get("num_experts_per_tok") or 0),
                    int(cfg.get("moe_intermediate_size") or cfg.get("intermediate_size") or 0),
                    int(cfg.get("shared_expert_intermediate_size") or 0), int(cfg.get("intermediate_size") or 0),
                    tuple(bool(E) and i not in skip and (i + 1) % max(step, 1) == 0 for i in range(max(L, 0))), elem)
        except KeyError as k:
            raise PlanError(f"{name}: config has no {k.args[0]!r}; give a model's config.json") from None
        except (TypeError, ValueError) as e:
            raise PlanError(f"{name}: a shape field is not an integer ({e})") from None
        if min(D, L, H, V, m.K, m.Dh) <= 0 or (E and not (0 < m.k <= E and m.F > 0)) or (not all(m.sparse) and m.I <= 0):
            raise PlanError(f"{name}: nonsense shapes (sizes must be positive, 0 < num_experts_per_tok <= num_experts)")
        return m

    @property
    def attn(self) -> int:
        return 2 * self.D * self.H * self.Dh + 2 * self.D * self.K * self.Dh

    def mlp(self, l: int, experts: float) -> float:
        """MLP parameters of layer l with ``experts`` routed experts counted."""
        return 3 * self.D * self.I if not self.sparse[l] else self.E * self.D + experts * 3 * self.D * self.F + 3 * self.D * self.Fs

    def read_bytes(self, l: int, n: float) -> float:
        """Weight bytes a step of n tokens reads in layer l."""
        touched = self.E * (1 - (1 - self.k / self.E) ** n) if self.sparse[l] else 0
        return (self.attn + 2 * self.D + self.mlp(l, touched)) * self.e

    def weight_bytes(self, l: int) -> float:
        return (self.attn + 2 * self.D + self.mlp(l, self.E)) * self.e

    @property
    def kv_token(self) -> int:
        """KV bytes per token per layer."""
        return 2 * self.K * self.Dh * self.e

    @property
    def embed_bytes(self) -> int:
        return self.V * self.D * self.e

    def stage_weights(self, layers: range, first: bool, last: bool) -> float:
        w = sum(self.weight_bytes(l) for l in layers)
        return w + (self.embed_bytes if first else 0) + (self.embed_bytes + self.D * self.e if last else 0)

    def summary(self) -> dict:
        return {"name": self.name, "layers": self.L, "experts": self.E, "top_k": self.k,
                "weights_gib": round(self.stage_weights(range(self.L), True, True) / GIB, 2),
                "kv_kib_per_token": self.kv_token * self.L / 1024}


def ranges(counts: list[int]) -> list[range]:
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return [range(s, s + c) for s, c in zip(starts, counts)]


def interpolate(points: list[list[float]], x: float) -> float:
    """Piecewise linear in log(x) through (x, factor) points, clamped at both ends; 1 without points."""
    pts = sorted(points)
    if not pts:
        return 1.0
    if x <= pts[0][0]:
        return pts[0][1]
    for (x0, f0), (x1, f1) in zip(pts, pts[1:]):
        if x <= x1:
            return f0 + (f1 - f0) * math.log(x / x0) / math.log(x1 / x0)
    return pts[-1][1]


class Costs:
    """Layer and stage times in seconds: the roofline of the module docstring, times the calibration."""

    def __init__(self, m: Model, hw: Hardware, cal: dict | None = None) -> None:
        self.m, self.hw, self.cal = m, hw, cal or {"dec": [], "pre": []}

    def _t(self, nbytes: float, flops: float, kind: str, n: float) -> float:
        return max(nbytes / self.hw.hbm_bw, flops / self.hw.flops) * interpolate(self.cal[kind], n)

    def layer(self, l: int, n: float, ctx: float, kind: str) -> float:
        """kind 'dec': n sequences reading ctx tokens of KV each; 'pre': n prompt tokens of length ctx."""
        m = self.m
        kv, attn = (n * ctx * m.kv_token, 4 * n * ctx * m.H * m.Dh) if kind == "dec" else (n * m.kv_token, 2 * n * ctx * m.H * m.Dh)
        return self._t(m.read_bytes(l, n) + kv, 2 * n * (m.attn + m.mlp(l, m.k)) + attn, kind, n)

    def ends(self, n: float, ctx: float, kind: str, first: bool, last: bool) -> float:
        rows = n if kind == "dec" else n / ctx  # the head runs on one position per sequence
        t = self._t(n * self.m.D * self.m.e, 0, kind, n) if first else 0.0  # the embedding gather
        head = self._t(self.m.embed_bytes + self.m.D * self.m.e, 2 * rows * self.m.V * self.m.D, kind, n)
        return t + (head if last else 0.0)

    def stages(self, counts: list[int], n: float, ctx: float, kind: str) -> list[float]:
        rs = ranges(counts)
        return [sum(self.layer(l, n, ctx, kind) for l in r) + self.ends(n, ctx, kind, i == 0, i == len(rs) - 1)
                for i, r in enumerate(rs)]


def load_calibration(path: Path, m: Model, hw: Hardware) -> dict:
    """{"dec": [[batch, factor]], "pre": [[tokens, factor]]} from a tools/bench.py JSON's dejavu rows."""
    try:
        doc = json.loads(Path(path).read_text())
        p, o = float(doc["prompt_len"]), float(doc["new_tokens"])
        rows = [r for r in doc["rows"] if r.get("engine") == "dejavu"]
        vals = [(float(r["batch"]), float(r["tpot_s"]), float(r["ttft_s"])) for r in rows]
    except FileNotFoundError:
        raise PlanError(f"--measured {path}: no such file") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise PlanError(f"--measured {path}: not a tools/bench.py result ({type(e).__name__}: {e})") from None
    if not vals or not all(math.isfinite(x) and x > 0 for v in vals for x in v) or not (p > 0 and o > 0):
        raise PlanError(f"--measured {path}: needs dejavu rows with positive batch, tpot_s, ttft_s")
    if doc.get("model") not in (None, m.name):
        print(f"warning: --measured {path} profiled {doc['model']!r}, planning {m.name!r}", file=sys.stderr)
    plain, whole = Costs(m, hw), [m.L]
    dec: dict[float, float] = {}
    pre: dict[float, float] = {}
    for b, tpot, ttft in vals:  # the smallest ratio per batch: repeated runs add overhead, never remove it
        dec[b] = min(dec.get(b, math.inf), tpot / plain.stages(whole, b, p + o / 2, "dec")[0])
        pre[b * p] = min(pre.get(b * p, math.inf), ttft / plain.stages(whole, b * p, p, "pre")[0])
    return {"source": str(path), "dec": sorted(map(list, dec.items())), "pre": sorted(map(list, pre.items()))}


def split_layers(cost: list[float], stages: int, ends: tuple[float, float], mem: list[float],
                 mem_ends: tuple[float, float], cap: float) -> list[int] | None:
    """Contiguous layer counts minimising the costliest stage (then the sum of squares), every stage's
    memory (layers plus the first/last stage's ``mem_ends``) within ``cap``; None if none fits."""
    L, inf = len(cost), (math.inf, math.inf)
    pc, pm = [0.0], [0.0]
    for c, w in zip(cost, mem):
        pc.append(pc[-1] + c)
        pm.append(pm[-1] + w)
    best = [[inf] * (L + 1) for _ in range(stages + 1)]
    choice = [[0] * (L + 1) for _ in range(stages + 1)]
    best[0][0] = (0.0, 0.0)
    for s in range(1, stages + 1):
        extra = (ends[0] if s == 1 else 0, ends[1] if s == stages else 0)
        extra_mem = (mem_ends[0] if s == 1 else 0) + (mem_ends[1] if s == stages else 0)
        for j in range(s, L - (stages - s) + 1):
            for i in range(s - 1, j):
                if best[s - 1][i] == inf or pm[j] - pm[i] + extra_mem > cap:
                    continue
                c = pc[j] - pc[i] + sum(extra)
                v = (max(best[s - 1][i][0], c), best[s - 1][i][1] + c * c)
                if v < best[s][j]:
                    best[s][j], choice[s][j] = v, i
    if best[stages][L] == inf:
        return None
    counts, j = [], L
    for s in range(stages, 0, -1):
        counts.append(j - choice[s][j])
        j = choice[s][j]
    return counts[::-1]


def round_time(stage_times: list[float], mbs: int) -> float:
    return max(sum(stage_times), mbs * max(stage_times))


@dataclass
class Candidate:
    mode: str
    prompt_stages: int
    token_stages: int
    prompt_split: list[int] | None
    token_split: list[int]
    microbatches: int
    max_batch_size: int
    max_batch_tokens: int
    kv_capacity_tokens: int
    swap: bool
    prefill_tok_s: float
    decode_tok_s: float
    max_rate: float
    tpot_s: float
    ttft_s: float
    sustains_rate: bool
    notes: list[str] = field(default_factory=list)


class Planner:
    def __init__(self, m: Model, hw: Hardware, wl: Workload, costs: Costs, max_batch: int = 256) -> None:
        self.m, self.hw, self.wl, self.c, self.max_batch = m, hw, wl, costs, max_batch

    def ends(self, n: float, ctx: float, kind: str) -> tuple[float, float]:
        return self.c.ends(n, ctx, kind, True, False), self.c.ends(n, ctx, kind, False, True)

    def split(self, stages: int, per_layer, ends: tuple[float, float]) -> list[int] | None:
        m = self.m
        mem = [m.weight_bytes(l) + self.wl.seq_tokens * m.kv_token for l in range(m.L)]
        return split_layers([per_layer(l) for l in range(m.L)], stages, ends, mem,
                            (m.embed_bytes, m.embed_bytes + m.D * m.e), self.hw.usable)

    def capacity(self, counts: list[int]) -> int:
        """KV tokens every stage of this pipeline holds (its smallest stage's), in whole blocks."""
        rs = ranges(counts)
        caps = [(self.hw.usable - self.m.stage_weights(r, i == 0, i == len(rs) - 1)) // (len(r) * self.m.kv_token)
                for i, r in enumerate(rs)]
        return int(min(caps)) // BLOCK * BLOCK

    def dec_rate(self, counts: list[int], mbs: int, b: float) -> float:
        return mbs * b / round_time(self.c.stages(counts, b, self.wl.ctx, "dec"), mbs) if b >= 1 else 0.0

    def batch(self, counts: list[int], mbs: int, cap: int) -> tuple[int, bool, int, str]:
        """Decode pipeline: (max batch per microbatch, swap, --kv-capacity-tokens, note)."""
        seq = self.wl.seq_tokens
        b_plain = min(self.max_batch, cap // (mbs * seq))
        if len(counts) <= 2 or b_plain >= self.max_batch:
            return b_plain, False, cap, ""
        kv_stage = max(counts) * self.m.kv_token
        for b in range(min(self.max_batch, cap // (SWAP_RESIDENT * seq)), b_plain, -1):
            copy_s = 2 * b * seq * kv_stage / self.hw.pcie_bw
            if copy_s <= max(self.c.stages(counts, b, self.wl.ctx, "dec")):
                if self.dec_rate(counts, mbs, b) > 1.05 * self.dec_rate(counts, mbs, b_plain) and \
                        mbs * b * seq * kv_stage <= self.hw.host_mem_gib * GIB:
                    return b, True, SWAP_RESIDENT * b * seq, f"swapping hides {copy_s * 1e3:.2f} ms of copies per step"
                break
        return b_plain, False, cap, "no swap: KV copies would not hide behind a decode step"

    def at_rate(self, f, b_max: int) -> int:
        """Smallest batch whose decode tok/s f(b) meets rate * output (b_max if none)."""
        lo, hi, need = 1, b_max, self.wl.rate * self.wl.output
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if f(mid) >= need else (mid + 1, hi)
        return lo

    def chunk(self, counts: list[int], mbs: int, b: int, cap: int) -> tuple[int, float]:
        """(--max-batch-tokens, prefill tok/s): the smallest chunk within 5% of the best throughput."""
        out = []
        for n in CHUNKS:
            eff = self.wl.prompt if self.wl.prompt >= n else min(n, b * self.wl.prompt)  # a long prompt runs alone
            if out and mbs * eff > cap:
                break
            out.append((n, mbs * eff / round_time(self.c.stages(counts, eff, self.wl.prompt, "pre"), mbs)))
        top = max(t for _, t in out)
        return next((n, t) for n, t in out if t >= 0.95 * top)

    def disaggregated(self, P: int, T: int, mbs: int) -> Candidate | None:
        m, wl, c = self.m, self.wl, self.c
        tok = self.split(T, lambda l: c.layer(l, 32, wl.ctx, "dec"), self.ends(32, wl.ctx, "dec"))
        pro = self.split(P, lambda l: c.layer(l, 2048, wl.prompt, "pre"), self.ends(2048, wl.prompt, "pre"))
        if tok is None or pro is None or (cap := min(self.capacity(tok), self.capacity(pro))) < wl.seq_tokens:
            return None
        b, swap, kv_flag, note = self.batch(tok, mbs, cap)
        if b < 1:
            return None
        n, pre_tok_s = self.chunk(pro, mbs, b, kv_flag)
        kv_req = wl.prompt * m.L * m.kv_token
        dec_tok_s = self.dec_rate(tok, mbs, b)
        max_rate = min(pre_tok_s / wl.prompt, dec_tok_s / wl.output, self.hw.link_bw * min(P, T) / kv_req)
        b_op = self.at_rate(lambda x: self.dec_rate(tok, mbs, x), b)
        notes = [note] if note else []
        if self.capacity(pro) < self.capacity(tok):
            notes.append("KV capacity set by the prompt stages (the flag is shared)")
        return Candidate("disaggregated", P, T, pro, tok, mbs, b, n, kv_flag, swap, pre_tok_s, dec_tok_s, max_rate,
                         round_time(c.stages(tok, b_op, wl.ctx, "dec"), mbs), sum(c.stages(pro, wl.prompt, wl.prompt, "pre")),
                         wl.rate <= max_rate, notes)

    def colocated(self, N: int) -> Candidate | None:
        wl, c = self.wl, self.c
        per_req = lambda l: wl.prompt * c.layer(l, 2048, wl.prompt, "pre") / 2048 + wl.output * c.layer(l, 32, wl.ctx, "dec") / 32  # noqa: E731
        ends = zip(self.ends(2048, wl.prompt, "pre"), self.ends(32, wl.ctx, "dec"))
        counts = self.split(N, per_req, tuple(wl.prompt * p / 2048 + wl.output * d / 32 for p, d in ends))
        if counts is None or (cap := self.capacity(counts)) < wl.seq_tokens:
            return None
        b, swap, kv_flag, note = self.batch(counts, N, cap)
        if b < 1:
            return None
        n, _ = self.chunk(counts, N, b, kv_flag)
        pre = [t / n for t in c.stages(counts, n, wl.prompt, "pre")]  # stage seconds per prompt token
        dec = c.stages(counts, b, wl.ctx, "dec")
        max_rate = 1 / max(wl.prompt * p + wl.output * d / b for p, d in zip(pre, dec))
        busy = wl.rate * wl.prompt * max(pre)  # share of the slowest stage's time spent on prefill
        b_op = self.at_rate(lambda x: self.dec_rate(counts, N, x) * max(1 - busy, 0), b)
        tpot = round_time(c.stages(counts, b_op, wl.ctx, "dec"), N) / (1 - busy) if busy < 1 else math.inf
        return Candidate("colocated", 0, N, None, counts, N, b, n, kv_flag, swap, 1 / max(pre), self.dec_rate(counts, N, b),
                         max_rate, tpot, sum(c.stages(counts, wl.prompt, wl.prompt, "pre")), wl.rate <= max_rate,
                         [note] if note else [])

    def candidates(self, gpus: int, mode: str) -> list[Candidate]:
        out = [self.colocated(gpus)] if mode != "disaggregated" and gpus <= self.m.L else []
        if mode != "colocated":
            for P in (P for P in range(1, gpus) if P <= self.m.L and gpus - P <= self.m.L):
                out += [self.disaggregated(P, gpus - P, mbs) for mbs in sorted({gpus - P, max(gpus - P, P)})]
        return [c for c in out if c is not None]


def choose(cands: list[Candidate]) -> Candidate:
    ok = [c for c in cands if c.sustains_rate]
    if not ok:
        return max(cands, key=lambda c: c.max_rate)
    best = min(c.tpot_s for c in ok)
    return max((c for c in ok if c.tpot_s <= 1.1 * best), key=lambda c: c.max_rate)


def flags(c: Candidate, gpus: int, dtype: str) -> list[str]:
    """The python -m dejavu_py flags of a candidate."""
    f = ["--nproc-per-node", str(gpus)]
    if c.prompt_stages:
        f += ["--prompt-stages", str(c.prompt_stages), "--prompt-layers-per-stage", ",".join(map(str, c.prompt_split or []))]
    f += ["--layers-per-stage", ",".join(map(str, c.token_split)), "--microbatches", str(c.microbatches),
          "--max-batch-size", str(c.max_batch_size), "--max-batch-tokens", str(c.max_batch_tokens),
          "--kv-capacity-tokens", str(c.kv_capacity_tokens), "--block-size", str(BLOCK)]
    return f + (["--swap", "--swap-resident", str(SWAP_RESIDENT)] if c.swap else []) + ["--device", "cuda", "--dtype", dtype]


def table(rows: list[dict], pick: int) -> str:
    head = ("", "P", "T", "prompt split", "token split", "mb", "batch", "swap", "KV tokens", "prefill tok/s",
            "decode tok/s", "max req/s", "TPOT ms", "TTFT ms", "ok")
    lines = [head] + [("*" if i == pick else "", str(c["prompt_stages"]), str(c["token_stages"]),
                       ",".join(map(str, c["prompt_split"] or [])) or "-", ",".join(map(str, c["token_split"])),
                       str(c["microbatches"]), str(c["max_batch_size"]), "yes" if c["swap"] else "no",
                       f"{c['kv_capacity_tokens']:,}", f"{c['prefill_tok_s']:,.0f}", f"{c['decode_tok_s']:,.0f}",
                       f"{c['max_rate']:.2f}", "-" if c["tpot_s"] is None else f"{c['tpot_s'] * 1e3:.2f}", f"{c['ttft_s'] * 1e3:.1f}",
                       "yes" if c["sustains_rate"] else "no") for i, c in enumerate(rows)]
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in lines)


def plan(a: argparse.Namespace) -> dict:
    """The whole plan as a JSON-able dict (raises PlanError on bad input)."""
    for name in ("gpu_mem", "rate", "prompt_len", "output_len", "hbm_bw", "flops", "pcie_bw", "link_bw", "host_mem"):
        v = getattr(a, name)
        if not (math.isfinite(v) and v > 0):
            raise PlanError(f"--{name.replace('_', '-')} {v:g}: must be a positive number")
    if a.gpus < 1 or a.max_batch < 1 or not 0 < a.mem_util <= 1 or not 0 <= a.reserve < a.gpu_mem:
        raise PlanError("--gpus and --max-batch must be >= 1, --mem-util in (0, 1], --reserve in [0, --gpu-mem)")
    try:
        cfg = json.loads(a.model_config.read_text())
    except FileNotFoundError:
        raise PlanError(f"--model-config {a.model_config}: no such file") from None
    except (OSError, ValueError) as e:
        raise PlanError(f"--model-config {a.model_config}: not a JSON config ({e})") from None
    if not isinstance(cfg, dict):
        raise PlanError(f"--model-config {a.model_config}: expected a JSON object")
    m = Model.from_config(cfg, a.model_config.stem, 4 if a.dtype == "float32" else 2)
    hw = Hardware(a.gpu_mem, a.hbm_bw, a.flops, a.pcie_bw, a.link_bw, a.host_mem, a.mem_util, a.reserve)
    wl = Workload(a.rate, a.prompt_len, a.output_len)
    cal = load_calibration(a.measured, m, hw) if a.measured else None
    cands = Planner(m, hw, wl, Costs(m, hw, cal), a.max_batch).candidates(a.gpus, a.mode)
    if not cands:
        if a.gpus > (limit := m.L if a.mode == "colocated" else 2 * m.L):
            raise PlanError(f"--gpus {a.gpus}: {m.name} has {m.L} layers and a pipeline at most one stage per layer "
                            f"(at most {limit} GPUs for --mode {a.mode})")
        raise PlanError(f"{m.name} ({m.summary()['weights_gib']} GiB of weights): no split over {a.gpus} GPU(s) of "
                        f"{a.gpu_mem:g} GiB gives every stage its weights plus one {wl.seq_tokens}-token sequence's KV; "
                        "add GPUs or memory")
    pick = choose(cands)
    f = flags(pick, a.gpus, a.dtype)
    return {"model": m.summary(), "hardware": asdict(hw), "workload": asdict(wl), "gpus": a.gpus, "calibration": cal,
            "candidates": [_json(c) for c in cands],
            "suggestion": {**_json(pick), "index": cands.index(pick), "flags": f,
                           "command": " ".join(["python -m dejavu_py", *f, "--model CKPT --prompts REQUESTS.jsonl"])}}


def _json(c: Candidate) -> dict:
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in asdict(c).items()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-config", type=Path, required=True, help="a model's config.json (configs/models/*.json)")
    p.add_argument("--gpus", type=int, required=True, help="GPUs = processes = stages (P + T)")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="memory per GPU in GiB (default 80)")
    p.add_argument("--rate", type=float, required=True, help="request arrival rate, requests/s")
    p.add_argument("--prompt-len", type=float, default=1155, help="mean prompt tokens (default 1155: Azure LLM conversation trace 2023)")
    p.add_argument("--output-len", type=float, default=211, help="mean output tokens (default 211: same trace)")
    p.add_argument("--mode", choices=["auto", "colocated", "disaggregated"], default="auto", help="deployments to consider (default auto: both)")
    p.add_argument("--measured", type=Path, help="tools/bench.py JSON: calibrate per-layer prefill and decode times from it")
    p.add_argument("--hbm-bw", type=float, default=3.35e12, help="HBM bytes/s per GPU (default 3.35e12, H100 SXM)")
    p.add_argument("--flops", type=float, default=7e14, help="achievable bf16 FLOP/s per GPU (default 7e14, H100)")
    p.add_argument("--pcie-bw", type=float, default=5e10, help="host<->GPU bytes/s for KV swapping (default 5e10, PCIe 5.0 x16)")
    p.add_argument("--link-bw", type=float, default=1e11, help="GPU<->GPU bytes/s for KV streaming (default 1e11)")
    p.add_argument("--host-mem", type=float, default=64.0, help="pinned host GiB per GPU for swapped KV (default 64)")
    p.add_argument("--mem-util", type=float, default=0.9, help="fraction of GPU memory to use (default 0.9)")
    p.add_argument("--reserve", type=float, default=2.0, help="GiB per GPU kept for activations and workspace (default 2)")
    p.add_argument("--max-batch", type=int, default=256, help="upper bound of the suggested --max-batch-size (default 256)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16", help="weights and KV dtype (default bfloat16)")
    p.add_argument("--json", type=Path, help="also write the plan (every candidate, the suggestion, its flags) as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        doc = plan(a)
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s, m, w = doc["suggestion"], doc["model"], doc["workload"]
    print(f"model {m['name']}: {m['layers']} layers, {m['experts']} experts (top-{m['top_k']}), "
          f"{m['weights_gib']} GiB weights, {m['kv_kib_per_token']:.0f} KiB KV/token")
    print(f"workload {w['rate']:g} req/s x ({w['prompt']:g} prompt + {w['output']:g} output tokens) needs "
          f"{w['rate'] * w['prompt']:,.0f} prefill + {w['rate'] * w['output']:,.0f} decode tok/s; times "
          f"{'calibrated from ' + str(a.measured) if a.measured else 'analytic'}\n")
    print(table(doc["candidates"], s["index"]))
    print(f"\nsuggested: {s['mode']}, P={s['prompt_stages']} T={s['token_stages']}" +
          ("" if s["sustains_rate"] else f"; WARNING: sustains only {s['max_rate']:.2f} req/s") +
          "".join(f"; {n}" for n in s["notes"]))
    print(s["command"])
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
