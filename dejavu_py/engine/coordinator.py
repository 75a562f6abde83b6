"""The coordinator owns requests and results: it loads the request file, admits requests as they
arrive, lets a driver (colocated or disaggregated) turn every message into the next plans, and
writes the output. It lives in rank 0's supervisor process and computes nothing.

Everything reaches it through one inbox: a receiver thread per edge (results, KV acknowledgements)
and a monitor thread that turns supervisors' exit reports into events. A pipeline that cannot go on
ends the run with a clear error for every unfinished request: nothing is silently lost.
"""
from __future__ import annotations

import heapq
import json
import os
import queue
import threading
import time
from dataclasses import dataclass

from .. import log
from ..comm.edge import Edge
from ..comm.store import get_json, has
from ..config import RunConfig
from ..errors import PipelineError, UserError
from ..runtime import workers_file
from ..runtime.layout import COORD, Layout
from ..runtime.supervisor import EXIT_COUNT_KEY, exit_key
from .block_manager import BlockManager
from .colocated import ColocatedDriver
from .disagg import DisaggDriver
from .output import Timings, error_record, request_error_record, success_record, write_outputs
from .plan import EdgeBroken, Stop
from .prefill_scheduler import PrefillScheduler
from .progress import ProgressBar, RunSummary
from .request import Request, RequestLimits, load_requests
from .scheduler import Scheduler
from .sequence import Sequence, Status
from .tokenizer import load_tokenizer

_log = log.get(__name__)
IDLE_TIMEOUT_S = 7 * 24 * 3600.0


@dataclass
class MemberExited:
    """A supervisor reported that a member's worker exited abnormally."""

    name: str
    how: str


