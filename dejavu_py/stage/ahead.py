"""Asynchronous scheduling on the stage side (see coordinator.scheduler for the coordinator's side).

A stage of the decode pipeline launches a step before finishing the one before it; a waiter thread
tells the loop when the device is done with a step. Its output leaves as soon as the step is queued:
activations to the next stage, or, from the last of several stages, the sampled ids straight to the
first, which launches the plan that follows that step with its placeholders read on the device. On a
shared GPU the message even leaves before the launch, its tensor reserved in the receiver's ring
(comm/host_ring.py): the receiver's stream waits for it, so the stages launch side by side and the
pipeline's chain has no host launch on it.
"""
from __future__ import annotations

import collections
import math
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from dejavu_py.comm.host_ring import RingRead
from dejavu_py.protocol.layout import COORD
from dejavu_py.protocol.plan import Sampled, StepPlan
from dejavu_py.stage.port import StagePort

if TYPE_CHECKING:
    from dejavu_py.config import RunConfig
    from dejavu_py.protocol.layout import Member
    from dejavu_py.stage.dispatch import MessageTable
    from dejavu_py.stage.runner import Launched, StageRunner

RING_TOKENS = 1024
"""Tokens of activations a ring slot between two stages on one GPU holds (at least a full decode batch;
a step with a long prefill goes the slow way): a ring is made, and its host memory pinned, whenever an
edge is rebuilt after a failure, so it stays small."""


@dataclass
class StepDone:
    """Posted to the loop's inbox when the device has finished a launched step."""

    step: int


class StepWaiter:
    """A thread that waits, with the GIL released, for launched steps' events and reports each done."""

    def __init__(self, post: Callable[[str, object], None]) -> None:
        self.post = post
        self.todo: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, name="step-waiter", daemon=True).start()

    def watch(self, launched: Launched) -> None:
        self.todo.put((launched.plan.step, launched.event))

    def _run(self) -> None:
        while True:
            step, event = self.todo.get()
            if event is not None:  # on CPU the step is done when launched
                event.synchronize()
            self.post(COORD, StepDone(step))


def runs_ahead(cfg: RunConfig, member: Member) -> bool:
    """Asynchronous scheduling applies: a stage of the decode pipeline without KV swapping (the
    coordinator plans its steps two deep). On CPU a step is done when launched; the loop is the same."""
    return cfg.pipeline.async_scheduling and not cfg.cache.swap and member.role in ("stage", "token")


class AheadPort(StagePort, Protocol):
    """The worker as running ahead sees it: the stage's port, and the launch of a plan."""

    def step(self, plan: StepPlan, x: object) -> int:
        """Launch ``plan`` now (``x``: its activations or a ring read of them); returns 1, a step."""
        ...

    def finish_through(self, step: int | None) -> None:
        """Finish the launched steps up to ``step`` (None: all): their outputs go on."""
        ...


