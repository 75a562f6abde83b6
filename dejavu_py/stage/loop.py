"""A stage's serving loop: one inbox fed by a receiver thread per inbound edge (plans with their
activations, KV chunks from prompt stages, control messages from the coordinator, ``Stop``), each
message handed to the handler its type is registered with (``stage.dispatch``).

The worker builds its edges (in the layout's global order). On ``Recover`` a survivor aborts its edges
to the failed members, drops the plans that were in flight (the coordinator re-issues them) and
rebuilds just those edges at the new generation, keeping its process, weights and KV cache.
"""
from __future__ import annotations

import collections
import queue
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

import torch

from dejavu_py import log
from dejavu_py.comm.edge import Edge
from dejavu_py.comm.host_ring import RingRead
from dejavu_py.comm.receiver import EdgeBroken, start_receiver
from dejavu_py.comm.store import connect, get_json, put_json
from dejavu_py.errors import PipelineError
from dejavu_py.models.attn_meta import step_slots
from dejavu_py.protocol import keys
from dejavu_py.protocol.layout import COORD
from dejavu_py.protocol.plan import KVAck, KVChunk, StepPlan, StepResult, Stop
from dejavu_py.protocol.recovery import Rebuilt, Recover, Restore
from dejavu_py.stage.ahead import RunAhead, runs_ahead
from dejavu_py.stage.devices import data_backend
from dejavu_py.stage.dispatch import MessageTable
from dejavu_py.stage.kv_stream import KVReceiver, KVStreamer
from dejavu_py.stage.runner import Launched, StageRunner
from dejavu_py.stage.stage_ft import fault_tolerance
from dejavu_py.stage.trace import StepTrace
from dejavu_py.timing import LoopTimes

if TYPE_CHECKING:
    from dejavu_py.stage.worker import WorkerSpec

_log = log.get(__name__)


@dataclass
class EdgesReady:
    """Inside a worker: the rebuild thread finished (never crosses an edge)."""

    generation: int
    edges: dict[str, Any] = field(default_factory=dict)
    rep: dict[str, Any] = field(default_factory=dict)


