"""gRPC and HTTP/JSON side by side against one running server: the cost of the JSON transport.

Sequential requests alternate between the two transports text by text (so both see the same
machine state), then each transport carries `clients` concurrent clients for `seconds`. Each
answer's own `timings.total_us` (time inside the server) is kept beside the client's wall time, so
the report separates what the transport costs from what the model costs. Loopback only.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import grpc
import numpy as np

from raee_server.bench import reports
from raee_server.bench.soak import _check_local
from raee_server.protos.raee.v1 import raee_pb2 as pb
from raee_server.protos.raee.v1 import raee_pb2_grpc as pb_grpc
from raee_server.types import METADATA_KEY

TRANSPORTS = ("grpc", "http")


class HttpClient:
    """One keep-alive HTTP/1.1 connection, as a service calling the JSON API would hold one."""

    def __init__(self, address: str, api_key: str | None) -> None:
        host, _, port = address.rpartition(":")
        self.connection = http.client.HTTPConnection(host, int(port), timeout=60)
        self.headers = {"Content-Type": "application/json", **({METADATA_KEY: api_key} if api_key else {})}

    def classify(self, task: str, text: str, policy: str) -> float:
        """The server's own time for the answer, in ms."""
        body = json.dumps({"text": text, "options": {"policy": policy}})
        self.connection.request("POST", f"/v1/tasks/{quote(task, safe='')}:classify", body=body, headers=self.headers)
        response = self.connection.getresponse()
        answer = json.loads(response.read())
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {answer.get('message')}")
        return int(answer["timings"]["totalUs"]) / 1e3

    def close(self) -> None:
        self.connection.close()


class GrpcClient:
    def __init__(self, address: str, api_key: str | None) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.RaeeServiceStub(self.channel)
        self.metadata = [(METADATA_KEY, api_key)] if api_key else []

    def classify(self, task: str, text: str, policy: str) -> float:
        reply = self.stub.Classify(pb.ClassifyRequest(task=task, text=text, options=pb.ClassifyOptions(policy=policy)),
                                   timeout=60, metadata=self.metadata)
        return reply.timings.total_us / 1e3

    def close(self) -> None:
        self.channel.close()


def _percentiles(values: Sequence[float]) -> dict[str, float]:
    a = np.array(values or [float("nan")])
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)), "p99": float(np.percentile(a, 99))}


def compare(grpc_address: str, http_address: str, task: str, texts: Sequence[str], policy: str = "paper",
            sequential: int = 200, clients: int = 16, seconds: float = 20.0, api_key: str | None = None,
            progress: Callable[[str], None] = print) -> dict[str, Any]:
    _check_local(grpc_address)
    _check_local(http_address)
    factories: dict[str, Callable[[], GrpcClient | HttpClient]] = {
        "grpc": lambda: GrpcClient(grpc_address, api_key), "http": lambda: HttpClient(http_address, api_key)}
    clients_now = {name: make() for name, make in factories.items()}
    for client in clients_now.values():  # connect and warm up
        for text in texts[:5]:
            client.classify(task, text, policy)
    wall: dict[str, list[float]] = {t: [] for t in TRANSPORTS}
    inside: dict[str, list[float]] = {t: [] for t in TRANSPORTS}
    progress(f"sequential: {sequential} requests per transport, alternating")
    for i in range(sequential):
        order = TRANSPORTS if i % 2 == 0 else TRANSPORTS[::-1]
        for name in order:
            t0 = time.perf_counter()
            inside[name].append(clients_now[name].classify(task, texts[i % len(texts)], policy))
            wall[name].append((time.perf_counter() - t0) * 1e3)
    for client in clients_now.values():
        client.close()
    report: dict[str, Any] = {"task": task, "policy": policy, "sequential_requests": sequential, "clients": clients,
                              "seconds": seconds, "transports": {}}
    for name in TRANSPORTS:
        progress(f"{clients} concurrent clients over {name} for {seconds:.0f} s")
        load = _load(factories[name], task, texts, policy, clients, seconds)
        report["transports"][name] = {
            "sequential_ms": _percentiles(wall[name]), "sequential_in_server_ms": _percentiles(inside[name]),
            "sequential_transport_ms": _percentiles([w - s for w, s in zip(wall[name], inside[name])]), **load}
    return report


def _load(make: Callable[[], GrpcClient | HttpClient], task: str, texts: Sequence[str], policy: str, clients: int,
          seconds: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def run(i: int) -> None:
        nonlocal errors
        client, n = make(), 0
        try:
            while time.monotonic() < stop_at:
                t0 = time.perf_counter()
                try:
                    client.classify(task, texts[(i + n * clients) % len(texts)], policy)
                    with lock:
                        latencies.append((time.perf_counter() - t0) * 1e3)
                except Exception:
                    with lock:
                        errors += 1
                n += 1
        finally:
            client.close()

    start = time.monotonic()
    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 120)
    elapsed = time.monotonic() - start
    return {"concurrent_ms": _percentiles(latencies), "throughput_rps": len(latencies) / elapsed, "errors": errors}


def write(report: dict[str, Any], out: Path, command: str) -> list[Path]:
    """JSON, a markdown table and a plot of the two transports."""
    t = report["transports"]
    rows = [
        ("sequential p50 (client wall time)", "sequential_ms", "p50"),
        ("sequential p95", "sequential_ms", "p95"),
        ("sequential p50 inside the server (timings.total_us)", "sequential_in_server_ms", "p50"),
        ("sequential p50 transport (wall - inside)", "sequential_transport_ms", "p50"),
        (f"{report['clients']} clients p50", "concurrent_ms", "p50"),
        (f"{report['clients']} clients p99", "concurrent_ms", "p99"),
    ]
    lines = ["| ms | gRPC | HTTP/JSON | HTTP / gRPC |", "|---|---|---|---|"]
    for title, key, q in rows:
        g, h = t["grpc"][key][q], t["http"][key][q]
        lines.append(f"| {title} | {g:.2f} | {h:.2f} | {h / g:.2f}x |")
    g_rps, h_rps = t["grpc"]["throughput_rps"], t["http"]["throughput_rps"]
    lines.append(f"| {report['clients']} clients throughput (requests/s) | {g_rps:.1f} | {h_rps:.1f} | "
                 f"{h_rps / g_rps:.2f}x |")
    lines.append(f"| errors | {t['grpc']['errors']} | {t['http']['errors']} | |")
    written = reports.save(out, "transports", report, command, "gRPC and HTTP/JSON Classify, side by side "
                           f"({report['task']}, policy `{report['policy']}`)", lines)
    fig, axes = reports.pyplot().subplots(1, 2, figsize=(10, 4))
    names = ["gRPC", "HTTP/JSON"]
    for ax, key, title in ((axes[0], "sequential_ms", "sequential"), (axes[1], "concurrent_ms",
                                                                        f"{report['clients']} concurrent clients")):
        width = 0.35
        for j, q in enumerate(("p50", "p95")):
            ax.bar([i + j * width for i in range(2)], [t[n][key][q] for n in TRANSPORTS], width, label=q)
        ax.set_xticks([i + width / 2 for i in range(2)], names)
        ax.set_ylabel("ms per Classify (client wall time)")
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"Classify over gRPC and HTTP/JSON, same server, same run ({report['task']}, {report['policy']})")
    return [*written, reports.save_figure(fig, out / "transports.png")]
