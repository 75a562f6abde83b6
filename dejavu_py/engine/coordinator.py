"""The coordinator owns requests and results: it loads the request file, runs the scheduler, feeds
plans to the first stage, takes sampled tokens from the last, and writes the output.

It lives in rank 0's supervisor process and computes nothing (the last stage samples). A broken
pipeline ends the run with a clear error for every unfinished request: nothing is silently lost.
"""
from __future__ import annotations

import json
import os
import time

from .. import log
from ..comm.edge import Edge
from ..comm.store import get_json, has
from ..config import RunConfig
from ..errors import PipelineError, UserError
from ..runtime import workers_file
from ..runtime.layout import COORD, Layout
from ..runtime.supervisor import exit_key
from .block_manager import BlockManager
from .output import Timings, error_record, request_error_record, success_record, write_outputs
from .plan import StepResult, Stop
from .progress import ProgressBar, RunSummary
from .request import Request, RequestLimits, load_requests
from .scheduler import Scheduler
from .sequence import Sequence, Status
from .tokenizer import load_tokenizer

_log = log.get(__name__)


class Coordinator:
    def __init__(self, cfg: RunConfig, layout: Layout, model_cfg, store) -> None:
        self.cfg, self.layout, self.model_cfg, self.store = cfg, layout, model_cfg, store
        self.t_start = time.monotonic()
        self.tokenizer = load_tokenizer(cfg.model)
        self.records: list[dict] = []
        self.summary: RunSummary | None = None

    # -- setup ---------------------------------------------------------------------------------
    def load_requests(self) -> list[Request]:
        mc, cache = self.model_cfg, self.cfg.cache
        limits = RequestLimits(
            vocab_size=mc.vocab_size,
            max_model_len=cache.max_model_len or mc.max_position_embeddings,
            kv_capacity_tokens=cache.num_blocks * cache.block_size,
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

    def connect(self) -> tuple[Edge, Edge]:
        timeout = self.cfg.runtime.comm_timeout_s
        out_edge = Edge(self.store, COORD, self.layout.first.name, 0, timeout)
        if self.layout.last.name == self.layout.first.name:
            return out_edge, out_edge
        return out_edge, Edge(self.store, COORD, self.layout.last.name, 0, timeout)

    # -- running -------------------------------------------------------------------------------
    def run(self, requests: list[Request]) -> int:
        """The whole run once workers are starting; returns the exit code (0 when the pipeline worked)."""
        self.await_members()
        out_edge, in_edge = self.connect()
        t_gen = time.monotonic()  # a request file arrives whole when the pipeline starts serving
        seqs = [Sequence(i, r, t_arrival=t_gen) for i, r in enumerate(requests)]
        code = 0
        try:
            self._generate(seqs, out_edge, in_edge)
            self._stop(out_edge, in_edge)
        except (RuntimeError, TimeoutError) as e:  # a neighbour died or hung: the pipeline is gone
            code = 1
            cause = self._failure_cause(e)
            _log.error("pipeline failed: %s", cause)
            for s in seqs:
                if s.status is not Status.FINISHED:
                    self.records.append(error_record(s.request.line, s.request.id, f"not finished: {cause}"))
        gen_s = time.monotonic() - t_gen
        self._finish(seqs, gen_s)
        return code

    def _generate(self, seqs: list[Sequence], out_edge: Edge, in_edge: Edge) -> None:
        mc, gen = self.model_cfg, self.cfg.generation
        stop_ids = frozenset() if gen.ignore_eos else frozenset(mc.eos_token_ids)
        microbatches = self.cfg.pipeline.microbatches or self._default_microbatches()
        blocks = BlockManager(self.cfg.cache.num_blocks, self.cfg.cache.block_size)
        sched = Scheduler(self.cfg.scheduler, blocks, microbatches, stop_ids)
        for s in seqs:
            sched.add(s)
        bar = ProgressBar(len(seqs), self.cfg.runtime.progress)
        done = tokens = 0
        self._fill(sched, out_edge)
        while sched.inflight:
            msg, _ = in_edge.recv()
            if not isinstance(msg, StepResult):
                raise RuntimeError(f"expected a step result from {self.layout.last.name}, got {type(msg).__name__}")
            finished = sched.on_result(msg)
            tokens += len(msg.token_ids)
            for s in finished:
                self.records.append(self._success(s))
            done += len(finished)
            bar.update(done, tokens)
            self._fill(sched, out_edge)
        bar.close(done, tokens)
        if sched.waiting:  # cannot happen: every accepted request fits an empty cache
            raise RuntimeError(f"{len(sched.waiting)} requests could not be scheduled")

    def _default_microbatches(self) -> int:
        """One microbatch per stage keeps every stage busy when each has its own processor. Stages
        sharing a GPU take turns on it anyway, and each extra microbatch would read all their weights
        once more per step: there, one microbatch per distinct GPU."""
        places = [get_json(self.store, f"member/{m.name}") for m in self.layout.members]
        if all(p["device"] == "cpu" for p in places):
            return len(places)
        return len({(p["host"], p["device"]) for p in places})

    @staticmethod
    def _fill(sched: Scheduler, out_edge: Edge) -> None:
        for mb in sched.idle_slots():
            plan = sched.schedule(mb)
            if plan is not None:
                out_edge.send(plan)

    def _stop(self, out_edge: Edge, in_edge: Edge) -> None:
        out_edge.send(Stop())
        msg, _ = in_edge.recv()
        if not isinstance(msg, Stop):
            raise RuntimeError(f"expected the stop marker back, got {type(msg).__name__}")

    def _failure_cause(self, err: Exception) -> str:
        time.sleep(0.2)  # let supervisors report the exit that broke the pipeline
        for m in self.layout.members:
            if has(self.store, exit_key(m.name)):
                return f"worker of stage {m.stage.index} ({m.name}) {get_json(self.store, exit_key(m.name))['how']}"
        return f"pipeline communication failed: {str(err).splitlines()[0][:200]}"

    def _success(self, s: Sequence) -> dict:
        t0 = s.t_arrival
        timings = Timings(
            queued_s=(s.t_admitted or t0) - t0,
            first_token_s=(s.t_first_token or t0) - t0,
            total_s=(s.t_finish or t0) - t0,
        )
        return success_record(s.request, s.output_ids, s.finish_reason or "length", timings, self.tokenizer)

    def _finish(self, seqs: list[Sequence], gen_s: float) -> None:
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
        (self.cfg.run_dir / "summary.json").write_text(json.dumps(self.summary.to_dict(), indent=2) + "\n")
        _log.info("%s", self.summary.line())
