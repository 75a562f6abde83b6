"""Stage split: which contiguous decoder layers each pipeline stage owns.

A stage is, torchtitan style, a list of module names (``model.embed_tokens``, ``model.layers.3``,
``model.norm``, ``lm_head``); the model builds only those and its forward skips the rest.
"""
from __future__ import annotations

from dataclasses import dataclass

from dejavu_py.errors import UserError


@dataclass(frozen=True)
class StageSpec:
    """One pipeline stage's share of the model."""

    index: int
    """Stage number, 0 = the stage that embeds tokens."""
    num_stages: int
    """How many stages the pipeline has."""
    first_layer: int
    """Global index of the first decoder layer this stage owns."""
    num_layers: int
    """How many consecutive decoder layers it owns (at least one)."""

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.num_stages:
            raise ValueError(f"stage index {self.index} outside 0..{self.num_stages - 1}")
        if self.num_layers < 1 or self.first_layer < 0:
            raise ValueError(f"stage {self.index} must own at least one layer, got {self.num_layers}")

    @property
    def has_embed(self) -> bool:
        """The first stage turns token ids into hidden states."""
        return self.index == 0

    @property
    def has_head(self) -> bool:
        """The last stage applies the final norm and the LM head."""
        return self.index == self.num_stages - 1

    @property
    def layers(self) -> range:
        return range(self.first_layer, self.first_layer + self.num_layers)

    def module_names(self) -> list[str]:
        names = ["model.embed_tokens"] if self.has_embed else []
        names += [f"model.layers.{i}" for i in self.layers]
        if self.has_head:
            names += ["model.norm", "lm_head"]
        return names


def balanced_counts(num_layers: int, num_stages: int) -> list[int]:
    """Layers per stage minimising the heaviest stage, embedding and head counted as one layer each."""

    def cost(stage: int, count: int) -> int:
        return count + (stage == 0) + (stage == num_stages - 1)

    # best[s][j]: (max cost, sum of squared costs) of giving the first j layers to stages 0..s-1,
    # each at least one layer; the squares break ties towards the most even split.
    inf = (float("inf"), float("inf"))
    best = [[inf] * (num_layers + 1) for _ in range(num_stages + 1)]
    choice = [[0] * (num_layers + 1) for _ in range(num_stages + 1)]
    best[0][0] = (0, 0)
    for s in range(1, num_stages + 1):
        for j in range(s, num_layers + 1):
            for c in range(1, j - s + 2):
                prev, k = best[s - 1][j - c], cost(s - 1, c)
                v = (max(prev[0], k), prev[1] + k * k)
                if v < best[s][j]:
                    best[s][j], choice[s][j] = v, c
    counts, j = [], num_layers
    for s in range(num_stages, 0, -1):
        counts.append(choice[s][j])
        j -= choice[s][j]
    return counts[::-1]


def parse_layers_per_stage(text: str) -> list[int]:
    """``"3,5,4"`` -> ``[3, 5, 4]``; the error names the flag and value."""
    try:
        counts = [int(p) for p in text.split(",")]
    except ValueError:
        raise UserError(f"--layers-per-stage {text!r}: expected comma-separated integers like 3,5,4") from None
    return counts


def split_stages(
    num_layers: int, num_stages: int, counts: list[int] | None = None, flag: str = "--layers-per-stage"
) -> list[StageSpec]:
    """Contiguous stages over ``num_layers`` decoder layers; ``counts`` (given as ``flag``) overrides
    the balanced split."""
    if num_stages < 1:
        raise UserError(f"--stages {num_stages}: need at least one stage")
    if num_stages > num_layers:
        raise UserError(
            f"{num_stages} stages (--stages, or one per process): the model has only {num_layers} decoder layers; "
            f"use at most {num_layers} stages"
        )
    if counts is None:
        counts = balanced_counts(num_layers, num_stages)
    given = ",".join(map(str, counts))
    if len(counts) != num_stages:
        raise UserError(f"{flag} {given}: {len(counts)} entries for {num_stages} stages")
    if any(c < 1 for c in counts):
        raise UserError(f"{flag} {given}: every stage needs at least one layer")
    if sum(counts) != num_layers:
        raise UserError(f"{flag} {given}: adds up to {sum(counts)}, the model has {num_layers} layers")
    specs, first = [], 0
    for i, c in enumerate(counts):
        specs.append(StageSpec(index=i, num_stages=num_stages, first_layer=first, num_layers=c))
        first += c
    return specs