class Coordinator:
    def __init__(self, cfg: RunConfig, layout: Layout, model_cfg, store) -> None:
        self.cfg, self.layout, self.model_cfg, self.store = cfg, layout, model_cfg, store
        self.t_start = time.monotonic()
        self.tokenizer = load_tokenizer(cfg.model)
        self.records: list[dict] = []
        self.summary: RunSummary | None = None
        self.edges: dict[str, Edge] = {}
        self.inbox: queue.Queue = queue.Queue()
        self._closing = False

    # -- setup ---------------------------------------------------------------------------------
    def load_requests(self) -> list[Request]:
        mc, cache = self.model_cfg, self.cfg.cache
        limits = RequestLimits(
            vocab_size=mc.vocab_size,
            max_model_len=cache.max_model_len or mc.max_position_embeddings,
            kv_capacity_tokens=cache.partition_blocks * cache.block_size,
            default_max_new_tokens=self.cfg.generation.max_new_tokens,
            run_seed=self.cfg.generation.seed,
        )
        requests, errors = load_requests(self.cfg.prompts, limits, self.tokenizer)
        for err in errors:
            _log.warning("%s", err)
            self.records.append(request_error_record(err))
        return requests

    def await_members(self) -> None:
        """Wait until every stage worker has loaded its weights; fail on the first error or death."""
        deadline = time.monotonic() + self.cfg.runtime.startup_timeout_s
        pending = {m.name for m in self.layout.members}
        while pending:
            for name in sorted(pending):
                if has(self.store, f"error/{name}"):
                    raise UserError(get_json(self.store, f"error/{name}"))
                if has(self.store, exit_key(name)):
                    raise PipelineError(f"worker of {name} {get_json(self.store, exit_key(name))['how']} while starting")
                if has(self.store, f"member/{name}") and get_json(self.store, f"member/{name}")["state"] == "ready":
                    pending.discard(name)
            if time.monotonic() > deadline:
                raise PipelineError(
                    f"workers {sorted(pending)} not ready after {self.cfg.runtime.startup_timeout_s:.0f}s "
                    "(raise --startup-timeout for big checkpoints)"
                )
            time.sleep(0.02)
        self._write_workers()
        _log.info("all %d stages ready after %.2fs", len(self.layout.members), time.monotonic() - self.t_start)

    def _write_workers(self, status: str = "running") -> None:
        workers_file.write(self.cfg.workers_file, workers_file.collect(self.store, self.layout), os.getpid(), status)

    def connect(self) -> None:
        """Edges to every member, in the layout's global order, each with a receiver thread."""
        for peer in self.layout.peers_of(COORD):
            self.edges[peer] = Edge(self.store, COORD, peer, 0, self.cfg.runtime.comm_timeout_s)
        for peer, edge in self.edges.items():
            threading.Thread(target=self._pump, args=(peer, edge), name=f"recv-{peer}", daemon=True).start()
        threading.Thread(target=self._watch_exits, name="exit-monitor", daemon=True).start()

    def _pump(self, peer: str, edge: Edge) -> None:
        while True:
            try:
                msg, _ = edge.recv(IDLE_TIMEOUT_S)
            except Exception as e:  # the member died or the link broke
                if not self._closing:
                    self.inbox.put((peer, EdgeBroken(peer, str(e).splitlines()[0][:300])))
                return
            self.inbox.put((peer, msg))

    def _watch_exits(self) -> None:
        seen: set[str] = set()
        count = 0
        while not self._closing:
            n = self.store.add(EXIT_COUNT_KEY, 0)
            if n != count:
                count = n
                for m in self.layout.members:
                    if m.name not in seen and has(self.store, exit_key(m.name)):
                        seen.add(m.name)
                        self.inbox.put(("supervisor", MemberExited(m.name, get_json(self.store, exit_key(m.name))["how"])))
            time.sleep(0.05)

    def send(self, member: str, msg: object) -> None:
        """To a member; a failure becomes that member's loss, handled by the serving loop."""
        try:
            self.edges[member].send(msg)
        except Exception as e:  # the member is gone
            self.inbox.put((member, EdgeBroken(member, str(e).splitlines()[0][:300])))

    # -- running -------------------------------------------------------------------------------
    def run(self, requests: list[Request]) -> int:
        """The whole run once workers are starting; returns the exit code (0 when every accepted
        request has its output)."""
        self.await_members()
        self.connect()
        driver = self._driver()
        t_gen = time.monotonic()
        seqs = [Sequence(i, r, t_arrival=t_gen + r.arrival_s) for i, r in enumerate(requests)]
        code = 0
        try:
            self._serve(driver, seqs)
            self._stop(driver)
        except (RuntimeError, TimeoutError) as e:
            code = 1
            cause = str(e).splitlines()[0][:300]
            _log.error("pipeline failed: %s", cause)
            for s in seqs:
                if s.status is not Status.FINISHED:
                    self.records.append(error_record(s.request.line, s.request.id, f"not finished: {cause}"))
        self._finish(seqs, time.monotonic() - t_gen, driver.notes())
        self.close()
        return code

    def close(self) -> None:
        """Abort the edges so that receiver threads blocked on them return before the process exits."""
        self._closing = True
        for edge in self.edges.values():
            edge.close()

    def _driver(self) -> ColocatedDriver | DisaggDriver:
        mc, gen, cache, sc = self.model_cfg, self.cfg.generation, self.cfg.cache, self.cfg.scheduler
        stop_ids = frozenset() if gen.ignore_eos else frozenset(mc.eos_token_ids)
        decode_pipe = self.layout.decode_pipeline
        mbs = self._microbatches(decode_pipe)
        if cache.swap:  # one partition per decode microbatch, in a block space larger than the device's
            blocks = BlockManager(mbs * cache.partition_blocks, cache.block_size, partitions=mbs)
        else:
            blocks = BlockManager(cache.num_blocks, cache.block_size)
        decode = Scheduler(sc, blocks, mbs, stop_ids)
        if not self.layout.disaggregated:
            return ColocatedDriver(decode, decode_pipe, self.send)
        prompt_pipe = self.layout.pipeline("prompt")
        prefill = PrefillScheduler(sc, BlockManager(cache.num_blocks, cache.block_size), blocks,
                                   self._microbatches(prompt_pipe), stop_ids)
        return DisaggDriver(prefill, decode, prompt_pipe, decode_pipe, self.send)

    def _microbatches(self, pipeline) -> int:
        """One microbatch per stage keeps every stage busy when each has its own processor. Stages
        sharing a GPU take turns on it anyway, and each extra microbatch would read their weights
        once more per step: there, one microbatch per distinct GPU."""
        if self.cfg.cache.swap and pipeline == self.layout.decode_pipeline:
            return self.cfg.swap_partitions
        if self.cfg.pipeline.microbatches:
            return self.cfg.pipeline.microbatches
        places = [get_json(self.store, f"member/{m.name}") for m in pipeline]
        if all(p["device"] == "cpu" for p in places):
            return len(places)
        return len({(p["host"], p["device"]) for p in places})

    def _serve(self, driver, seqs: list[Sequence]) -> None:
        arrivals = [(s.t_arrival, s.seq_id) for s in seqs]
        heapq.heapify(arrivals)
        bar = ProgressBar(len(seqs), self.cfg.runtime.progress)
        done = tokens = 0
        while arrivals or driver.busy():
            now = time.monotonic()
            while arrivals and arrivals[0][0] <= now:
                driver.add(seqs[heapq.heappop(arrivals)[1]])
            driver.fill()
            wait = arrivals[0][0] - now if arrivals else self.cfg.runtime.comm_timeout_s
            try:
                source, msg = self.inbox.get(timeout=max(wait, 0.001))
            except queue.Empty:
                if arrivals:
                    continue
                raise TimeoutError(f"no message from any stage for {self.cfg.runtime.comm_timeout_s:.0f}s") from None
            if isinstance(msg, (EdgeBroken, MemberExited)):
                driver.on_member_lost(msg.peer if isinstance(msg, EdgeBroken) else msg.name, self._why(msg))
                continue
            finished = driver.on_message(source, msg)
            tokens += len(getattr(msg, "token_ids", ()))
            for s in finished:
                self.records.append(self._success(s))
            done += len(finished)
            bar.update(done, tokens)
        bar.close(done, tokens)

    def _why(self, msg: EdgeBroken | MemberExited) -> str:
        if isinstance(msg, MemberExited):
            return msg.how
        time.sleep(0.2)  # give its supervisor a moment to report how it ended
        if has(self.store, exit_key(msg.peer)):
            return get_json(self.store, exit_key(msg.peer))["how"]
        return f"lost its connection ({msg.error})"

    def _stop(self, driver) -> None:
        """Stop travels down each live pipeline; wait for it to come back from the last stage."""
        for pipe in driver.live_pipelines():
            self.send(pipe[0].name, Stop())
            deadline = time.monotonic() + self.cfg.runtime.comm_timeout_s
            while True:
                source, msg = self.inbox.get(timeout=max(deadline - time.monotonic(), 0.001))
                if isinstance(msg, Stop) and source == pipe[-1].name:
                    break
                if isinstance(msg, (EdgeBroken, MemberExited)) and self._member_of(msg) in {m.name for m in pipe}:
                    _log.warning("%s ended before the stop marker came back: %s", self._member_of(msg), self._why(msg))
                    break

    @staticmethod
    def _member_of(msg: EdgeBroken | MemberExited) -> str:
        return msg.peer if isinstance(msg, EdgeBroken) else msg.name

    def _success(self, s: Sequence) -> dict:
        t0 = s.t_arrival
        timings = Timings(
            queued_s=max((s.t_admitted or t0) - t0, 0.0),
            first_token_s=max((s.t_first_token or t0) - t0, 0.0),
            total_s=max((s.t_finish or t0) - t0, 0.0),
        )
        extra = None
        if s.t_kv_ready is not None:
            extra = {
                "kv_bytes": s.kv_bytes,
                "kv_transfer_s": round(s.t_kv_ready - (s.t_admitted or t0), 6),
                "kv_after_prefill_s": round(max(s.t_kv_ready - (s.t_prefilled or t0), 0.0), 6),
            }
        return success_record(s.request, s.output_ids, s.finish_reason or "length", timings, self.tokenizer, extra)

    def _finish(self, seqs: list[Sequence], gen_s: float, notes: dict) -> None:
        write_outputs(self.cfg.output, self.records)
        failed = sum("error" in r for r in self.records)
        self.summary = RunSummary(
            requests=len(self.records),
            completed=len(self.records) - failed,
            failed=failed,
            prompt_tokens=sum(s.prompt_len for s in seqs),
            generated_tokens=sum(len(s.output_ids) for s in seqs),
            wall_s=time.monotonic() - self.t_start,
            generate_s=gen_s,
            stages=len(self.layout.members),
        )
        doc = {**self.summary.to_dict(), **notes}
        (self.cfg.run_dir / "summary.json").write_text(json.dumps(doc, indent=2) + "\n")
        _log.info("%s", self.summary.line())
