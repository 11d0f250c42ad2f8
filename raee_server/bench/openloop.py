"""Open-loop load: requests at fixed arrival rates, whatever the server's pace.

A closed-loop client sends its next request only after the last answer, so a slow server slows its
own load and the queueing never shows (coordinated omission). Here request i of a rate r is due at
start + i / r and is sent then, on its own, answered or not; its latency counts from when it was
due, so a client that fell behind counts the wait too. Per rate: p50, p99 and errors, drawn as
latency against offered load.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from raee_server.bench.soak import _check_local, balanced_target
from raee_server.protos.raee.v1 import raee_pb2 as pb
from raee_server.protos.raee.v1 import raee_pb2_grpc as pb_grpc
from raee_server.types import METADATA_KEY

TIMEOUT = 30.0  # seconds a request may take before it counts as DEADLINE_EXCEEDED


async def _at_rate(stub: pb_grpc.RaeeServiceStub, task: str, texts: Sequence[str], policy: str, rate: float,
                   seconds: float, metadata: list[tuple[str, str]]) -> dict[str, Any]:
    codes: Counter[str] = Counter()
    latencies: list[float] = []
    options = pb.ClassifyOptions(policy=policy)
    start = time.monotonic()

    async def one(i: int) -> None:
        due = start + i / rate
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        try:
            await stub.Classify(pb.ClassifyRequest(task=task, text=texts[i % len(texts)], options=options),
                                timeout=TIMEOUT, metadata=metadata)
            codes["OK"] += 1
            latencies.append((time.monotonic() - due) * 1e3)
        except grpc.aio.AioRpcError as exc:
            codes[exc.code().name] += 1

    n = max(1, round(rate * seconds))
    await asyncio.gather(*(one(i) for i in range(n)))
    elapsed = time.monotonic() - start
    ms = np.array(latencies or [float("nan")])
    return {"offered_rps": rate, "requests": n, "answered_rps": codes["OK"] / elapsed,
            "errors": n - codes["OK"], "codes": dict(codes), "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max())}


def run(addresses: Sequence[str], task: str, texts: Sequence[str], rates: Sequence[float], seconds: float,
        policies: Sequence[str], api_key: str | None = None, progress: Callable[[str], None] = lambda _: None
        ) -> dict[str, list[dict[str, Any]]]:
    """Per policy, per rate (ascending), in one run against the same server(s)."""
    for address in addresses:
        _check_local(address)
    metadata = [(METADATA_KEY, api_key)] if api_key else []

    async def all_rates() -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        async with grpc.aio.insecure_channel(balanced_target(addresses),
                                             options=[("grpc.lb_policy_name", "round_robin")]) as channel:
            stub = pb_grpc.RaeeServiceStub(channel)
            for policy in policies:
                out[policy] = []
                for rate in sorted(rates):
                    found = await _at_rate(stub, task, texts, policy, rate, seconds, metadata)
                    progress(f"{policy} at {rate:g}/s: p50 {found['p50_ms']:.0f} ms, p99 {found['p99_ms']:.0f} ms, "
                             f"{found['errors']} errors")
                    out[policy].append(found)
        return out

    return asyncio.run(all_rates())


def markdown(report: dict[str, list[dict[str, Any]]], command: str) -> str:
    out = ["# Open-loop load", "", f"Command: `{command}`", "",
           "Requests arrive at a fixed rate for a fixed time, each sent when due whatever the answers before "
           "it; latency counts from when it was due. Errors: not answered OK within "
           f"{TIMEOUT:g} s (by code in the JSON).", "",
           "| policy | offered /s | answered /s | p50 ms | p99 ms | errors |", "|---|---|---|---|---|---|"]
    for policy, rows in report.items():
        out += [f"| {policy} | {r['offered_rps']:g} | {r['answered_rps']:.1f} | {r['p50_ms']:.0f} | "
                f"{r['p99_ms']:.0f} | {r['errors']} |" for r in rows]
    return "\n".join(out) + "\n"


def plot(report: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for policy, rows in report.items():
        rates = [r["offered_rps"] for r in rows]
        line, = ax.plot(rates, [r["p50_ms"] for r in rows], marker="o", label=f"{policy} p50")
        ax.plot(rates, [r["p99_ms"] for r in rows], marker="^", linestyle="--", color=line.get_color(),
                label=f"{policy} p99")
    ax.set_xlabel("offered load (requests/s)")
    ax.set_ylabel("latency from arrival (ms)")
    ax.set_yscale("log")
    ax.set_title("Latency against offered load (open loop)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(report: dict[str, list[dict[str, Any]]], out: Path, command: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "openloop.json").write_text(json.dumps({"command": command, "policies": report}, indent=2))
    (out / "openloop.md").write_text(markdown(report, command))
    plot(report, out / "openloop.png")
    return [out / "openloop.json", out / "openloop.md", out / "openloop.png"]