class Worker:
    """One stage's serving loop. Its fault tolerance and running ahead see it through their ports
    (``StagePort``, and ``FTPort`` and ``AheadPort`` beside those parts), never as a whole."""

    def __init__(self, spec: WorkerSpec, store, runner: StageRunner, device: torch.device) -> None:
        self.spec, self.store, self.runner, self.device = spec, store, runner, device
        self.me = spec.member
        self.layout, self.cfg, self.store_address = spec.layout, spec.cfg, spec.store
        self.edges: dict[str, Edge] = {}
        self.inbox: queue.Queue = queue.Queue()
        self.closing = False
        self.drop_through = -1  # plans up to this step were in flight at a failure: dropped, re-issued
        self.restored = spec.generation == 0  # a replacement waits for the coordinator's Restore
        self._stash: list[tuple] = []
        self.streamer: KVStreamer | None = None
        self.receiver: KVReceiver | None = None
        if self.me.role == "prompt":
            owner = lambda layer: spec.layout.owner_of_layer("token", layer).name  # noqa: E731
            self.streamer = KVStreamer(self._send_kv, owner)
            runner.kv.on_update = self.streamer.on_update
        elif self.me.role == "token":
            self.receiver = KVReceiver(runner.kv, spec.cfg.cache.block_size, runner.swapper)
        self.ft = fault_tolerance(self, runner)
        """``StageFT``, or where the stage keeps none, ``FTOff``: the same calls, doing nothing."""
        self.history = self.cfg.serve.kept_history()
        """Steps whose times the loop keeps (None: all, a batch run's)."""
        self.times = LoopTimes(self.history)
        """Per step: idle (waiting for input), replica_wait, launch, finish (device_wait of it included),
        record (routing to the coordinator), send, checkpoint (token state and replica chunk, after the send);
        busy: other messages (replica chunks held)."""
        self.pending: collections.deque[Launched] = collections.deque()
        """Steps launched and not finished, oldest first."""
        self.awaiting_bookkeeping = self.ft.awaiting_bookkeeping
        """Finished steps whose FT bookkeeping waits for the loop to be idle: ``StageFT``'s queue, read
        (never changed) here, on every pass of the loop."""
        self.ahead = RunAhead(self, runner, self.ft.attach_routing) if runs_ahead(spec.cfg, self.me) else None
        """Asynchronous scheduling (stage/ahead.py)."""
        self._launch = self.ahead.admit if self.ahead is not None else self.step
        self.stopped = False
        self.messages = MessageTable()
        """Message type -> handler: the core's, running ahead's and fault tolerance's (``serve``)."""
        self._register(self.messages)
        if self.ahead is not None:
            self.ahead.register(self.messages)
        self.ft.register(self.messages)

    # -- edges ---------------------------------------------------------------------------------
    def connect(self) -> None:
        for peer in self.layout.peers_of(self.me.name):
            self.edges[peer] = self._make_edge(peer, self.spec.generation)
        for peer in self._inbound(self.edges):
            self.listen(peer)
        self.ft.install(self.ft.connect(self.spec.generation))  # replica edges come after all main ones

    def _inbound(self, peers) -> list[str]:
        """Of these peers, those this stage receives from: its predecessor, the coordinator (control),
        and (token stages) the prompt stages that stream KV to it. Running ahead: every peer (the last
        stage sends to the first; a dead successor must release this stage's rings, see ``listen``)."""
        if self.ahead is not None:
            return list(peers)
        wanted = {self.me.prev, COORD} | {p.name for p in self.layout.kv_sources(self.me)}
        return [p for p in peers if p in wanted]

    def _make_edge(self, peer: str, generation: int) -> Edge:
        """Blocks until the peer joins, on a store client of its own (see comm.store.connect)."""
        timeout = self.cfg.runtime.comm_timeout_s
        rendezvous = connect(self.store_address)
        if peer == COORD:
            return Edge(rendezvous, self.me.name, peer, generation, timeout)
        mine = get_json(rendezvous, keys.member(self.me.name))
        other = get_json(rendezvous, keys.member(peer), timeout_s=self.cfg.ft.recovery_timeout_s)
        return Edge(rendezvous, self.me.name, peer, generation, timeout, data_backend(mine, other), self.device,
                    inbound_bytes=self.ahead.ring_bytes(peer) if self.ahead is not None else 0)

    def listen(self, peer: str) -> None:
        """A receiver thread moving everything ``peer`` sends into the inbox. When the peer dies it first
        releases the edge's rings: this stage's stream may be waiting on them, and its loop on that."""

        def deliver(msg: object, x: object) -> bool:
            self.inbox.put((peer, msg, x))
            return isinstance(msg, Stop)

        start_receiver(self.edges[peer], peer, deliver, self._on_broken(peer), lambda: self.closing, release=True)

    def _on_broken(self, peer: str):
        return lambda event: self.inbox.put((peer, event, None))

    def post(self, peer: str, msg: object, x: object = None) -> None:
        self.inbox.put((peer, msg, x))

    # -- serving -------------------------------------------------------------------------------
    def _register(self, table: MessageTable) -> None:
        """The core's messages. Before a handler runs, a control message sees every launched step
        finished; plans, and KV from prompt stages, wait in the stash on a replacement until it is
        restored. A ``Recover`` finishes the launched steps itself: first it releases the failed
        members' rings, which those steps may be waiting on."""
        table.register(StepPlan, self._on_plan, finishes_steps=False, waits_for_restore=True)
        table.register(KVChunk, self._take_kv, waits_for_restore=True)
        table.register(Stop, self._stop)
        table.register(Recover, self._recover, finishes_steps=False)
        table.register(EdgesReady, self._edges_ready)
        table.register(Restore, self._restore)
        table.register(EdgeBroken, self._broken)

    def serve(self) -> int:
        """Handle messages until told to stop; returns the steps launched."""
        steps = 0
        self.times = LoopTimes(self.history)  # from the first message on: connecting is no step's cost
        trace = StepTrace(self.me.name, self.spec.cfg.runtime)
        routes, lookup = self.messages.routes, self.messages.lookup
        while not self.stopped:
            trace.at(steps)
            self.times.mark("busy")  # whatever the last message cost, if not a step
            if self.awaiting_bookkeeping and self.inbox.empty():  # idle: a finished step's FT bookkeeping
                self._bookkeep(1)
                continue
            peer, msg, x = self.inbox.get()
            self.times.mark("idle")
            route = routes.get(type(msg)) or lookup(type(msg))
            if route is None:
                self._unexpected(peer, msg)
            handle, finishes_steps, waits_for_restore = route
            if finishes_steps:
                self.finish_through(None)  # control messages see every launched step finished
            if waits_for_restore and not self.restored:
                self._stash.append((peer, msg, x))
                continue
            steps += handle(msg, x)
        return steps

    def _on_plan(self, plan: StepPlan, x) -> int:
        """Launch a plan (or, running ahead, hold it), unless it was in flight at a failure: the
        coordinator re-issues those (a replay's plans always run)."""
        if plan.step > self.drop_through or plan.replay_until is not None:
            return self._launch(plan, x)
        if isinstance(x, RingRead):
            x.skip()
        return 0

    def _unexpected(self, peer: str, msg: object) -> NoReturn:
        self.finish_through(None)
        raise PipelineError(f"{self.me.name}: unexpected {type(msg).__name__} from {peer}: no handler for it "
                            f"(register one with Worker.messages)")

    def _release(self, failed: list[str]) -> None:
        for peer in failed:
            if peer in self.edges:
                self.edges[peer].release()

    def step(self, plan: StepPlan, x) -> int:
        """Launch a plan (``x``: its activations, or a ring read of them); finish it now unless running
        ahead. Returns 1 (a step)."""
        if isinstance(x, RingRead):
            x = x.take()
        if self.streamer is not None:
            seqs = {**self.runner.seqs, **plan.new_seqs}
            self.streamer.begin(plan, seqs)
        if self.receiver is not None and plan.release:
            self.receiver.forget(plan.release)
        self._bookkeep(len(self.awaiting_bookkeeping) + len(self.pending) - 1)  # at most one step's record not out
        self.ft.before_step(plan)
        self.times.mark("replica_wait")  # back-pressure: the replica holder's acknowledgements
        ahead = self.ahead is not None and plan.replay_until is None
        out = self.ahead.announce(plan) if ahead else None
        self.pending.append(self.runner.launch(plan, x))
        if ahead:  # finished when the next plan is launched behind it, or when the device is done with it
            self.ahead.forward(self.pending[-1], out)
        self.times.mark("launch")
        if not ahead:
            self.finish_through(None)
        elif len(self.pending) > 1:
            self.finish_through(self.pending[-2].plan.step)
        return 1

    def finish_through(self, step: int | None) -> None:
        """Finish the launched steps up to ``step`` (None: all, their K/V copies and FT bookkeeping too),
        oldest first: send the output, then leave the checkpoint and the replica chunk to
        ``awaiting_bookkeeping``."""
        while self.pending and (step is None or self.pending[0].plan.step <= step):
            done = self.pending.popleft()
            waited = self.runner.wait.seconds
            out = self.runner.finish(done)
            self.times.mark("finish")
            self.times.add("device_wait", self.runner.wait.seconds - waited)
            if self.ft.after_step(done, out):
                self.times.end_step()
                continue  # a replayed step ends here: its output was already delivered before the failure
            self.times.mark("record")
            if isinstance(out, StepResult):
                self.send_to(self.me.next, out)
            elif not done.forwarded:
                self.ft.attach_routing(done.plan)
                self.send_to(self.me.next, done.plan, out)
            self.times.mark("send")
            self.ft.defer_bookkeeping(done, out)
            self.times.end_step()
        if step is None:  # the last graph step's K/V too: no step may be launched behind it soon
            self.runner.flush_deferred_copies()
            self._bookkeep(len(self.awaiting_bookkeeping))

    def _bookkeep(self, n: int) -> None:
        """The FT bookkeeping of the ``n`` oldest finished steps (``awaiting_bookkeeping``)."""
        for _ in range(min(n, len(self.awaiting_bookkeeping))):
            self.ft.bookkeep_next()
            self.times.mark("checkpoint")

    def send_coord(self, msg: object) -> None:
        self.send_to(COORD, msg)

    def send_to(self, peer: str, msg: object, tensor: torch.Tensor | None = None, fast: bool = False,
                ring: tuple | None = None) -> None:
        """Send, or report the edge broken (the peer died): the coordinator's recovery takes it from
        there, and whatever this message carried is re-planned. ``fast``, ``ring``: see Edge.send."""
        edge = self.edges.get(peer)
        if edge is None:  # being rebuilt after a failure: the message belonged to a dropped step
            return
        try:
            edge.send(msg, tensor, fast, ring)
        except Exception as e:
            if not edge.closed:
                edge.closed = True
                self._on_broken(peer)(EdgeBroken.of(peer, e, edge.generation))

    def _send_kv(self, owner: str, chunk: KVChunk, kv_2TKD: torch.Tensor) -> None:
        self.send_to(owner, chunk, kv_2TKD)

    def _take_kv(self, chunk: KVChunk, kv_2TKD: torch.Tensor | None) -> int:
        assert self.receiver is not None and kv_2TKD is not None
        slots = step_slots(chunk.tables, chunk.start_pos, chunk.num_tokens, self.cfg.cache.block_size)
        done = self.receiver.apply(chunk, kv_2TKD, slots)
        self.ft.on_prompt_kv(chunk, kv_2TKD, slots)
        if done:
            self.send_coord(KVAck(self.me.name, [s for s, _ in done], [b for _, b in done]))
        return 0

    def _stop(self, msg: Stop, _: object = None) -> int:
        """Report this stage's figures, pass the stop on if asked to, and end the loop."""
        self.stopped = True
        stats = {**self.ft.stats(), **(self.runner.swapper.stats() if self.runner.swapper else {}),
                 "loop": self.times.per_step_ms()}
        _log.info("per step: %s", self.times.per_step_ms())
        put_json(self.store, keys.ft_stats(self.me.name), stats)  # before the stop marker moves on
        if not msg.forward:
            _log.info("told to stop: %s", msg.reason)
            return 0
        for name, edge in self.edges.items():
            if name != self.me.next:
                edge.flush()  # KV still on its way to token stages
        nxt = self.edges[self.me.next]
        nxt.send(msg)
        nxt.flush()
        return 0

    # -- recovery ------------------------------------------------------------------------------
    def _recover(self, msg: Recover, _: object = None) -> int:
        """Release the failed members' rings (launched steps may wait on them) and finish the launched
        steps; abort the edges to the failed members, drop in-flight plans, rebuild those edges."""
        self._release(msg.failed)
        self.finish_through(None)
        _log.warning("recovery (generation %d): %s failed", msg.generation, ", ".join(msg.failed))
        self.drop_through = max(self.drop_through, msg.drop_through)
        if self.ahead is not None:
            self.ahead.drop_blocked()
        for peer in msg.failed:
            edge = self.edges.pop(peer, None)
            if edge is not None:
                edge.close()
        self.ft.drop(msg.failed)
        peers = [p for p in self.layout.peers_of(self.me.name) if p in msg.failed]  # may be none: a replica peer

        def rebuild() -> None:
            if self.device.type == "cuda":  # a new thread starts on device 0: the edges' rings belong to ours
                torch.cuda.set_device(self.device)
            try:
                edges = {p: self._make_edge(p, msg.generation) for p in peers}
                rep = self.ft.connect(msg.generation, msg.failed)  # after the main edges: the global order
            except Exception as e:  # a replacement that never came: the coordinator will try again
                _log.warning("rebuilding edges for generation %d failed: %s", msg.generation, e)
                return
            self.inbox.put((COORD, EdgesReady(msg.generation, edges, rep), None))

        threading.Thread(target=rebuild, name=f"rebuild-{msg.generation}", daemon=True).start()
        return 0

    def _edges_ready(self, msg: EdgesReady, _: object = None) -> int:
        for peer, edge in msg.edges.items():
            if peer in self.edges:  # a later recovery already replaced it
                edge.close()
                continue
            self.edges[peer] = edge
        for peer in self._inbound(msg.edges):
            if self.edges.get(peer) is msg.edges[peer]:
                self.listen(peer)
        self.ft.install(msg.rep)
        self.send_coord(Rebuilt(self.me.name, msg.generation))
        return 0

    def _restore(self, msg: Restore, _: object = None) -> int:
        """A replacement learns the sequences in flight (block tables, sampling) and starts serving."""
        self.runner.seqs.update(msg.seqs)
        self.drop_through = max(self.drop_through, msg.drop_through)
        _log.info("restoring %d sequences (KV from %s, %d steps to replay)", len(msg.seqs), msg.replica_from, msg.replay)
        if self.ft.expect_restore(msg.replica_from, msg.replay):
            self._serve_stash()
        return 0

    def resume_after_restore(self) -> None:
        """Fault tolerance restored this replacement's KV after its Restore came: serve what waited."""
        if not self.restored:
            self._serve_stash()

    def _serve_stash(self) -> None:
        self.restored = True
        for item in self._stash:
            self.inbox.put(item)
        self._stash.clear()

    def close(self) -> None:
        """Abort every edge so that receiver threads blocked on them return."""
        self.closing = True
        for edge in self.edges.values():
            edge.close()

    def _broken(self, msg: EdgeBroken, _: object = None) -> int:
        if msg.peer == COORD:
            raise PipelineError(f"{self.me.name}: lost the coordinator ({msg.error})")
        if self.cfg.ft.enabled or msg.peer in {p.name for p in self.layout.kv_sources(self.me)}:
            _log.warning("edge to %s broke (%s); waiting for the coordinator", msg.peer, msg.error)
            return 0
        raise PipelineError(f"{self.me.name}: edge to {msg.peer} broke: {msg.error}")
