"""A request being generated, as the coordinator tracks it."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from dejavu_py.coordinator.request import Request
from dejavu_py.protocol.plan import SeqState


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
    """KV blocks of the pipeline that decodes it (reserved for prompt + max new tokens)."""
    prompt_table: list[int] = field(default_factory=list)
    """Disaggregated: the prompt stages' blocks while it is prefilled there."""
    mb: int | None = None
    status: Status = Status.WAITING
    finish_reason: str | None = None
    t_arrival: float = field(default_factory=time.monotonic)
    t_admitted: float | None = None
    t_first_token: float | None = None
    t_finish: float | None = None
    t_prefilled: float | None = None
    """Disaggregated: when the prompt pipeline returned its first token."""
    t_kv_ready: float | None = None
    """Disaggregated: when every token stage held its KV."""
    kv_bytes: int = 0
    """Disaggregated: prompt KV bytes streamed to the token stages."""
    told: int = 0
    """Output tokens already told to the output sink. A restart keeps it: the tokens generated again
    are the same ones, and are not told twice."""
    stop_ids: frozenset[int] | None = None
    """Tokens that end it: the model's end-of-sequence ids unless its request ignores them, and the
    request's own; made at its first token, so that each token costs one set lookup."""
    cancelled: bool = False
    """Its client cancelled it: it is answered already, and whatever still arrives for it is dropped."""

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

    def state(self, table: list[int] | None = None, kv_table: list[int] | None = None) -> SeqState:
        """What stages keep about it: a block table (its decode table unless given) and sampling."""
        s = self.request.sampling
        blocks = list(self.block_table if table is None else table)
        return SeqState(blocks, s.temperature, s.top_p, s.top_k, s.seed, kv_table)

    def untold(self) -> list[int]:
        """Output tokens the output sink has not been told of yet, counted as told from now on."""
        if len(self.output_ids) <= self.told:
            return []
        new = self.output_ids[self.told :]
        self.told = len(self.output_ids)
        return new

    def restart(self) -> None:
        """Forget generated tokens and cached KV: it will be prefilled again (same tokens result:
        greedy, or sampled from its own seed and positions)."""
        self.output_ids.clear()
        self.num_cached = 0
        self.t_first_token = None
        self.finish_reason = None
        self.status = Status.WAITING

    def cancel(self) -> None:
        """Ended by its client: finished now, whatever is still in flight for it."""
        self.cancelled = True
        self.status, self.t_finish = Status.FINISHED, time.monotonic()

    def append(self, token: int, eos_ids: frozenset[int]) -> bool:
        """Add a sampled token; True when finished (an end-of-sequence id of ``eos_ids``, the model's,
        unless the request ignores them; one of the request's stop ids; or length)."""
        now = time.monotonic()
        if self.t_first_token is None:
            self.t_first_token = now
        stops = self.stop_ids
        if stops is None:
            own = frozenset(self.request.stop_token_ids)
            stops = self.stop_ids = own if self.request.ignore_eos else own | eos_ids
        self.output_ids.append(token)
        if token in stops:
            self.finish_reason = "stop"
        elif len(self.output_ids) >= self.request.max_new_tokens:
            self.finish_reason = "length"
        if self.finish_reason is not None:
            self.status, self.t_finish = Status.FINISHED, now
            return True
        return False
