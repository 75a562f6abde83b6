"""The coordinator owns requests and results: it admits requests as its source hands them out (the
request file, coordinator/source.py), lets a driver (colocated or disaggregated) turn every message into
the next plans, keeps the request journal, and tells its output sink (the output file,
coordinator/sink.py) of every token and every finished request. It lives in rank 0's supervisor
process and computes nothing.

Everything reaches it through one inbox: a receiver thread per edge (results, KV acknowledgements,
recovery acknowledgements) and watchers that turn supervisors' exit reports and missing heartbeats
into ``MemberLost`` events. With fault tolerance on, a lost member is replaced (coordinator/recovery.py) while
the others keep running; with it off, the run ends and a rerun with the same run directory resumes.
"""
from __future__ import annotations

import collections
import gc
import json
import math
import os
import queue
import threading
import time
from collections.abc import Callable

from dejavu_py import log
from dejavu_py.comm.edge import Edge
from dejavu_py.comm.receiver import EdgeBroken, start_receiver
from dejavu_py.comm.store import StoreAddress, connect, get_json, has
from dejavu_py.config import RunConfig
from dejavu_py.coordinator import run_files, workers_file
from dejavu_py.coordinator.driver import Driver
from dejavu_py.coordinator.drivers import build_driver
from dejavu_py.coordinator.journal import Journal, fingerprint
from dejavu_py.coordinator.ledger import Ledger
from dejavu_py.coordinator.output import request_error_record
from dejavu_py.coordinator.progress import ProgressBar, RunSummary, latency_stats
from dejavu_py.coordinator.recovery import Recovery
from dejavu_py.coordinator.request import RequestLimits, load_requests
from dejavu_py.coordinator.sink import JsonlSink, OutputSink
from dejavu_py.coordinator.source import FileSource, RequestSource
from dejavu_py.coordinator.watch import MemberLost, watch
from dejavu_py.errors import PipelineError, UserError
from dejavu_py.protocol import keys
from dejavu_py.protocol.layout import COORD, Layout
from dejavu_py.protocol.plan import StepCounter, StepResult, Stop
from dejavu_py.protocol.recovery import Rebuilt, Replayed, ReplayHave
from dejavu_py.protocol.replica import ReplicaCoverage
from dejavu_py.protocol.serving import Cancel
from dejavu_py.timing import LoopTimes
from dejavu_py.tokenizer import load_tokenizer

_log = log.get(__name__)
LATE_RECOVERY_MESSAGES = (Rebuilt, Replayed, ReplayHave, ReplicaCoverage)


class PipelineLost(RuntimeError):
    """A member was lost with fault tolerance off: the run ends, a rerun resumes from the journal."""


class Wake:
    """In the inbox: a request source's nudge to poll now (a request arrived unannounced)."""


def _nothing() -> None:
    pass


