"""A bounded soak test against a running server: many concurrent clients for a fixed time.

Reports the load held, answers by status code, latency percentiles and (given the
server's pid) its resident memory after warm-up and at the end. Localhost only:
it refuses any other address.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np

from raee_server.client import CHANNEL_OPTIONS
from raee_server.errors import InvalidInput
from raee_server.protos.raee.v1 import raee_pb2 as pb
from raee_server.protos.raee.v1 import raee_pb2_grpc as pb_grpc
from raee_server.types import METADATA_KEY

SAMPLE_TEXTS = [
    "a gorgeous , witty , seductive movie", "the plot is a tedious mess", "an unremarkable sequel",
    "one of the best films of the year", "i could not wait for it to end", "fine performances all round",
]


@dataclass
class SoakResult:
    clients: int
    seconds: float
    codes: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    rss_mb: dict[str, float] = field(default_factory=dict)
    retry: bool = False

    @property
    def requests(self) -> int:
        return sum(self.codes.values())

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    def to_dict(self) -> dict[str, object]:
        return {"clients": self.clients, "seconds": self.seconds, "retry": self.retry, "requests": self.requests,
                "requests_per_second": self.requests / self.seconds, "codes": dict(self.codes),
                "latency_ms": {"p50": self.percentile(50), "p95": self.percentile(95), "p99": self.percentile(99)},
                "rss_mb": self.rss_mb}


def _check_local(address: str) -> None:
    host = address.rsplit(":", 1)[0].strip("[]")
    ip = ipaddress.ip_address(socket.gethostbyname(host)) if host != "::1" else ipaddress.ip_address(host)
    if not ip.is_loopback:
        raise InvalidInput(f"server: {address} is not a loopback address; load tests only target this machine")


def _rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def _drive(stub_for: Callable[[int], pb_grpc.RaeeServiceStub], request_for: Callable[[int, int], pb.ClassifyRequest],
           clients: int, stop_at: float, measure_from: float, metadata: list[tuple[str, str]],
           resend_wait: float = 0.0, on_measured: Callable[[], None] | None = None
           ) -> tuple[Counter[str], list[float]]:
    """`clients` threads send Classify (client i's n-th request: request_for(i, n)) until `stop_at`;
    answers sent from `measure_from` on are counted by code, with the latency of the OK ones."""
    codes: Counter[str] = Counter()
    latencies: list[float] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        stub, n = stub_for(i), 0
        while (now := time.monotonic()) < stop_at:
            t0 = time.monotonic()
            try:
                stub.Classify(request_for(i, n), timeout=60, metadata=metadata)
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
                if code == "RESOURCE_EXHAUSTED":
                    time.sleep(resend_wait)
            n += 1
            if now >= measure_from:
                with lock:
                    codes[code] += 1
                    if code == "OK":
                        latencies.append((time.monotonic() - t0) * 1e3)
                if on_measured:
                    on_measured()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(stop_at - time.monotonic() + 120)
    return codes, latencies


def soak(address: str, task: str, clients: int = 32, seconds: float = 60.0, warmup: float = 5.0,
         api_key: str | None = None, server_pid: int | None = None, policy: str = "",
         retry: bool = False) -> SoakResult:
    """`retry`: clients use RaeeClient's channel (jittered exponential back-off on RESOURCE_EXHAUSTED);
    otherwise a rejected client waits 10 ms and sends again. Each client has its own channel."""
    _check_local(address)
    result = SoakResult(clients, seconds, retry=retry)
    metadata = [(METADATA_KEY, api_key)] if api_key else []
    channels = [grpc.insecure_channel(address, options=CHANNEL_OPTIONS if retry else None) for _ in range(clients)]
    options = pb.ClassifyOptions(policy=policy)
    rss_lock = threading.Lock()

    def rss_after_warmup() -> None:
        with rss_lock:
            if server_pid and "after_warmup" not in result.rss_mb:
                result.rss_mb["after_warmup"] = _rss_mb(server_pid)

    start = time.monotonic()
    try:
        result.codes, result.latencies_ms = _drive(
            lambda i: pb_grpc.RaeeServiceStub(channels[i]),
            lambda i, n: pb.ClassifyRequest(task=task, text=f"{SAMPLE_TEXTS[(i + n) % len(SAMPLE_TEXTS)]} {i} {n}",
                                            options=options),
            clients, start + warmup + seconds, start + warmup, metadata,
            resend_wait=0.0 if retry else 0.01, on_measured=rss_after_warmup)
    finally:
        for channel in channels:
            channel.close()
    if server_pid:
        result.rss_mb["end"] = _rss_mb(server_pid)
    return result


def balanced_target(addresses: Sequence[str]) -> str:
    """One channel target over several replicas' addresses (gRPC's ipv4: form, which round_robin
    spreads calls over, as it does over the addresses of a DNS name); one address as it is."""
    if len(addresses) == 1:
        return addresses[0]
    hosts = []
    for address in addresses:
        host, _, port = address.rpartition(":")
        hosts.append(f"{socket.gethostbyname(host.strip('[]'))}:{port}")
    return "ipv4:" + ",".join(hosts)


def compare_policies(address: str | Sequence[str], task: str, texts: Sequence[str], policies: Sequence[str],
                     clients: int = 16, seconds: float = 30.0, sequential: int = 50, api_key: str | None = None
                     ) -> dict[str, dict[str, float]]:
    """Per policy, in the same run: sequential latency (one request at a time) and throughput and
    latency with `clients` concurrent clients, on real texts. Several addresses (replicas of one
    deployment): one channel balancing the calls over them, round robin."""
    addresses = [address] if isinstance(address, str) else list(address)
    for one in addresses:
        _check_local(one)
    metadata = [(METADATA_KEY, api_key)] if api_key else []
    out: dict[str, dict[str, float]] = {}
    with grpc.insecure_channel(balanced_target(addresses), options=[("grpc.lb_policy_name", "round_robin")]) as channel:
        stub = pb_grpc.RaeeServiceStub(channel)
        for policy in policies:
            options = pb.ClassifyOptions(policy=policy)
            seq = []
            for text in texts[:sequential]:
                t0 = time.monotonic()
                stub.Classify(pb.ClassifyRequest(task=task, text=text, options=options), timeout=60, metadata=metadata)
                seq.append((time.monotonic() - t0) * 1e3)
            load = _load(stub, task, texts, options, clients, seconds, metadata)
            out[policy] = {"sequential_p50_ms": float(np.percentile(seq, 50)),
                           "sequential_p95_ms": float(np.percentile(seq, 95)), **load}
    return out


def _load(stub: pb_grpc.RaeeServiceStub, task: str, texts: Sequence[str], options: pb.ClassifyOptions, clients: int,
          seconds: float, metadata: list[tuple[str, str]]) -> dict[str, float]:
    start = time.monotonic()
    codes, latencies = _drive(
        lambda _i: stub,
        lambda i, n: pb.ClassifyRequest(task=task, text=texts[(i + n * clients) % len(texts)], options=options),
        clients, start + seconds, start, metadata)
    elapsed = time.monotonic() - start
    ms = np.array(latencies or [float("nan")])
    return {"clients": clients, "throughput_rps": codes["OK"] / elapsed, "errors": sum(codes.values()) - codes["OK"],
            "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99))}