class RunAhead:
    """A worker's running-ahead side: held plans, outputs sent at launch, the last-to-first ids.
    ``attach_routing``: fault tolerance's, called on a plan before it goes on to the next stage."""

    def __init__(self, port: AheadPort, runner: StageRunner, attach_routing: Callable[[StepPlan], None]) -> None:
        self.port, self.runner, self.attach_routing = port, runner, attach_routing
        self.waiter = StepWaiter(port.post)
        me, pipe = port.me, port.layout.decode_pipeline
        self.first = pipe[0].name if len(pipe) > 1 and me.name == pipe[-1].name else None
        """The last of several stages: where its sampled ids go (the first stage embeds them)."""
        self.last = pipe[-1].name if len(pipe) > 1 and me.name == pipe[0].name else None
        self.blocked: collections.deque[tuple[StepPlan, object]] = collections.deque()
        """First stage: plans (in order) waiting for the sampled ids of the step they follow."""

    def register(self, table: MessageTable) -> None:
        """Its messages: the last stage's sampled ids (on a replacement, stashed until it is restored,
        as plans are) and the waiter's reports."""
        table.register(Sampled, self.on_sampled, finishes_steps=False, waits_for_restore=True)
        table.register(StepDone, self._on_step_done, finishes_steps=False)

    def _on_step_done(self, msg: StepDone, _: object = None) -> int:
        self.port.finish_through(msg.step)
        return 0

    def ring_bytes(self, peer: str) -> int:
        """Largest tensor ``peer`` sends this stage through a ring on a shared GPU: activations from the
        predecessor, sampled ids from the last stage to the first."""
        sc, model = self.port.cfg.scheduler, self.runner.model
        if peer == self.port.me.prev:
            tokens = min(sc.max_batch_tokens, max(sc.max_batch_size, RING_TOKENS))
            return tokens * model.cfg.hidden_size * model.dtype.itemsize
        return sc.max_batch_size * 8 if peer == self.last else 0

    # -- plans in --------------------------------------------------------------------------------
    def admit(self, plan: StepPlan, x) -> int:
        """Launch the plan (returns 1), or (first stage) hold it until the ids of the step it follows
        are here (0)."""
        if self.blocked or not self._ready(plan):
            self.blocked.append((plan, x))
            return 0
        self.port.step(plan, x)
        return 1

    def _ready(self, plan: StepPlan) -> bool:
        return plan.follows is None or not self.port.me.stage.has_embed or plan.follows in self.runner.sampled

    def on_sampled(self, msg: Sampled, ids) -> int:
        """First stage: the last stage's ids of a step (clamped: a ring released after a failure holds
        stale bytes, and the embedding must not read out of range); launches the plans they free."""
        runner = self.runner
        ids = ids.take() if isinstance(ids, RingRead) else ids.to(runner.device)
        runner.sampled[msg.step] = ids.clamp_(0, runner.model.cfg.vocab_size - 1)
        runner.trim_sampled()
        n = 0
        while self.blocked and self._ready(self.blocked[0][0]):
            self.port.step(*self.blocked.popleft())
            n += 1
        return n

    def drop_blocked(self) -> None:
        """A failure: the held plans were in flight, the coordinator re-issues them."""
        for _, x in self.blocked:
            if isinstance(x, RingRead):
                x.skip()
        self.blocked.clear()

    # -- output out ------------------------------------------------------------------------------
    def _output_for(self, plan: StepPlan) -> tuple[str, object, tuple[int, ...], torch.dtype] | None:
        """Where a step's output goes, with what message, and its shape and dtype."""
        if not self.port.me.stage.has_head:
            model = self.runner.model
            return self.port.me.next, plan, (plan.total_tokens, model.cfg.hidden_size), model.dtype
        if self.first is not None:
            return self.first, Sampled(plan.mb, plan.step), (sum(plan.wants_token),), torch.long
        return None

    def announce(self, plan: StepPlan) -> tuple[str, object, int | None] | None:
        """Before the launch: where the step's output goes and with what message (None: nowhere). On a
        shared GPU the message leaves now, its tensor reserved in the receiver's ring (the sequence
        number returned); otherwise ``forward`` sends message and tensor."""
        out = self._output_for(plan)
        if out is None:
            return None
        peer, msg, shape, dtype = out
        if msg is plan:  # activations to the next stage: FT's routing records ride along
            self.attach_routing(plan)
        edge = self.port.edges.get(peer)
        seq = edge.reserve(math.prod(shape) * dtype.itemsize) if edge is not None else None
        if seq is not None:
            self.port.send_to(peer, msg, ring=(seq, shape, dtype))
        return peer, msg, seq

    def forward(self, done: Launched, out: tuple[str, object, int | None] | None) -> None:
        """Once the step is queued (``out``: what ``announce`` returned): its tensor into the ring
        announced, or message and tensor now; the waiter reports when the device is done with it."""
        self.waiter.watch(done)
        if out is None:
            return
        peer, msg, seq = out
        tensor = self.runner.sampled[done.plan.step] if self.port.me.stage.has_head else done.out
        if seq is not None:
            edge = self.port.edges.get(peer)
            if edge is not None and not edge.closed:
                edge.put(seq, tensor)
        else:
            self.port.send_to(peer, msg, tensor, fast=True)
        done.forwarded = True