class Coordinator:
    def __init__(self, cfg: RunConfig, layout: Layout, model_cfg, store, addr: StoreAddress | None = None) -> None:
        self.cfg, self.layout, self.model_cfg, self.store, self.addr = cfg, layout, model_cfg, store, addr
        self.t_start = time.monotonic()
        self.tokenizer = load_tokenizer(cfg.model)
        self.rejected: list[dict] = []  # error records of the request file's bad lines
        self.ledger: Ledger | None = None
        self.summary: RunSummary | None = None
        self.edges: dict[str, Edge] = {}
        self.inbox: queue.Queue = queue.Queue()
        self.member_gen = {m.name: 0 for m in layout.members}
        self.steps = StepCounter()
        self.recovery = Recovery(self, cfg.ft, cfg.run_dir / "recoveries.jsonl")
        self.driver: Driver | None = None
        self.journal: Journal | None = None
        self._stop_watch = threading.Event()
        self._progress_t = 0.0
        self.timeline: collections.deque[list] = collections.deque(maxlen=cfg.serve.kept_history())
        """[unix time, tokens, requests done] -> timeline-<attempt>.json: every sample of a batch run, the
        latest ones of a server (its memory stays bounded)."""
        self.loop_times = LoopTimes(cfg.serve.kept_history())
        """The serving loop per step result: idle (waiting for any message), plan (everything else)."""
        self.serving = False
        """Every stage is ready and the run has not failed (a recovery under way keeps it true)."""
        self.on_state_change: Callable[[], None] = _nothing
        """Called (on the serving loop) each time ``serving`` changes and when a recovery starts or ends:
        an online front-end hears it at once."""
        self._cancels: list[Cancel] = []

    # -- setup ---------------------------------------------------------------------------------
    def request_limits(self) -> RequestLimits:
        """What a request may ask of this model, cache and run (a file's line or an online client's)."""
        mc, cache = self.model_cfg, self.cfg.cache
        return RequestLimits(
            vocab_size=mc.vocab_size,
            max_model_len=cache.max_model_len or mc.max_position_embeddings,
            kv_capacity_tokens=cache.partition_blocks * cache.block_size,
            default_max_new_tokens=self.cfg.generation.max_new_tokens,
            run_seed=self.cfg.generation.seed,
        )

    def load_requests(self) -> FileSource:
        """The request file as a source; whole-file mistakes raise UserError here, before any worker
        starts, and each bad line's error record waits for :meth:`run` to tell the sink."""
        requests, errors = load_requests(self.cfg.prompts, self.request_limits(), self.tokenizer)
        for err in errors:
            _log.warning("%s", err)
        self.rejected = [request_error_record(err) for err in errors]
        return FileSource(requests)

    def await_members(self) -> None:
        """Wait until every stage worker has loaded its weights; fail on the first error or death."""
        deadline = time.monotonic() + self.cfg.runtime.startup_timeout_s
        pending = {m.name for m in self.layout.members}
        while pending:
            for name in sorted(pending):
                if has(self.store, keys.error(name)):
                    raise UserError(get_json(self.store, keys.error(name)))
                if has(self.store, keys.exit_(name, 0)):
                    raise PipelineError(f"worker of {name} {get_json(self.store, keys.exit_(name, 0))['how']} while starting")
                if has(self.store, keys.member(name)) and get_json(self.store, keys.member(name))["state"] == "ready":
                    pending.discard(name)
            if time.monotonic() > deadline:
                raise PipelineError(
                    f"workers {sorted(pending)} not ready after {self.cfg.runtime.startup_timeout_s:.0f}s "
                    "(raise --startup-timeout for big checkpoints)"
                )
            time.sleep(0.02)
        self.refresh_workers_file()
        _log.info("all %d stages ready after %.2fs", len(self.layout.members), time.monotonic() - self.t_start)

    def refresh_workers_file(self, status: str = "running") -> None:
        workers_file.write(self.cfg.workers_file, workers_file.collect(self.store, self.layout), os.getpid(), status)

    def connect(self) -> None:
        """Edges to every member, in the layout's global order, each with a receiver thread; watchers."""
        for peer in self.layout.peers_of(COORD):
            self.edges[peer] = self.make_edge(peer, 0)
            self.start_pump(peer, self.edges[peer])
        watch(self.store, [m.name for m in self.layout.members], self.generation_of, self.inbox,
              self.cfg.ft.hang_timeout_s, self._stop_watch, lambda name: self.recovery.in_progress)

    def make_edge(self, peer: str, generation: int) -> Edge:
        """Blocks until the member joins, on a store client of its own (see comm.store.connect)."""
        return Edge(connect(self.addr), COORD, peer, generation, self.cfg.runtime.comm_timeout_s)

    def start_pump(self, peer: str, edge: Edge) -> None:
        def deliver(msg: object, _tensor: object) -> bool:
            self.inbox.put((peer, msg))
            return False

        start_receiver(edge, peer, deliver, lambda event: self.inbox.put((peer, event)))

    def cancel(self, request: Cancel) -> None:
        """From any thread: end a request now (its client went away or matched a stop string)."""
        self.inbox.put((None, request))

    def send(self, member: str, msg: object) -> None:
        """To a member; a failure becomes that member's loss, handled by the serving loop."""
        try:
            self.edges[member].send(msg)
        except Exception as e:  # the member is gone
            self.inbox.put((member, EdgeBroken.of(member, e, self.edges[member].generation)))

    def next_message(self, timeout_s: float) -> tuple[str, object] | None:
        """The inbox's next (source, message), waiting up to ``timeout_s`` (0: not at all); None if none came."""
        try:
            return self.inbox.get(timeout=timeout_s) if timeout_s > 0 else self.inbox.get_nowait()
        except queue.Empty:
            return None

    def requeue(self, messages: list[tuple[str, object]]) -> None:
        """Messages a recovery set aside, back into the inbox (in order) for the serving loop."""
        for item in messages:
            self.inbox.put(item)

    def generation_of(self, name: str) -> int:
        return self.member_gen[name]

    def set_generation(self, name: str, generation: int) -> None:
        """From now on only news of ``generation`` counts as this member's loss (see is_loss)."""
        self.member_gen[name] = generation

    def install_edge(self, peer: str, edge: Edge) -> None:
        """The edge to ``peer`` from now on (a replacement's), replacing and closing the old one."""
        old = self.edges.get(peer)
        if old is not None:
            old.close()
        self.edges[peer] = edge
        self.start_pump(peer, edge)

    def host_leader_of(self, rank: int) -> int:
        """The first rank on ``rank``'s host: its supervisor keeps the host's standbys."""
        host = get_json(self.store, keys.supervisor(rank))["host"]
        ranks = [r for r in range(len({m.rank for m in self.layout.members}))
                 if get_json(self.store, keys.supervisor(r))["host"] == host]
        return min(ranks)

    # -- running -------------------------------------------------------------------------------
    def run(self, source: RequestSource, sink: OutputSink | None = None) -> int:
        """The whole run once workers are starting: serve what ``source`` hands out until it is
        exhausted, telling ``sink`` (default: the output file) of every token and record. Returns the
        exit code (0 when every accepted request has its output)."""
        self.journal = Journal(self.cfg.run_dir / "journal.jsonl", fingerprint(self.cfg.prompts, self.cfg.model),
                               requests=not self.cfg.serve.enabled)
        self.journal.start()
        # an online front-end detokenizes itself: no text in its records, no decoding on the loop
        tokenizer = None if self.cfg.serve.enabled else self.tokenizer
        self.ledger = Ledger(self.journal, sink or JsonlSink(self.cfg.output), tokenizer)
        for rec in self.rejected:
            self.ledger.answer(rec, journal=False)
        self.await_members()
        self.connect()
        self.driver = build_driver(self.cfg, self.layout, self.model_cfg.eos_token_ids, self.store, self.steps,
                                   self.send)
        gc.freeze()  # what setting up made lives on: the collector's full passes skip it from here on
        t_gen = time.monotonic()
        source.start(t_gen, lambda: self.inbox.put((None, Wake())))
        self._set_serving(True)
        code = 0
        try:
            self._serve(source, t_gen)
            self._stop()
        except (RuntimeError, TimeoutError) as e:
            self._set_serving(False)
            code = 3 if isinstance(e, PipelineLost) else 1
            cause = str(e).splitlines()[0][:300]
            _log.error("run ended: %s", cause)
            hint = "; rerun the same command with the same --run-dir to finish the rest" if code == 3 else ""
            self.journal.note("failed", cause=cause)
            self.ledger.abandon(source.poll(math.inf), t_gen, f"{cause}{hint}")
        self._finish(time.monotonic() - t_gen)
        # "ended": a rerun (or torchrun's restart) with this run directory finishes the rest
        self.refresh_workers_file({0: "done", 3: "ended"}.get(code, "failed"))
        self.close()
        return code

    def _set_serving(self, serving: bool) -> None:
        if serving != self.serving:
            self.serving = serving
            self.on_state_change()

    def close(self) -> None:
        """Stop the watchers and abort the edges so that their threads return before the process exits."""
        self._stop_watch.set()
        for edge in self.edges.values():
            edge.close()
        if self.journal is not None:
            self.journal.close()

    def _serve(self, source: RequestSource, t0: float) -> None:
        """Until the source is exhausted and nothing is in flight: admit arrivals, plan, take one
        message. Silence of every stage for --comm-timeout while work is in flight ends the run."""
        driver, limit = self.driver, self.cfg.runtime.comm_timeout_s
        bar = ProgressBar(source.expected(), self.cfg.runtime.progress, self.cfg.runtime.progress_interval_s)
        ledger = self.ledger
        self.loop_times = times = LoopTimes(self.cfg.serve.kept_history())
        quiet_since = time.monotonic()  # the last message, or the last moment with nothing in flight
        while True:
            now = time.monotonic()
            for seq in ledger.arrived(source.poll(now), t0):
                driver.add(seq)
            if self._cancels:  # after the poll: a request cancelled right after it came is known now
                self._cancel_now()
            driver.fill()
            if not driver.busy():
                if source.exhausted():
                    break
                quiet_since = now
            times.mark("plan")
            try:
                sender, msg = self.inbox.get(timeout=self._wait_s(source, now, quiet_since))
                times.mark("idle")
            except queue.Empty:
                times.mark("idle")
                if driver.busy() and time.monotonic() - quiet_since >= limit:
                    raise TimeoutError(f"no message from any stage for {limit:.0f}s") from None
                continue
            if isinstance(msg, Wake):
                continue
            if isinstance(msg, Cancel):
                self._cancels.append(msg)
                continue
            self._handle(sender, msg)
            quiet_since = time.monotonic()  # a recovery may have taken a while: count from its end
            bar.update(ledger.answered, ledger.tally.tokens, self.recovery.count)
            self._progress()
        bar.close(ledger.answered, ledger.tally.tokens)
        self._progress(force=True)

    def _handle(self, sender: str, msg: object) -> None:
        """One message from a member or a watcher: a loss, a late recovery answer, or the driver's."""
        if isinstance(msg, (EdgeBroken, MemberLost)):
            if self.is_loss(msg):  # else: news of a generation already replaced
                self._lost(msg)
            return
        if isinstance(msg, LATE_RECOVERY_MESSAGES):  # answers to a recovery that already moved on
            _log.debug("late %s from %s", type(msg).__name__, sender)
            return
        finished = self.driver.on_message(sender, msg)
        if isinstance(msg, StepResult):
            self.loop_times.end_step()
            self.recovery.on_tokens(msg.seq_ids)
            self.ledger.tokens(msg.seq_ids, len(msg.token_ids))
        self.ledger.finished(finished)

    def _cancel_now(self) -> None:
        """The cancellations that came: each request still served ends now (its client has its tokens),
        and a recovery that waited for its recomputation waits no longer."""
        ended = []
        for c in self._cancels:
            seq = self.ledger.by_id.get(c.request_id)
            if seq is not None and self.driver.abort(seq):
                self.ledger.cancelled(seq, c.reason)
                ended.append(seq.seq_id)
                _log.debug("request %s cancelled (%s)", c.request_id, c.reason)
        self._cancels.clear()
        self.recovery.log.gone(ended, self.recovery.generation)

    def _wait_s(self, source: RequestSource, now: float, quiet_since: float) -> float:
        """How long the loop may wait for a message: until the next known arrival, and while work is in
        flight no longer than until the stages count as silent."""
        limit = self.cfg.runtime.comm_timeout_s
        wait = quiet_since + limit - now if self.driver.busy() else limit
        arrival = source.next_arrival()
        if arrival is not None:
            wait = min(wait, arrival - now)
        return max(wait, 0.001)

    def write_progress(self) -> None:
        """Now: a recovery starts or ends."""
        self._progress(force=True)
        self.on_state_change()

    def _progress(self, force: bool = False) -> None:
        """RUN_DIR/progress.json, a few times a second: what fault scripts and dashboards watch."""
        now = time.monotonic()
        if not force and now - self._progress_t < 0.05:
            return
        self._progress_t = now
        done, tokens = (self.ledger.tally.served, self.ledger.tally.tokens) if self.ledger else (0, 0)
        doc = {"time": time.time(), "requests_done": done, "tokens": tokens, "step": self.steps.current,
               "recoveries": self.recovery.count, "recovering": self.recovery.in_progress}
        self.timeline.append([round(doc["time"], 3), tokens, done])
        tmp = self.cfg.run_dir / "progress.json.tmp"
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, self.cfg.run_dir / "progress.json")

    # -- failures ------------------------------------------------------------------------------
    def is_loss(self, msg: object) -> bool:
        """A failure of a member's current generation (older generations are already replaced)."""
        if isinstance(msg, MemberLost):
            return msg.generation == self.member_gen.get(msg.name, -1)
        return isinstance(msg, EdgeBroken) and msg.generation == self.member_gen.get(msg.peer, -1)

    @staticmethod
    def member_of(msg: EdgeBroken | MemberLost) -> str:
        return msg.peer if isinstance(msg, EdgeBroken) else msg.name

    def why(self, msg: EdgeBroken | MemberLost) -> str:
        if isinstance(msg, MemberLost):
            return msg.how
        time.sleep(0.05)  # give its supervisor a moment to report how it ended
        key = keys.exit_(msg.peer, self.member_gen[msg.peer])
        if has(self.store, key):
            return get_json(self.store, key)["how"]
        return f"lost its connection ({msg.error})"

    def _lost(self, msg: EdgeBroken | MemberLost) -> None:
        name, why = self.member_of(msg), self.why(msg)
        self.journal.note("member_lost", member=name, how=why)
        if self.layout.disaggregated and name in {m.name for m in self.layout.pipeline("prompt")} and not self.cfg.ft.enabled:
            self.driver.on_member_lost(name, why)  # prompt stages are optional: the token pipeline prefills
            return
        if not self.cfg.ft.enabled:
            raise PipelineLost(f"worker of {name} {why} (fault tolerance is off)")
        self.recovery.run({name}, f"{name} {why}")

    def _stop(self) -> None:
        """Stop travels down each live pipeline; wait for it to come back from the last stage."""
        for pipe in self.driver.live_pipelines():
            self.send(pipe[0].name, Stop())
            deadline = time.monotonic() + self.cfg.runtime.comm_timeout_s
            while True:
                source, msg = self.inbox.get(timeout=max(deadline - time.monotonic(), 0.001))
                if isinstance(msg, Stop) and source == pipe[-1].name:
                    break
                if self.is_loss(msg) and self.member_of(msg) in {m.name for m in pipe}:
                    _log.warning("%s ended before the stop marker came back: %s", self.member_of(msg), self.why(msg))
                    break

    # -- output --------------------------------------------------------------------------------
    def _finish(self, gen_s: float) -> None:
        self.ledger.sink.close()
        t = self.ledger.tally
        self.summary = RunSummary(
            requests=t.records,
            completed=t.records - t.failed,
            failed=t.failed,
            prompt_tokens=self.ledger.prompt_tokens,
            generated_tokens=self.ledger.generated_tokens,
            wall_s=time.monotonic() - self.t_start,
            generate_s=gen_s,
            stages=len(self.layout.members),
            ttft_s=latency_stats(t.ttft),
            tpot_s=latency_stats(t.tpot),
        )
        self.recovery.finish()
        stages, run_dir = run_files.stage_stats(self.store, self.layout), self.cfg.run_dir
        summary = {**self.summary.to_dict(), **self.driver.notes(), "recoveries": self.recovery.count,
                   "resumed_from_journal": t.resumed}
        run_files.write_summary(run_dir, summary, stages, self.loop_times.per_step_ms())
        run_files.write_timeline(run_dir, self.journal.attempts + 1, list(self.timeline), self.loop_times.step_ms())
        run_files.write_ft_stats(run_dir, self.cfg.ft, stages, self.recovery.records)
        _log.info("%s", self.summary.line())
