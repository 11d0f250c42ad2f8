"""raee-admin's benchmarks and load generators."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from raee_server.cli.app import (
    Context,
    cli,
    data_option,
    reports,
    shipped_spec,
)
from raee_server.core.datafile import read_rows
from raee_server.settings import Settings
from raee_server.types import Row


@cli.command()
@click.argument("tasks", nargs=-1, required=True)
@data_option()
@click.option("--train-rows", default=5000, show_default=True, help="database: the first N train rows")
@click.option("--dev-rows", default=500, show_default=True, help="measured: the first N dev rows")
@click.option("--k", default=12, show_default=True)
@click.option("--latency-rows", default=48, show_default=True, help="served requests timed per policy")
@click.option("--sweep", "sweeps", multiple=True, type=click.Choice(["k", "size", "encoder", "key"]),
              default=["k", "size", "encoder", "key"], show_default=True,
              help="key: a task with several inputs under each way of making its retrieval key")
@click.option("--alt-encoder", "alt_encoders", multiple=True, default=["backbone:3", "hashing:384"],
              show_default=True, help="key encoders compared with the main one in the encoder sweep")
@click.option("--size", "sizes", multiple=True, type=int, help="database sizes of the size sweep "
              "(default 500, 1000, 2000, 5000, 10000, 20000, 60000, capped at --train-rows)")
@click.option("--dev-skip", default=0, show_default=True,
              help="measure dev rows after the first N (e.g. 500: report on rows no design decision saw)")
@click.option("--heads/--no-heads", "use_heads", default=True, show_default=True,
              help="fit and measure exit heads (their fit grows with the database: 128 s at 5,000 SST-2 "
              "records on two cores, docs/results.md)")
@click.option("--out", type=click.Path(path_type=Path), default=Path("out/bench"), show_default=True)
@click.pass_obj
@reports
def bench(obj: Context, tasks: tuple[str, ...], data_root: Path, train_rows: int, dev_rows: int, k: int,
          latency_rows: int, sweeps: tuple[str, ...], alt_encoders: tuple[str, ...], sizes: tuple[int, ...],
          dev_skip: int, use_heads: bool, out: Path) -> dict[str, Any]:
    """Every exit policy side by side on each task: tables, JSON and plots in --out.

    Stores go to <out>/data unless --data-dir is given, so a bench never touches the service's data.
    """
    from raee_server.bench import harness, policy_report
    from raee_server.core.engine import Engine
    from raee_server.models.encoders import load_encoder
    from raee_server.stores.vectors import EdgeVectorStore, collection_name

    if obj.settings.data_dir == Settings().data_dir:
        obj.settings = obj.settings.model_copy(update={"data_dir": out / "data"})
    engine = obj.engine
    others = []
    if "encoder" in sweeps:
        for spec in alt_encoders:
            encoder = load_encoder(spec, obj.settings.device, engine.backbone, obj.settings.key_runtime,
                                   obj.settings.models_dir, obj.settings.threads)
            store = EdgeVectorStore(obj.settings.data_dir / "qdrant",
                                    collection_name(engine.backbone.model_id, encoder.model_id), encoder.dim)
            others.append(Engine(engine.backbone, encoder, store, engine.metadata, obj.settings))
    done = []
    for name in tasks:
        report = harness.bench_task(engine, shipped_spec(name), data_root / name / "train.tsv",
                                    data_root / name / "dev.tsv", train_rows, dev_rows, k, latency_rows, sweeps,
                                    others, sizes or harness.SIZE_SWEEP, use_heads, dev_skip)
        policy_report.print_summary(report, obj.say)
        done.append(report)
    command = "raee-admin " + " ".join(sys.argv[1:])
    written = [str(path) for path in policy_report.write_reports(done, out, command)]
    for path in written:
        obj.say(f"wrote {path}")
    for other in others:
        other.vectors.close()
    return {"tasks": list(tasks), "written": written}


@cli.command()
@data_option("folder with agnews/ and trec/ train.tsv and dev.tsv (the pairs' sources)")
@click.option("--out", type=click.Path(path_type=Path), default=Path("out/pairs"), show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.pass_obj
@reports
def pairs(obj: Context, data_root: Path, out: Path, seed: int) -> dict[str, Any]:
    """Write the sentence-pair tasks agnews-pairs and trec-pairs, built from real single-text files
    (raee_server.bench.pairs): then `raee-admin bench agnews-pairs trec-pairs --data OUT`."""
    from raee_server.bench import pairs as pair_tasks

    report = pair_tasks.build(data_root, out, seed)
    for name, counts in report.items():
        obj.say(f"{out / name}: {counts['train_rows']} train pairs ({counts['train_same']} same), "
                f"{counts['dev_rows']} dev pairs ({counts['dev_same']} same)")
    return report


@cli.command("bench-shift")
@click.argument("tasks", nargs=-1, required=True)
@data_option()
@click.option("--train-rows", default=5000, show_default=True,
              help="the base database: the first N train rows (reused when a bench built it)")
@click.option("--records", default=2000, show_default=True, help="records in each drawn database")
@click.option("--dev-rows", default=500, show_default=True, help="measured: the first N dev rows")
@click.option("--k", default=12, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("out/shift"), show_default=True)
@click.pass_obj
@reports
def bench_shift(obj: Context, tasks: tuple[str, ...], data_root: Path, train_rows: int, records: int,
                dev_rows: int, k: int, out: Path) -> dict[str, Any]:
    """Label-prior shift: a skewed and a balanced database of the same size drawn from each task's
    records, every policy with and without the prior correction, on the same dev rows.

    Stores go to <out>/data unless --data-dir is given (point it at a bench's to reuse its records).
    """
    from raee_server.bench import harness, shift

    if obj.settings.data_dir == Settings().data_dir:
        obj.settings = obj.settings.model_copy(update={"data_dir": out / "data"})
    engine = obj.engine
    done = []
    for name in tasks:
        spec = shipped_spec(name)
        harness.ensure_task(engine, spec)
        harness.build(engine, name, data_root / name / "train.tsv", train_rows)
        done.append(shift.shift_task(engine, spec, data_root / name / "dev.tsv", records, dev_rows, k))
    command = "raee-admin " + " ".join(sys.argv[1:])
    written = [str(path) for path in shift.write(done, out, command)]
    for path in written:
        obj.say(f"wrote {path}")
    return {"tasks": list(tasks), "written": written}


@cli.command("bench-coverage")
@click.argument("tasks", nargs=-1, required=True)
@data_option()
@click.option("--construction", "constructions", multiple=True, type=click.Choice(["length", "subtopic"]),
              help="per task, in order: how the records leave traffic out (default: length for sst2, else subtopic)")
@click.option("--train-rows", default=2000, show_default=True,
              help="the base database: the first N train rows (reused when a bench built it)")
@click.option("--rows", default=400, show_default=True, help="dev rows per traffic (shifted, control), at most")
@click.option("--dev-skip", default=500, show_default=True, help="dev rows after the first N (the report rows)")
@click.option("--k", default=12, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("out/coverage"), show_default=True)
@click.pass_obj
@reports
def bench_coverage(obj: Context, tasks: tuple[str, ...], data_root: Path, constructions: tuple[str, ...],
                   train_rows: int, rows: int, dev_skip: int, k: int, out: Path) -> dict[str, Any]:
    """Traffic unlike the records: cascades with and without the coverage gate, on dev rows the drawn
    records cover and on rows they do not (raee_server.bench.coverage says how they are drawn).

    Stores go to <out>/data unless --data-dir is given (point it at a bench's to reuse its records).
    """
    from raee_server.bench import coverage, harness

    if obj.settings.data_dir == Settings().data_dir:
        obj.settings = obj.settings.model_copy(update={"data_dir": out / "data"})
    engine = obj.engine
    done = []
    for i, name in enumerate(tasks):
        spec = shipped_spec(name)
        harness.ensure_task(engine, spec)
        harness.build(engine, name, data_root / name / "train.tsv", train_rows)
        how = constructions[i] if i < len(constructions) else "length" if name == "sst2" else "subtopic"
        done.append(coverage.coverage_task(engine, spec, data_root / name / "dev.tsv", how, rows, dev_skip, k))
    written = [str(path) for path in coverage.write(done, out)]
    for path in written:
        obj.say(f"wrote {path}")
    return {"tasks": list(tasks), "written": written}


@cli.command("loadtest")
@click.option("--server", "servers", required=True, multiple=True, metavar="HOST:PORT",
              help="a server on this machine (loopback only); repeat for replicas: the calls are balanced over them")
@click.option("--task", "task_name", required=True)
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--policy", "policies", multiple=True, default=["auto", "full"], show_default=True)
@click.option("--clients", default=16, show_default=True)
@click.option("--seconds", default=30.0, show_default=True)
@click.option("--sequential", default=50, show_default=True, help="one-at-a-time requests per policy")
@click.option("--json-out", type=click.Path(path_type=Path))
@click.pass_obj
@reports
def loadtest(obj: Context, servers: tuple[str, ...], task_name: str, file: Path, policies: tuple[str, ...],
             clients: int, seconds: float, sequential: int, json_out: Path | None) -> dict[str, Any]:
    """Policies side by side against a running server: sequential latency, then N concurrent clients."""
    from raee_server.bench.soak import compare_policies

    texts = [r.text for r in read_rows(file) if isinstance(r, Row)]
    results = compare_policies(servers, task_name, texts, policies, clients, seconds, sequential, obj.api_key)
    obj.say(f"{'policy':<12} {'seq p50 ms':>10} {'rps':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>6}")
    for name, r in results.items():
        obj.say(f"{name:<12} {r['sequential_p50_ms']:>10.1f} {r['throughput_rps']:>7.2f} {r['p50_ms']:>8.1f} "
                f"{r['p95_ms']:>8.1f} {r['p99_ms']:>8.1f} {int(r['errors']):>6}")
    if json_out:
        json_out.write_text(json.dumps(results, indent=2))
    return results


@cli.command("loadtest-open")
@click.option("--server", "servers", required=True, multiple=True, metavar="HOST:PORT",
              help="a server on this machine (loopback only); repeat for replicas: the calls are balanced over them")
@click.option("--task", "task_name", required=True)
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--rate", "rates", type=click.FloatRange(min=0, min_open=True), multiple=True,
              default=[5.0, 10.0, 20.0, 40.0], show_default=True, help="arrival rates (requests/s), each in turn")
@click.option("--seconds", type=click.FloatRange(min=0, min_open=True), default=20.0, show_default=True,
              help="per rate")
@click.option("--policy", "policies", multiple=True, default=["auto", "full"], show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("out/openloop"), show_default=True)
@click.pass_obj
@reports
def loadtest_open(obj: Context, servers: tuple[str, ...], task_name: str, file: Path, rates: tuple[float, ...],
                  seconds: float, policies: tuple[str, ...], out: Path) -> dict[str, Any]:
    """Open-loop load: requests at fixed arrival rates for a fixed time, each sent when due whatever
    the server's pace; p50/p99 and errors per rate, drawn as latency against offered load."""
    from raee_server.bench import openloop

    texts = [r.text for r in read_rows(file) if isinstance(r, Row)]
    report = openloop.run(servers, task_name, texts, rates, seconds, policies, obj.api_key,
                          progress=lambda line: click.echo(line, err=True))
    written = [str(p) for p in openloop.write(report, out, "raee-admin " + " ".join(sys.argv[1:]))]
    obj.say((out / "openloop.md").read_text())
    return {"policies": report, "written": written}


@cli.command("bench-speed")
@click.argument("tasks", nargs=-1, required=True, metavar="TASK:ROWS...")
@data_option("folder with <task>/train.tsv")
@click.option("--out", type=click.Path(path_type=Path), default=Path("out/speed"), show_default=True)
@click.pass_obj
@reports
def bench_speed(obj: Context, tasks: tuple[str, ...], data_root: Path, out: Path) -> dict[str, Any]:
    """Ingest speed, previous path against current, in one run: rows/s, FLOPs per row, achieved GFLOP/s
    against this machine's fp32 matrix multiply, and whether both paths store the same records.
    E.g. `raee-admin bench-speed sst2:2000 agnews:1000 --out docs/performance`."""
    from raee_server.bench import speed

    chosen = []
    for item in tasks:
        name, _, rows = item.partition(":")
        if not rows.isdigit():
            raise click.UsageError(f"{item!r}: give TASK:ROWS (e.g. sst2:2000)")
        chosen.append((shipped_spec(name), data_root / name / "train.tsv", int(rows)))
    report = speed.run(obj.engine, chosen, out, progress=lambda line: click.echo(line, err=True))
    written = [str(path) for path in speed.write(report, out, "raee-admin " + " ".join(sys.argv[1:]))]
    obj.say((out / "speed.md").read_text())
    return {**report, "written": written}


@cli.command("bench-features")
@click.argument("tasks", nargs=-1, required=True)
@data_option()
@click.option("--train-rows", default=2000, show_default=True, help="records: the first N train rows")
@click.option("--dev-rows", default=500, show_default=True, help="measured: N dev rows")
@click.option("--dev-skip", default=0, show_default=True, help="after the first N dev rows")
@click.option("--form", "forms", multiple=True, default=["float16", "codec-152"], show_default=True,
              help="stored forms compared: float16, or codec-D (the codec at D coordinates per exit)")
@click.option("--out", type=click.Path(path_type=Path), default=Path("out/features"), show_default=True)
@click.pass_obj
@reports
def bench_features(obj: Context, tasks: tuple[str, ...], data_root: Path, train_rows: int, dev_rows: int,
                   dev_skip: int, forms: tuple[str, ...], out: Path) -> dict[str, Any]:
    """Heads on compact exit features against float16, in one run: dev accuracy per exit and at the best
    exit with 95 % paired intervals. Features are computed once and cached in the data directory (default
    <out>/data), so a rerun only fits."""
    from raee_server.bench import features

    for form in forms:
        if form != "float16" and not (form.startswith("codec-") and form[6:].isdigit()):
            raise click.UsageError(f"--form {form!r}: float16 or codec-D (e.g. codec-152)")
    if obj.settings.data_dir == Settings().data_dir:
        obj.settings = obj.settings.model_copy(update={"data_dir": out / "data"})
    chosen = [(shipped_spec(name), data_root / name) for name in tasks]
    report = features.run(obj.engine, chosen, train_rows, dev_rows, dev_skip, forms, out,
                          progress=lambda line: click.echo(line, err=True))
    written = [str(path) for path in features.write(report, out, "raee-admin " + " ".join(sys.argv[1:]))]
    obj.say((out / "features.md").read_text())
    return {**report, "written": written}


@cli.command("bench-fit")
@click.option("--size", "sizes", type=int, multiple=True, help="records (default 5,000, 20,000, 60,614, 1,000,000)")
@click.option("--added", type=int, default=1000, show_default=True, help="records added before the warm refit")
@click.option("--exits", type=int, default=19, show_default=True, help="exits per record (Gemma 3 270M: 19)")
@click.option("--dim", type=int, default=152, show_default=True, help="coordinates per exit (the codec's)")
@click.option("--labels", type=int, default=2, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("out/fit"), show_default=True)
@click.pass_obj
@reports
def bench_fit(obj: Context, sizes: tuple[int, ...], added: int, exits: int, dim: int, labels: int,
              out: Path) -> dict[str, Any]:
    """The exit heads' fit at scale on synthetic codes (no model, no forward): time and peak memory of a
    full fit and of a warm refit after `--added` records, each size in its own process."""
    from raee_server.bench import fit

    report = fit.run(sizes or (5000, 20000, 60614, 1_000_000), added, exits, dim, labels,
                     progress=lambda line: click.echo(line, err=True))
    written = [str(path) for path in fit.write(report, out, "raee-admin " + " ".join(sys.argv[1:]))]
    obj.say((out / "fit.md").read_text())
    return {**report, "written": written}


@cli.command("bench-keys")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--limit", default=500, show_default=True, help="texts to encode (the file's first)")
@click.option("--out", type=click.Path(path_type=Path), default=Path("out/keys"), show_default=True)
@click.pass_obj
@reports
def bench_keys(obj: Context, file: Path, limit: int, out: Path) -> dict[str, Any]:
    """The key encoder on torch against ONNX Runtime in one run: one text per call, batches of 16, and
    how far apart their keys are. E.g. `raee-admin bench-keys corpora/sst2/dev.tsv`."""
    from raee_server.bench import keys
    from raee_server.models.encoders import load_encoder

    texts = [r.text for r in itertools.islice(read_rows(file), limit) if isinstance(r, Row)]
    if not texts:
        raise click.UsageError(f"{file}: no rows to encode")
    s = obj.settings
    encoders = {runtime: load_encoder(s.encoder, "cpu", None, runtime, s.models_dir, s.threads)
                for runtime in ("torch", "onnx")}
    if type(encoders["torch"]) is type(encoders["onnx"]):
        raise click.UsageError(f"encoder {s.encoder!r} has one runtime only: give a sentence-transformers encoder")
    report = keys.compare(encoders, texts, progress=lambda line: click.echo(line, err=True))
    written = [str(path) for path in keys.write(report, out, "raee-admin " + " ".join(sys.argv[1:]))]
    obj.say((out / "keys.md").read_text())
    return {**report, "written": written}


@cli.command("bench-transports")
@click.option("--server", required=True, metavar="HOST:PORT", help="the server's gRPC address (loopback only)")
@click.option("--http", "http_address", default="127.0.0.1:8080", show_default=True, metavar="HOST:PORT",
              help="the same server's HTTP address")
@click.option("--task", "task_name", required=True)
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--policy", default="auto", show_default=True)
@click.option("--sequential", default=200, show_default=True, help="requests per transport, alternating")
@click.option("--clients", default=16, show_default=True)
@click.option("--seconds", default=20.0, show_default=True, help="concurrent load per transport")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="folder for the JSON, table and plot")
@click.pass_obj
@reports
def bench_transports(obj: Context, server: str, http_address: str, task_name: str, file: Path, policy: str,
                     sequential: int, clients: int, seconds: float, out: Path) -> dict[str, Any]:
    """Classify over gRPC and over HTTP/JSON side by side against one running server, in one run."""
    from raee_server.bench import transports

    texts = [r.text for r in read_rows(file) if isinstance(r, Row)]
    report = transports.compare(server, http_address, task_name, texts, policy, sequential, clients, seconds,
                                obj.api_key, progress=lambda line: click.echo(line, err=True))
    written = [str(path) for path in transports.write(report, out, "raee-admin " + " ".join(sys.argv[1:]))]
    for path in written:
        obj.say(f"wrote {path}")
    return {**report, "written": written}




@cli.command("bench-scale")
@click.option("--size", "sizes", multiple=True, type=int, default=[250_000, 500_000, 1_000_000], show_default=True)
@click.option("--tenants", default=10, show_default=True)
@click.option("--queries", default=1000, show_default=True, help="tenant-filtered top-12 queries per size and phase")
@click.option("--keys", type=click.Choice(["clustered", "uniform"]), default="clustered", show_default=True,
              help="synthetic keys: Gaussian clusters (like sentence embeddings) or uniform (worst case)")
@click.option("--texts", "text_files", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="real keys instead: these data files' texts through the configured encoder (repeatable)")
@click.option("--qdrant-url", help="measure this Qdrant server instead of the embedded store (a scratch collection)")
@click.option("--out", type=click.Path(path_type=Path), help="write scale.json, scale.md and scale.png here")
@click.pass_obj
@reports
def bench_scale(obj: Context, sizes: tuple[int, ...], tenants: int, queries: int, keys: str,
                text_files: tuple[Path, ...], qdrant_url: str | None, out: Path | None) -> dict[str, Any]:
    """Tenant-filtered top-12 query latency and recall as the vector store grows, before and after indexing."""
    import numpy as np

    from raee_server.bench import scale

    key_source: str | np.ndarray = keys
    if text_files:
        from raee_server.models.encoders import load_encoder

        texts = [row.text for f in text_files for row in read_rows(f) if isinstance(row, Row)]
        encoder = load_encoder(obj.settings.encoder, obj.settings.device, None, obj.settings.key_runtime,
                               obj.settings.models_dir, obj.settings.threads)
        key_source = np.concatenate([encoder.encode(texts[i : i + 512]) for i in
                                     tqdm(range(0, len(texts), 512), desc=f"encode {len(texts):,} texts",
                                          file=sys.stderr)])
        keys = f"{obj.settings.encoder} keys of {', '.join(str(f) for f in text_files)}"
    dim = key_source.shape[1] if isinstance(key_source, np.ndarray) else 384
    factory = scale.server_store_factory(qdrant_url, dim) if qdrant_url else None
    results = scale.scale(sizes, tenants=tenants, queries=queries, keys=key_source, store_factory=factory)
    obj.say(scale.table(results))
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "scale.json").write_text(json.dumps({"command": " ".join(sys.argv[1:]), "keys": keys,
                                                    "store": qdrant_url or "embedded", "results": results}, indent=2))
        (out / "scale.md").write_text(scale.table(results) + "\n")
        scale.plot(results, out / "scale.png")
        click.echo(f"wrote {out}/scale.json, scale.md, scale.png", err=True)
    return {"keys": keys, "store": qdrant_url or "embedded", "results": results}



@cli.command()
@click.option("--server", required=True, metavar="HOST:PORT", help="a server on this machine (loopback only)")
@click.option("--task", "task_name", required=True)
@click.option("--clients", default=32, show_default=True)
@click.option("--seconds", default=60.0, show_default=True)
@click.option("--warmup", default=10.0, show_default=True)
@click.option("--pid", type=int, help="the server's pid, to report its resident memory")
@click.option("--policy", default="", help="exit policy of the requests (default: the server's)")
@click.option("--retry", is_flag=True, help="clients back off and retry as RaeeClient does (else: resend after 10 ms)")
@click.option("--json-out", type=click.Path(path_type=Path))
@click.pass_obj
@reports
def soak(obj: Context, server: str, task_name: str, clients: int, seconds: float, warmup: float, pid: int | None,
         policy: str, retry: bool, json_out: Path | None) -> dict[str, Any]:
    """Bounded load test: concurrent clients for a fixed time; codes, p50/p95/p99, memory."""
    from raee_server.bench.soak import soak as run

    result = run(server, task_name, clients, seconds, warmup, obj.api_key, pid, policy, retry)
    summary = result.to_dict()
    obj.say(json.dumps(summary, indent=2))
    if json_out:
        json_out.write_text(json.dumps(summary, indent=2))
    return summary

