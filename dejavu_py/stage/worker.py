"""A stage worker: the child process that owns one stage's weights and KV cache and runs its steps.

It is forked by its rank's zygote (or is a standby taking over), announces itself in the store
(``member/<name>``), loads its layers, builds its edges (in the layout's global order), beats its
heart, and serves one inbox fed by a receiver thread per inbound edge: plans (with activations), KV
chunks from prompt stages, control messages from the coordinator, and ``Stop``.

On ``Recover`` a survivor aborts its edges to the failed members, drops the plans that were in flight
(the coordinator re-issues them) and rebuilds just those edges at the new generation, keeping its
process, weights and KV cache.
"""
from __future__ import annotations

import collections
import gc
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from dejavu_py import log
from dejavu_py.comm.edge import Edge
from dejavu_py.comm.heartbeat import beat_interval, start_beating
from dejavu_py.comm.host_ring import RingRead
from dejavu_py.comm.receiver import EdgeBroken, start_receiver
from dejavu_py.comm.store import StoreAddress, connect, get_json, put_json
from dejavu_py.config import RunConfig
from dejavu_py.errors import PipelineError, UserError
from dejavu_py.models.attn_meta import step_slots
from dejavu_py.protocol import keys
from dejavu_py.protocol.layout import COORD, Layout, Member
from dejavu_py.protocol.plan import KVAck, KVChunk, Sampled, StepPlan, StepResult, Stop
from dejavu_py.protocol.recovery import (
    Rebuilt,
    Recover,
    ReplayQuery,
    ReplaySteps,
    ReplicaQuery,
    Rereplicate,
    Restore,
)
from dejavu_py.protocol.replica import ReplicaChunk
from dejavu_py.stage.ahead import RunAhead, StepDone, runs_ahead
from dejavu_py.stage.devices import data_backend, placement, resolve_device
from dejavu_py.stage.kv_stream import KVReceiver, KVStreamer
from dejavu_py.stage.runner import Launched, StageRunner
from dejavu_py.stage.stage_ft import StageFT
from dejavu_py.stage.stage_load import load_runner
from dejavu_py.stage.trace import StepTrace
from dejavu_py.timing import LoopTimes

_log = log.get(__name__)

GIL_SWITCH_S = 1e-4
"""The interpreter's switch interval in a worker. The stage's thread lets the GIL go at every torch call;
a background thread (replica sender and receiver, edge receivers) that takes it then keeps it until it
blocks or this interval ends. Python's default, 5 ms, is longer than a decode step's whole launch."""


@dataclass
class WorkerSpec:
    """What a forked worker needs to become a stage (picklable: it crosses the zygote pipe)."""

    member: Member
    layout: Layout
    cfg: RunConfig
    store: StoreAddress
    rank: int
    local_rank: int
    generation: int = 0
    """Incremented each time the member is replaced; keys its edges."""




@dataclass
class EdgesReady:
    """Inside a worker: the rebuild thread finished (never crosses an edge)."""

    generation: int
    edges: dict[str, Any] = field(default_factory=dict)
    rep: dict[str, Any] = field(default_factory=dict)


def main(spec: WorkerSpec) -> int:
    """Entry point in the forked child; returns the exit code."""
    store = connect(spec.store)
    return run_member(spec, store, None)


