"""A request being generated, as the coordinator tracks it."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from .plan import SeqState
from .request import Request


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """Token state of one request: enough to rebuild it anywhere (prompt, outputs, sampling, blocks)."""

    seq_id: int
    request: Request
    output_ids: list[int] = field(default_factory=list)
    num_cached: int = 0
    """Tokens whose K/V every stage holds."""
    block_table: list[int] = field(default_factory=list)
    mb: int | None = None
    status: Status = Status.WAITING
    finish_reason: str | None = None
    t_arrival: float = field(default_factory=time.monotonic)
    t_admitted: float | None = None
    t_first_token: float | None = None
    t_finish: float | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.request.input_ids)

    @property
    def max_len(self) -> int:
        """Prompt plus every token it may generate: what its blocks must hold."""
        return self.prompt_len + self.request.max_new_tokens

    def next_input(self) -> tuple[int, list[int]]:
        """(start position, new tokens) of its next step: the whole prompt first, then the last token."""
        tokens = self.request.input_ids + self.output_ids
        return self.num_cached, tokens[self.num_cached :]

    def state(self) -> SeqState:
        s = self.request.sampling
        return SeqState(list(self.block_table), s.temperature, s.top_p, s.top_k, s.seed)

    def append(self, token: int, stop_ids: frozenset[int]) -> bool:
        """Add a sampled token; True when finished (a model stop id or one of the request's, or length)."""
        now = time.monotonic()
        if self.t_first_token is None:
            self.t_first_token = now
        self.output_ids.append(token)
        if token in stop_ids or token in self.request.stop_token_ids:
            self.finish_reason = "stop"
        elif len(self.output_ids) >= self.request.max_new_tokens:
            self.finish_reason = "length"
        if self.finish_reason is not None:
            self.status, self.t_finish = Status.FINISHED, now
            return True
        return False
