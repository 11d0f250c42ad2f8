"""Prometheus metrics of one server, in its own registry (several servers may share a process in tests)."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    start_http_server,
)

RECENT_WINDOW = 1000  # answers kept per task for GetTaskStats (the console's "recent requests")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        for standard in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):  # process_*, python_* as usual
            r.register(standard)
        try:
            release = version("raee-serve")
        except PackageNotFoundError:  # a source checkout that was never installed
            release = "unknown"
        self.build = Info("raee_build", "the running release", registry=r)
        self.build.info({"version": release})
        self.requests = Counter("raee_requests", "RPCs answered, by method, task and status code",
                                ["method", "task", "code"], registry=r)
        self.latency = Histogram("raee_request_duration_seconds", "RPC latency", ["method"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.stage = Histogram("raee_stage_seconds", "time per stage of a dynamic batch", ["stage"],
                               buckets=LATENCY_BUCKETS, registry=r)
        self.exit_layer: Histogram | None = None  # made by fit_depth once the backbone is loaded
        self.queue_depth = Gauge("raee_queue_depth", "jobs waiting for the model worker", registry=r)
        self.batch_size = Histogram("raee_batch_texts", "texts per dynamic batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.classified = Counter("raee_classified_texts", "texts the model worker computed", registry=r)
        self.ingested = Counter("raee_ingested_records", "exit records added online", ["task"], registry=r)
        self.answers = Counter("raee_answers", "texts answered, by task and by what answered (key, retrieval or "
                               "backbone)", ["task", "answered_by"], registry=r)
        self.coverage = Counter("raee_coverage_checks", "inputs checked against the task's records' coverage, by "
                                "task and outcome (inside, outside): a rising outside share is traffic drift",
                                ["task", "coverage"], registry=r)
        self.traffic_prior = Gauge("raee_traffic_prior", "estimated share of each label in a task's traffic "
                                   "(tasks with adapt_prior, once the estimate is active)", ["task", "label"],
                                   registry=r)
        self.traffic_prior_updated = Gauge("raee_traffic_prior_updated_timestamp_seconds",
                                           "when a task's traffic-prior estimate was last re-estimated", ["task"],
                                           registry=r)
        self._prior_labels: dict[str, list[str]] = {}  # task -> the labels its gauges carry
        self._prior_updated: dict[str, float] = {}  # task -> the estimate its gauges show

    def set_traffic_prior(self, task: str, labels: list[str], shares: list[float], updated: float) -> None:
        """Called after every answer of an adapting task; sets the gauges only when the estimate
        was re-estimated since (every 25 answers, not every request)."""
        if self._prior_updated.get(task) == updated:
            return
        for label, share in zip(labels, shares):
            self.traffic_prior.labels(task, label).set(share)
        self.traffic_prior_updated.labels(task).set(updated)
        self._prior_labels[task], self._prior_updated[task] = labels, updated

    def forget_task(self, task: str) -> None:
        """Drop a deleted task's gauges and counters (a new task of that name starts with none)."""
        counted = ((self.answers, ("key", "retrieval", "backbone")), (self.coverage, ("inside", "outside")))
        for counter, values in counted:
            for value in values:
                try:
                    counter.remove(task, value)
                except KeyError:  # never counted
                    pass
        labels = self._prior_labels.pop(task, None)
        self._prior_updated.pop(task, None)
        if labels is None:
            return
        for label in labels:
            self.traffic_prior.remove(task, label)
        self.traffic_prior_updated.remove(task)

    def fit_depth(self, depth: int) -> None:
        """The exit-layer histogram, one bucket per exit 0..depth of the loaded backbone (no empty
        buckets past it); made once, when the model is loaded."""
        if self.exit_layer is None:
            self.exit_layer = Histogram("raee_exit_layer", "exit layer chosen per classified text", ["task"],
                                        buckets=tuple(float(i) for i in range(depth + 1)), registry=self.registry)

    def answered(self, task: str, answered_by: str, covered: bool | None) -> None:
        self.answers.labels(task, answered_by).inc()
        if covered is not None:
            self.coverage.labels(task, "inside" if covered else "outside").inc()

    def serve(self, port: int, address: str = "127.0.0.1") -> int:
        """Expose /metrics over HTTP on a separate port; returns the bound port."""
        server, _thread = start_http_server(port, addr=address, registry=self.registry)
        return int(server.server_address[1])


@dataclass(frozen=True)
class RecentStats:
    answers: int
    exit_layer_counts: list[int]  # index = exit layer, 0..depth
    latency_ms: tuple[float, float, float]  # p50, p90, p99
    since: str  # RFC 3339 time of the oldest answer kept; "" when none
    key_answers: int = 0  # answered by the key head
    coverage_checked: int = 0  # inputs checked against the records' coverage
    outside_coverage: int = 0  # of those, the inputs outside it


class RecentAnswers:
    """The last `window` answers per task (exit layer, total time): what an operator sees of "now",
    which Prometheus' since-start histograms cannot show. Bounded per task; a deleted task's are dropped."""

    def __init__(self, window: int = RECENT_WINDOW) -> None:
        self.window = window
        # per answer: (time, exit layer, total ms, by the key head, coverage: True / False / None unchecked)
        self._answers: dict[str, deque[tuple[float, int, float, bool, bool | None]]] = {}
        self._lock = threading.Lock()

    def add(self, task: str, exit_layer: int, total_ms: float, answered_by: str = "backbone",
            covered: bool | None = None) -> None:
        with self._lock:
            kept = self._answers.setdefault(task, deque(maxlen=self.window))
            kept.append((time.time(), exit_layer, total_ms, answered_by == "key", covered))

    def forget(self, task: str) -> None:
        with self._lock:
            self._answers.pop(task, None)

    def stats(self, task: str, depth: int) -> RecentStats:
        with self._lock:
            kept = list(self._answers.get(task, ()))
        counts = [0] * (depth + 1)
        for _, layer, *_ in kept:
            counts[min(layer, depth)] += 1
        if not kept:
            return RecentStats(0, counts, (0.0, 0.0, 0.0), "")
        latencies = sorted(ms for _, _, ms, *_ in kept)

        def percentile(q: float) -> float:  # nearest rank: a figure some request really took
            return latencies[min(len(latencies) - 1, max(0, int(q * len(latencies) + 0.999999) - 1))]

        since = datetime.fromtimestamp(kept[0][0], UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        return RecentStats(len(kept), counts, (percentile(0.5), percentile(0.9), percentile(0.99)), since,
                           sum(k[3] for k in kept), sum(k[4] is not None for k in kept),
                           sum(k[4] is False for k in kept))