def run_member(spec: WorkerSpec, store, runner: StageRunner | None, takeover: bool = False) -> int:
    """Become ``spec.member`` (loading its stage unless ``runner`` has it) and serve until stopped."""
    m, cfg = spec.member, spec.cfg
    log.setup(cfg.runtime.log_level, cfg.logs_dir / f"rank{spec.rank}-{m.name}.log", console_level="WARNING")
    log.set_identity(m.role, m.name, spec.rank)
    torch.set_num_threads(cfg.pipeline.threads)
    sys.setswitchinterval(GIL_SWITCH_S)
    beating = start_beating(store, m.name, spec.generation, beat_interval(cfg.ft.hang_timeout_s))
    t0 = time.monotonic()
    try:
        device = resolve_device(cfg.pipeline, spec.local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        info = {"pid": os.getpid(), "zygote_pid": os.getppid(), "rank": spec.rank, "role": m.role, "stage": m.stage.index,
                "generation": spec.generation, "takeover": takeover, **placement(device)}
        put_json(store, keys.member(m.name), {**info, "state": "loading"})
        if runner is None:
            runner, _ = load_runner(spec, device)
    except UserError as e:
        put_json(store, keys.error(m.name), str(e))  # rank 0 reports it as the run's error
        _log.info("cannot start: %s", e)
        return 2
    put_json(store, keys.member(m.name), {**info, "state": "ready", "load_s": time.monotonic() - t0})
    worker = Worker(spec, store, runner, device)
    worker.connect()
    gc.freeze()  # the model and everything loading made: a full collection mid-run would walk it all
    _log.info("%s ready at generation %d: layers %d..%d on %s", m.name, spec.generation, m.stage.first_layer,
              m.stage.layers[-1], device)
    try:
        steps = worker.serve()
    except PipelineError as e:  # cannot go on (fault tolerance off, or the coordinator is gone)
        _log.warning("stopping: %s", e)
        return 1
    finally:
        beating.set()
    worker.close()
    _log.info("stopped after %d steps%s", steps, f"; swapping {runner.swapper.stats()}" if runner.swapper else "")
    return 0


class Worker:
    """One stage's serving loop."""

    def __init__(self, spec: WorkerSpec, store, runner: StageRunner, device: torch.device) -> None:
        self.spec, self.store, self.runner, self.device = spec, store, runner, device
        self.me = spec.member
        self.edges: dict[str, Edge] = {}
        self.inbox: queue.Queue = queue.Queue()
        self._closing = False
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
        self.ft = StageFT(self)
        self.times = LoopTimes()
        """Per step: idle (waiting for input), replica_wait, launch, finish (device_wait of it included),
        record (routing to the coordinator), send, checkpoint (token state and replica chunk, after the send);
        busy: other messages (replica chunks held)."""
        self.pending: collections.deque[Launched] = collections.deque()
        """Steps launched and not finished, oldest first."""
        self.kept: collections.deque[tuple[Launched, object]] = collections.deque()
        """Finished steps (with their outputs) whose FT bookkeeping (``StageFT.keep_step``) waits for the
        loop to be idle: off the chain of launches. With the steps in ``pending`` at most one, as many as
        an unfinished step would be: the coordinator's routing record and the replica lag the same."""
        self.ahead = RunAhead(self) if runs_ahead(spec) else None
        """Asynchronous scheduling (runtime/ahead.py)."""

    # -- edges ---------------------------------------------------------------------------------
    def connect(self) -> None:
        for peer in self.spec.layout.peers_of(self.me.name):
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
        wanted = {self.me.prev, COORD} | {p.name for p in self.spec.layout.kv_sources(self.me)}
        return [p for p in peers if p in wanted]

    def _make_edge(self, peer: str, generation: int) -> Edge:
        """Blocks until the peer joins, on a store client of its own (see comm.store.connect)."""
        timeout = self.spec.cfg.runtime.comm_timeout_s
        rendezvous = connect(self.spec.store)
        if peer == COORD:
            return Edge(rendezvous, self.me.name, peer, generation, timeout)
        mine = get_json(rendezvous, keys.member(self.me.name))
        other = get_json(rendezvous, keys.member(peer), timeout_s=self.spec.cfg.ft.recovery_timeout_s)
        return Edge(rendezvous, self.me.name, peer, generation, timeout, data_backend(mine, other), self.device,
                    inbound_bytes=self.ahead.ring_bytes(peer) if self.ahead is not None else 0)

    def listen(self, peer: str) -> None:
        """A receiver thread moving everything ``peer`` sends into the inbox. When the peer dies it first
        releases the edge's rings: this stage's stream may be waiting on them, and its loop on that."""

        def deliver(msg: object, x: object) -> bool:
            self.inbox.put((peer, msg, x))
            return isinstance(msg, Stop)

        start_receiver(self.edges[peer], peer, deliver, self._on_broken(peer), lambda: self._closing, release=True)

    def _on_broken(self, peer: str):
        return lambda event: self.inbox.put((peer, event, None))

    # -- serving -------------------------------------------------------------------------------
    def serve(self) -> int:
        steps = 0
        self.times = LoopTimes()  # from the first message on: connecting is no step's cost
        trace = StepTrace(self.me.name, self.spec.cfg.runtime)
        while True:
            trace.at(steps)
            self.times.mark("busy")  # whatever the last message cost, if not a step
            if self.kept and self.inbox.empty():  # idle: a finished step's FT bookkeeping
                self._keep(1)
                continue
            peer, msg, x = self.inbox.get()
            self.times.mark("idle")
            if isinstance(msg, StepDone):
                self._finish_through(msg.step)
                continue
            if isinstance(msg, Recover):
                self._release(msg.failed)  # launched steps may wait on the failed members' rings
            if not isinstance(msg, (StepPlan, Sampled)):
                self._finish_through(None)  # control messages see every launched step finished
            if not self.restored and isinstance(msg, (StepPlan, KVChunk, Sampled)):
                self._stash.append((peer, msg, x))
                continue
            if isinstance(msg, StepPlan):
                if msg.step > self.drop_through or msg.replay_until is not None:
                    steps += self.ahead.admit(msg, x) if self.ahead is not None else self.step(msg, x)
                elif isinstance(x, RingRead):
                    x.skip()
            elif isinstance(msg, Sampled) and self.ahead is not None:
                steps += self.ahead.on_sampled(msg, x)
            elif isinstance(msg, KVChunk):
                self._take_kv(msg, x)
            elif isinstance(msg, Stop):
                if self._stop(msg):
                    return steps
            elif isinstance(msg, Recover):
                self._recover(msg)
            elif isinstance(msg, EdgesReady):
                self._edges_ready(msg)
            elif isinstance(msg, Restore):
                self._restore(msg)
            elif isinstance(msg, ReplicaChunk):
                self.ft.take_back(msg, x)
                if self.ft.bulk_from is not None and not self.restored:
                    self._serve_stash()
            elif isinstance(msg, (ReplicaQuery, Rereplicate, ReplayQuery, ReplaySteps)):
                self.ft.handle(msg)
            elif isinstance(msg, EdgeBroken):
                self._broken(msg)
            else:
                raise PipelineError(f"{self.me.name}: unexpected {type(msg).__name__} from {peer}")

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
        self._keep(len(self.kept) + len(self.pending) - 1)  # at most one step's record not yet out
        self.ft.before_step(plan)
        self.times.mark("replica_wait")  # back-pressure: the replica holder's acknowledgements
        ahead = self.ahead is not None and plan.replay_until is None
        out = self.ahead.announce(plan) if ahead else None
        self.pending.append(self.runner.launch(plan, x))
        if ahead:  # finished when the next plan is launched behind it, or when the device is done with it
            self.ahead.forward(self.pending[-1], out)
        self.times.mark("launch")
        if not ahead:
            self._finish_through(None)
        elif len(self.pending) > 1:
            self._finish_through(self.pending[-2].plan.step)
        return 1

    def _finish_through(self, step: int | None) -> None:
        """Finish the launched steps up to ``step`` (None: all, their K/V copies and FT bookkeeping too),
        oldest first: send the output, then leave the checkpoint and the replica chunk to ``kept``."""
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
                self.ft.relay(done.plan)
                self.send_to(self.me.next, done.plan, out)
            self.times.mark("send")
            if self.ft.active:
                self.kept.append((done, out))
            self.times.end_step()
        if step is None:  # the last graph step's K/V too: no step may be launched behind it soon
            self.runner.flush_late()
            self._keep(len(self.kept))

    def _keep(self, n: int) -> None:
        """The FT bookkeeping of the ``n`` oldest finished steps (``kept``)."""
        for _ in range(min(n, len(self.kept))):
            self.ft.keep_step(*self.kept.popleft())
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

    def _take_kv(self, chunk: KVChunk, kv_2TKD: torch.Tensor | None) -> None:
        assert self.receiver is not None and kv_2TKD is not None
        slots = step_slots(chunk.tables, chunk.start_pos, chunk.num_tokens, self.spec.cfg.cache.block_size)
        done = self.receiver.apply(chunk, kv_2TKD, slots)
        self.ft.on_prompt_kv(chunk, kv_2TKD, slots)
        if done:
            self.send_coord(KVAck(self.me.name, [s for s, _ in done], [b for _, b in done]))

    def _stop(self, msg: Stop) -> bool:
        stats = {**self.ft.stats(), **(self.runner.swapper.stats() if self.runner.swapper else {}),
                 "loop": self.times.per_step_ms()}
        _log.info("per step: %s", self.times.per_step_ms())
        put_json(self.store, keys.ft_stats(self.me.name), stats)  # before the stop marker moves on
        if not msg.forward:
            _log.info("told to stop: %s", msg.reason)
            return True
        for name, edge in self.edges.items():
            if name != self.me.next:
                edge.flush()  # KV still on its way to token stages
        nxt = self.edges[self.me.next]
        nxt.send(msg)
        nxt.flush()
        return True

    # -- recovery ------------------------------------------------------------------------------
    def _recover(self, msg: Recover) -> None:
        """Abort the edges to the failed members, drop in-flight plans, rebuild those edges."""
        _log.warning("recovery (generation %d): %s failed", msg.generation, ", ".join(msg.failed))
        self.drop_through = max(self.drop_through, msg.drop_through)
        if self.ahead is not None:
            self.ahead.drop_blocked()
        for peer in msg.failed:
            edge = self.edges.pop(peer, None)
            if edge is not None:
                edge.close()
        self.ft.drop(msg.failed)
        peers = [p for p in self.spec.layout.peers_of(self.me.name) if p in msg.failed]  # may be none: a replica peer

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

    def _edges_ready(self, msg: EdgesReady) -> None:
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

    def _restore(self, msg: Restore) -> None:
        """A replacement learns the sequences in flight (block tables, sampling) and starts serving."""
        self.runner.seqs.update(msg.seqs)
        self.drop_through = max(self.drop_through, msg.drop_through)
        _log.info("restoring %d sequences (KV from %s, %d steps to replay)", len(msg.seqs), msg.replica_from, msg.replay)
        if self.ft.expect_restore(msg.replica_from, msg.replay):
            self._serve_stash()

    def _serve_stash(self) -> None:
        self.restored = True
        for item in self._stash:
            self.inbox.put(item)
        self._stash.clear()

    def close(self) -> None:
        """Abort every edge so that receiver threads blocked on them return."""
        self._closing = True
        for edge in self.edges.values():
            edge.close()

    def _broken(self, msg: EdgeBroken) -> None:
        if msg.peer == COORD:
            raise PipelineError(f"{self.me.name}: lost the coordinator ({msg.error})")
        if self.spec.cfg.ft.enabled or msg.peer in {p.name for p in self.spec.layout.kv_sources(self.me)}:
            _log.warning("edge to %s broke (%s); waiting for the coordinator", msg.peer, msg.error)
            return
        raise PipelineError(f"{self.me.name}: edge to {msg.peer} broke: {msg.error}")
