"""Token-state checkpoints of one stage: per microbatch and step, what replaying that step on the
next stage needs (this stage's output activations, device tier) and this stage's MoE routing (top-k
expert ids and weights per token and layer, host tier), in a bounded ring per microbatch.

Policies: ``all`` keeps every step's activations; ``interval`` every N-th step of a microbatch;
``adaptive`` keeps every step whose routing is diverse (normalised entropy of expert use high) or
skewed (a few experts take much of the load), and every N-th step otherwise. A step without kept
activations is replayed by recomputing the stages before it instead. Routing is always recorded:
it is small, goes to the coordinator with the step (its history), and a replay routes exactly as
recorded.

Queries as the MoE token-state FT literature has them: ``has(step, mb)``, ``count(mb)``,
``in_recovery``.
"""
from __future__ import annotations

import collections
import math
import time
from dataclasses import dataclass

import torch

from dejavu_py.protocol.routing import EMPTY, Routing, RoutingRecord

ENTROPY_HIGH = 0.95
"""Normalised routing entropy above which the adaptive policy keeps a step."""
IMBALANCE_HIGH = 2.5
"""Max-over-mean expert load above which the adaptive policy keeps a step."""


def routing_mismatches(plan, recomputed: Routing) -> int:
    """Tokens of live sequences (not ``plan.scratch_seqs``) whose recomputed experts differ from the
    recorded ones, summed over the MoE layers."""
    dead = set(plan.scratch_seqs)
    live = torch.tensor([sid not in dead for sid, n in zip(plan.seq_ids, plan.num_tokens) for _ in range(n)])
    recorded = {layer: torch.as_tensor(ids) for layer, ids, _ in plan.forced or []}
    bad = 0
    for layer, ids, _ in recomputed:
        if layer in recorded:
            diff = (recorded[layer].to(torch.int64) != torch.as_tensor(ids).to(torch.int64)).any(dim=1)
            bad += int((diff & live).sum())
    return bad


def routing_stats(routing: Routing, num_experts: int) -> tuple[float, float]:
    """(mean normalised entropy of expert use, mean max/mean expert load) over the step's MoE layers."""
    if not routing or num_experts < 2:
        return 0.0, 1.0
    ent, imb = [], []
    for _, ids_TK, _ in routing:
        counts = torch.bincount(torch.as_tensor(ids_TK).reshape(-1).long(), minlength=num_experts).double()
        p = counts / counts.sum()
        nz = p[p > 0]
        ent.append(float(-(nz * nz.log()).sum()) / math.log(num_experts))
        imb.append(float(counts.max() / counts.mean()))
    return sum(ent) / len(ent), sum(imb) / len(imb)


@dataclass
class Checkpoint:
    mb: int
    step: int
    seq_ids: list[int]
    out: torch.Tensor | None
    """This stage's output activations for the step (device tier), if the policy kept them."""
    routing: RoutingRecord = EMPTY
    """Host tier."""


class TokenStateRing:
    def __init__(self, policy: str, interval: int, max_per_mb: int, num_experts: int) -> None:
        self.policy, self.interval, self.max_per_mb, self.num_experts = policy, interval, max_per_mb, num_experts
        self.rings: dict[int, collections.deque[Checkpoint]] = {}
        self.steps_seen: dict[int, int] = {}
        self.in_recovery = False
        self.count_all = 0
        self.kept_activations = 0
        self.bytes_device = 0
        self.bytes_host = 0
        self.seconds = 0.0

    def keep_activation(self, mb: int, routing: Routing) -> bool:
        n = self.steps_seen.get(mb, 0)
        self.steps_seen[mb] = n + 1
        if self.policy == "all":
            return True
        if n % self.interval == 0:
            return True
        if self.policy == "adaptive":
            entropy, imbalance = routing_stats(routing, self.num_experts)
            return entropy > ENTROPY_HIGH or imbalance > IMBALANCE_HIGH
        return False

    def record(self, mb: int, step: int, seq_ids: list[int], out: torch.Tensor | None, routing: RoutingRecord) -> bool:
        """Add the step's checkpoint; returns whether its activations were kept."""
        t0 = time.perf_counter()
        keep = out is not None and self.keep_activation(mb, routing)
        act = out.detach().clone() if keep else None
        ring = self.rings.setdefault(mb, collections.deque(maxlen=self.max_per_mb))
        ring.append(Checkpoint(mb, step, list(seq_ids), act, routing))
        self.count_all += 1
        self.kept_activations += keep
        if act is not None:
            self.bytes_device += act.numel() * act.element_size()
        self.bytes_host += routing.nbytes
        self.seconds += time.perf_counter() - t0
        return keep

    def get(self, mb: int, step: int) -> Checkpoint | None:
        for cp in self.rings.get(mb, ()):
            if cp.step == step:
                return cp
        return None

    def has(self, step: int, mb: int) -> bool:
        cp = self.get(mb, step)
        return cp is not None and cp.out is not None

    def count(self, mb: int) -> int:
        return len(self.rings.get(mb, ()))

    def stats(self) -> dict:
        return {"checkpoints": self.count_all, "activations_kept": self.kept_activations,
                "checkpoint_device_bytes": self.bytes_device, "checkpoint_host_bytes": self.bytes_host,
                "checkpoint_s": round(self.seconds, 4), "policy": self.policy}
