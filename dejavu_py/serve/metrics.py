"""This process's Prometheus metrics, served by GET /metrics: per-request figures measured here (named
as vLLM names them, with a ``dejavu:`` prefix, so that its dashboards read them) and the engine's state
mirrored from the coordinator (serve/engine_metrics.py).

Latencies are what a client sees: time to first token and end-to-end latency count from the HTTP
request's arrival; inter-token latency counts between the coordinator's token messages (Tokens.time);
queue time is the coordinator's (the record's ``timings.queued_s``).
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from dejavu_py.protocol.serving import EngineState
from dejavu_py.serve.engine_metrics import EngineStateCollector

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)


class ServeMetrics:
    """The registry of this process and the observations the request handlers make."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=self.registry)
        reg, name = self.registry, [model_name]
        labels = ["model_name"]
        self.prompt_tokens = Counter("dejavu:prompt_tokens", "Prompt tokens of requests that began generating",
                                     labels, registry=reg).labels(*name)
        self.generation_tokens = Counter("dejavu:generation_tokens", "Output tokens delivered to clients",
                                         labels, registry=reg).labels(*name)
        self._success = Counter("dejavu:request_success", "Requests that finished, by finish reason",
                                ["model_name", "finished_reason"], registry=reg)
        self._model = model_name
        self.ttft = Histogram("dejavu:time_to_first_token_seconds", "From the HTTP request to its first token",
                              labels, buckets=TTFT_BUCKETS, registry=reg).labels(*name)
        self.itl = Histogram("dejavu:inter_token_latency_seconds", "Between two token messages of a request",
                             labels, buckets=ITL_BUCKETS, registry=reg).labels(*name)
        self.tpot = Histogram("dejavu:time_per_output_token_seconds", "Per request: (last token - first token) / "
                              "(output tokens - 1)", labels, buckets=ITL_BUCKETS, registry=reg).labels(*name)
        self.e2e = Histogram("dejavu:e2e_request_latency_seconds", "From the HTTP request to its last token",
                             labels, buckets=REQUEST_BUCKETS, registry=reg).labels(*name)
        self.queue = Histogram("dejavu:request_queue_time_seconds", "Waiting in the coordinator before its prefill",
                               labels, buckets=REQUEST_BUCKETS, registry=reg).labels(*name)
        self.engine = EngineStateCollector(model_name, reg)

    def on_engine_state(self, state: EngineState) -> None:
        self.engine.update(state)

    def first_token(self, prompt_tokens: int, seconds: float) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.ttft.observe(max(seconds, 0.0))

    def tokens(self, count: int, since_previous: float | None) -> None:
        self.generation_tokens.inc(count)
        if since_previous is not None:
            self.itl.observe(max(since_previous, 0.0))

    def finished(self, reason: str, output_tokens: int, e2e_s: float, decode_s: float | None,
                 queued_s: float | None) -> None:
        """A request ended with ``reason`` ("stop", "length"); ``decode_s`` from first to last token."""
        self._success.labels(self._model, reason).inc()
        self.e2e.observe(max(e2e_s, 0.0))
        if decode_s is not None and output_tokens > 1:
            self.tpot.observe(max(decode_s, 0.0) / (output_tokens - 1))
        if queued_s is not None:
            self.queue.observe(max(queued_s, 0.0))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
