"""``/metrics``: the gateway's and the engine's figures in Prometheus text format.

Request counters and latency are observed per request in plain dicts (about a microsecond)
and turned into Prometheus families only when scraped. Fleet figures (queue depth, slots,
states, wakes, pauses, resume durations) are read from the engine only when Prometheus
scrapes, by a custom collector, so they cost nothing on the request path. Each gateway has
its own registry, so several gateways in one test process do not collide.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from gpuctl.engine.api import EngineMetrics, GpuState

__all__ = ["CONTENT_TYPE", "GatewayMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class _EngineCollector(Collector):
    """Reads ``Engine.metrics()`` when Prometheus scrapes; nothing on the request path."""

    def __init__(self, engine: Callable[[], Any]) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        engine = self._engine()
        if engine is None:
            return
        figures: EngineMetrics = engine.metrics()
        yield GaugeMetricFamily("gpuctl_queue_depth", "Requests waiting for a slot or a wake",
                                value=figures.queue_depth)
        slots = GaugeMetricFamily("gpuctl_gpu_slots_in_use", "Slots in use per GPU",
                                  labels=["gpu"])
        total = GaugeMetricFamily("gpuctl_gpu_slots", "Slots per GPU", labels=["gpu"])
        queued = GaugeMetricFamily("gpuctl_gpu_queued", "Requests queued for a model this GPU "
                                   "has", labels=["gpu"])
        leases = GaugeMetricFamily("gpuctl_gpu_leases", "Users holding a lease on the GPU",
                                   labels=["gpu"])
        states = GaugeMetricFamily("gpuctl_gpu_state", "1 for the state each GPU is in",
                                   labels=["gpu", "state"])
        for gpu in figures.gpus:
            slots.add_metric([gpu.name], gpu.slots_in_use)
            total.add_metric([gpu.name], gpu.slots)
            queued.add_metric([gpu.name], gpu.queued)
            leases.add_metric([gpu.name], gpu.leases)
            for state in GpuState:
                states.add_metric([gpu.name, state.value], 1.0 if gpu.state == state else 0.0)
        yield from (slots, total, queued, leases, states)
        yield CounterMetricFamily("gpuctl_wakes", "GPU resumes sent to the cloud",
                                  value=figures.wakes)
        yield CounterMetricFamily("gpuctl_wake_failures", "GPU resumes that failed",
                                  value=figures.wake_failures)
        yield CounterMetricFamily("gpuctl_pauses", "GPU pauses sent to the cloud",
                                  value=figures.pauses)
        yield CounterMetricFamily("gpuctl_engine_requests_granted", "Slots granted",
                                  value=figures.requests_granted)
        yield CounterMetricFamily("gpuctl_engine_requests_rejected",
                                  "Requests refused: queue full or wait limit passed",
                                  value=figures.requests_rejected)
        durations = figures.resume_durations
        resume = GaugeMetricFamily("gpuctl_resume_seconds",
                                   "Recent resume durations (resume to Ollama ready)",
                                   labels=["stat"])
        resume.add_metric(["count"], len(durations))
        resume.add_metric(["sum"], sum(durations))
        resume.add_metric(["max"], max(durations, default=0.0))
        # ``resume_durations`` is oldest first: the last resume is the list's end.
        resume.add_metric(["last"], durations[-1] if durations else 0.0)
        yield resume


class _CostCollector(Collector):
    """The ledger's counters (``Engine.cost_metrics``), read when Prometheus scrapes."""

    def __init__(self, engine: Callable[[], Any]) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        engine = self._engine()
        cost = getattr(engine, "cost_metrics", None)
        if cost is None:
            return
        totals = cost()
        billed = CounterMetricFamily("gpuctl_gpu_billed_seconds",
                                     "Seconds each GPU was not paused", labels=["gpu"])
        for gpu, seconds in sorted(totals.billed.items()):
            billed.add_metric([gpu], seconds)
        users = CounterMetricFamily("gpuctl_user_gpu_seconds",
                                    "GPU-seconds attributed to each user, by kind "
                                    "(serving, waking, held)", labels=["user", "kind"])
        for (user, kind), seconds in sorted(totals.users.items()):
            users.add_metric([user, kind], seconds)
        lost = CounterMetricFamily("gpuctl_unattributed_seconds",
                                   "Billed GPU-seconds no user caused, by reason",
                                   labels=["reason"])
        for reason, seconds in sorted(totals.unattributed.items()):
            lost.add_metric([reason], seconds)
        yield from (billed, users, lost)


class _RequestCollector(Collector):
    def __init__(self, metrics: GatewayMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        counts = CounterMetricFamily("gpuctl_requests", "Requests answered, by route and status",
                                     labels=["route", "status"])
        for (route, status), count in sorted(self._metrics.counts.items()):
            counts.add_metric([route, str(status)], count)
        yield counts
        latency = HistogramMetricFamily(
            "gpuctl_request_seconds", "Time from request to the end of the response, by route",
            labels=["route"])
        for route, (buckets, total) in sorted(self._metrics.latency.items()):
            cumulative, running = [], 0
            for bound, count in zip((*_BUCKETS, float("inf")), buckets, strict=True):
                running += count
                cumulative.append((_bucket_label(bound), float(running)))
            latency.add_metric([route], cumulative, sum_value=total)
        yield latency


def _bucket_label(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


class GatewayMetrics:
    """Counters the gateway updates per request, plus the engine's figures at scrape time.

    Per request this is a dict update and a ``bisect`` (about a microsecond); the
    prometheus-client objects are built only when ``/metrics`` is scraped (its own
    ``Counter``/``Histogram`` take a lock per update, which a request path can spare).
    """

    def __init__(self, engine: Callable[[], Any]) -> None:
        self.counts: dict[tuple[str, int], int] = {}
        self.latency: dict[str, tuple[list[int], float]] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_RequestCollector(self))
        self.registry.register(_EngineCollector(engine))
        self.registry.register(_CostCollector(engine))

    def observe(self, route: str, status: int, seconds: float) -> None:
        key = (route, status)
        self.counts[key] = self.counts.get(key, 0) + 1
        entry = self.latency.get(route)
        if entry is None:
            entry = self.latency[route] = ([0] * (len(_BUCKETS) + 1), 0.0)
        entry[0][bisect.bisect_left(_BUCKETS, seconds)] += 1
        self.latency[route] = (entry[0], entry[1] + seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
