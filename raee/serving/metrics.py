"""Prometheus metrics of one server, in its own registry (several servers may share a process in tests)."""

from __future__ import annotations

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

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self, depth_buckets: int = 64) -> None:
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
        self.exit_layer = Histogram("raee_exit_layer", "exit layer chosen per classified text", ["task"],
                                    buckets=tuple(float(i) for i in range(depth_buckets + 1)), registry=r)
        self.queue_depth = Gauge("raee_queue_depth", "jobs waiting for the model worker", registry=r)
        self.batch_size = Histogram("raee_batch_texts", "texts per dynamic batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.classified = Counter("raee_classified_texts", "texts the model worker computed", registry=r)
        self.ingested = Counter("raee_ingested_records", "exit records added online", ["task"], registry=r)

    def serve(self, port: int, address: str = "127.0.0.1") -> int:
        """Expose /metrics over HTTP on a separate port; returns the bound port."""
        server, _thread = start_http_server(port, addr=address, registry=self.registry)
        return int(server.server_address[1])
