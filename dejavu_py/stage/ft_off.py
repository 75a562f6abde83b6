"""A stage without fault tolerance (``--ft off``, or a prompt stage): an object with ``StageFT``'s
interface whose methods do nothing, so that the worker calls the same methods either way and
``StageFT`` needs no "am I on" test in each of them.

It records no routing, keeps no checkpoint, streams no replica and answers no recovery message (it
registers none: recovery never asks a stage without FT). Its figures are those of a stage that kept
nothing, so the run's summary has the same keys either way.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dejavu_py.stage.checkpoints import TokenStateRing

if TYPE_CHECKING:
    from dejavu_py.config import RunConfig
    from dejavu_py.protocol.plan import KVChunk, StepPlan
    from dejavu_py.protocol.replica import ReplicaChunk
    from dejavu_py.stage.dispatch import MessageTable
    from dejavu_py.stage.runner import Launched, StageRunner


class FTOff:
    """Fault tolerance off for this stage (see the module's docstring)."""

    awaiting_bookkeeping: tuple = ()
    """Never holds a step: there is no bookkeeping to wait for."""

    def __init__(self, cfg: RunConfig, runner: StageRunner) -> None:
        self.runner = runner
        self._ring = TokenStateRing(cfg.ft.checkpoint_policy, cfg.ft.checkpoint_interval, cfg.ft.max_checkpoints, 0)

    def register(self, table: MessageTable) -> None:
        pass

    def connect(self, generation: int, peers: list[str] | None = None) -> tuple[dict, None, None]:
        return {}, None, None

    def install(self, got: tuple) -> None:
        pass

    def drop(self, failed: list[str]) -> None:
        pass

    def before_step(self, plan: StepPlan) -> None:
        pass

    def after_step(self, done: Launched, out) -> bool:
        return False  # never the end of a replay: a stage without FT replays nothing

    def defer_bookkeeping(self, done: Launched, out) -> None:
        pass

    def bookkeep_next(self) -> None:
        pass

    def bookkeep(self, done: Launched, out) -> None:
        pass

    def attach_routing(self, plan: StepPlan) -> None:
        pass

    def on_prompt_kv(self, chunk: KVChunk, kv_2TKD: torch.Tensor, slots: list[int]) -> None:
        pass

    def expect_restore(self, replica_from: str | None, replay: int) -> bool:
        return replica_from is None  # no KV comes from a replica to a stage that keeps none

    def restore_kv(self, chunk: ReplicaChunk, kv: torch.Tensor | None) -> None:
        pass

    def stats(self) -> dict:
        return {**self._ring.stats(), "host_buffers_allocated": self.runner.host.allocated}
