"""How the next token of a sequence is chosen: the parameters every request carries to the stage that samples."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

SEED_LIMIT = 2**63
"""Seeds are integers in ``[0, SEED_LIMIT)``."""


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_CHECKS = {
    "temperature": (lambda v: is_number(v) and math.isfinite(v) and v >= 0, "a number >= 0 (0 = greedy)"),
    "top_p": (lambda v: is_number(v) and math.isfinite(v) and 0 < v <= 1, "a number in (0, 1]"),
    "top_k": (lambda v: is_int(v) and v >= 0, "an integer >= 0 (0 = off)"),
    "seed": (lambda v: is_int(v) and 0 <= v < SEED_LIMIT, "an integer in [0, 2**63)"),
}


def expected_if_invalid(name: str, value: Any) -> str | None:
    """What a sampling field ``name`` must be, when ``value`` is not that (None: it is valid). The one
    place the checks are written: SamplingParams and every front-end (request files, HTTP) use it."""
    ok, expected = _CHECKS[name]
    return None if ok(value) else expected


@dataclass(frozen=True)
class SamplingParams:
    """How the next token of a sequence is chosen. Defaults: greedy."""

    temperature: float = 0.0
    """Softmax temperature, >= 0; 0 means greedy (argmax of the logits, lowest id on ties)."""
    top_p: float = 1.0
    """Nucleus sampling, in (0, 1]: keep the fewest most likely tokens whose probability sum is >= top_p."""
    top_k: int = 0
    """Keep only the top_k most likely tokens; 0 keeps all. Applied before top_p."""
    seed: int = 0
    """Seed of the request's counter-based random stream, in [0, 2**63)."""

    def __post_init__(self) -> None:
        for name in _CHECKS:
            value = getattr(self, name)
            expected = expected_if_invalid(name, value)
            if expected is not None:
                raise ValueError(f"{name} must be {expected}, got {value!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
