"""The engine's state as Prometheus metrics: what the coordinator last said in EngineState, mirrored.

Load (``dejavu:num_requests_running``, ``dejavu:num_requests_waiting``, ``dejavu:kv_cache_usage_perc``)
and health (``dejavu:engine_serving``, ``dejavu:engine_recovering``) come from EngineState's fields.
Fault tolerance comes from ``EngineState.counters``, which the coordinator fills with these keys (any
may be absent; unknown keys are ignored):

``"recoveries_total"``: ``{(cause, kind): count}``
    Recoveries since the start by what caused them (e.g. "worker_died") and how they were done
    (e.g. "standby", "respawn"). -> counter ``dejavu:recoveries_total{cause,kind}``.
``"recovery_seconds"``: ``[seconds, ...]``
    The duration of every recovery so far, oldest first (the list only grows). -> histogram
    ``dejavu:recovery_seconds`` (each new entry observed once) and gauge ``dejavu:recovery_seconds_last``.
``"recovery_phase_seconds"``: ``{phase: seconds}``
    The last recovery's seconds per phase (detect, spawn, load, restore, replay, ...). -> gauge
    ``dejavu:recovery_phase_seconds{phase}``.
``"tokens_recomputed_total"``: ``int``
    Tokens computed again because a failure lost them. -> counter ``dejavu:tokens_recomputed_total``.
``"replica_lag_steps"``: ``int``
    How many steps the furthest-behind KV replica trails its stage. -> gauge ``dejavu:replica_lag_steps``.
``"checkpoint_bytes"``: ``int``
    Bytes held now in KV replicas and token-state checkpoints. -> gauge ``dejavu:checkpoint_bytes``.
``"workers"``: ``{state: count}``
    Worker processes by state (e.g. "running", "recovering", "failed"). -> gauge ``dejavu:workers{state}``.
``"standbys_ready"``: ``int``
    Warm standby processes ready to take over a stage. -> gauge ``dejavu:standbys_ready``.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dejavu_py import log
from dejavu_py.protocol.serving import EngineState

_log = log.get(__name__)

COUNTER_KEYS = ("recoveries_total", "recovery_seconds", "recovery_phase_seconds", "tokens_recomputed_total",
                "replica_lag_steps", "checkpoint_bytes", "workers", "standbys_ready")
"""The keys of EngineState.counters read here (the module docstring says what each holds)."""

RECOVERY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def _num(value: Any) -> float:
    """A number from the coordinator, or 0 for anything else (a bad value must not break /metrics)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return 0.0
    return float(value)


def _mapping(value: Any) -> dict[Any, Any]:
    return value if isinstance(value, dict) else {}


class EngineStateCollector(Collector):
    """Exposes the latest EngineState at each scrape; ``update`` takes a new one."""

    def __init__(self, model_name: str, registry: CollectorRegistry) -> None:
        self.model_name = model_name
        self.state = EngineState(serving=False)
        self._seen_recoveries = 0
        self.recovery_hist = Histogram("dejavu:recovery_seconds", "Seconds each recovery took, from the failure to "
                                       "serving again", ["model_name"], buckets=RECOVERY_BUCKETS,
                                       registry=registry).labels(model_name)
        registry.register(self)

    def update(self, state: EngineState) -> None:
        self.state = state
        durations = state.counters.get("recovery_seconds")
        if not isinstance(durations, (list, tuple)):
            return
        if len(durations) < self._seen_recoveries:  # a new coordinator counts from zero
            self._seen_recoveries = 0
        for seconds in durations[self._seen_recoveries :]:
            self.recovery_hist.observe(_num(seconds))
        self._seen_recoveries = len(durations)

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        g = GaugeMetricFamily(name, doc, labels=["model_name"])
        g.add_metric([self.model_name], value)
        return g

    def _labelled(self, family: GaugeMetricFamily | CounterMetricFamily, items: dict[Any, Any], arity: int) -> Metric:
        for key, value in items.items():
            labels = list(key) if isinstance(key, tuple) else [key]
            if len(labels) == arity:
                family.add_metric([self.model_name, *map(str, labels)], _num(value))
        return family

    def collect(self) -> Iterator[Metric]:
        s, c = self.state, self.state.counters
        yield self._gauge("dejavu:num_requests_running", "Requests in a running batch", _num(s.running))
        yield self._gauge("dejavu:num_requests_waiting", "Requests waiting to be admitted", _num(s.waiting))
        yield self._gauge("dejavu:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full)", _num(s.kv_usage))
        yield self._gauge("dejavu:engine_serving", "1 while a pipeline can serve", 1.0 if s.serving else 0.0)
        yield self._gauge("dejavu:engine_recovering", "1 while a recovery is in progress", 1.0 if s.recovering else 0.0)
        yield self._labelled(CounterMetricFamily("dejavu:recoveries", "Recoveries by cause and kind",
                                                 labels=["model_name", "cause", "kind"]),
                             _mapping(c.get("recoveries_total")), 2)
        durations = c.get("recovery_seconds")
        last = _num(durations[-1]) if isinstance(durations, (list, tuple)) and durations else 0.0
        yield self._gauge("dejavu:recovery_seconds_last", "Seconds the last recovery took", last)
        yield self._labelled(GaugeMetricFamily("dejavu:recovery_phase_seconds", "Seconds of each phase of the last "
                                               "recovery", labels=["model_name", "phase"]),
                             _mapping(c.get("recovery_phase_seconds")), 1)
        recomputed = CounterMetricFamily("dejavu:tokens_recomputed", "Tokens computed again after a failure",
                                         labels=["model_name"])
        recomputed.add_metric([self.model_name], _num(c.get("tokens_recomputed_total")))
        yield recomputed
        yield self._gauge("dejavu:replica_lag_steps", "Steps the furthest-behind KV replica trails its stage",
                          _num(c.get("replica_lag_steps")))
        yield self._gauge("dejavu:checkpoint_bytes", "Bytes held in KV replicas and token-state checkpoints",
                          _num(c.get("checkpoint_bytes")))
        yield self._labelled(GaugeMetricFamily("dejavu:workers", "Worker processes by state",
                                               labels=["model_name", "state"]), _mapping(c.get("workers")), 1)
        yield self._gauge("dejavu:standbys_ready", "Warm standby processes ready to take over a stage",
                          _num(c.get("standbys_ready")))
