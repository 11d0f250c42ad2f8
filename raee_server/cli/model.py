"""raee-admin's verbs that need the model: classify, eval, tune, fit-heads, backfill-features, doctor,
index (each locally, or with --server as the server's operation), and the operations themselves."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from raee_server.cli.app import (
    EXIT_REJECTED,
    POLICY_HELP,
    Context,
    cli,
    file_options,
    need_server,
    on_server,
    pb_state,
    reports,
    rows_of,
    server_option,
    task_inputs,
)
from raee_server.types import Example, Row


@cli.command()
@click.option("--task", "task_name", required=True)
@click.argument("texts", nargs=-1)
@click.option("--input", "named", multiple=True, metavar="NAME=TEXT",
              help="one input of a task with several (repeatable): the example's inputs by name")
@click.option("--policy", default="auto", show_default=True, help=POLICY_HELP)
@click.option("--k", type=int, help="neighbours to retrieve (default 12)")
@click.option("--neighbours", "show_neighbours", is_flag=True, help="print the retrieved neighbours")
@server_option
@click.pass_obj
@reports
def classify(obj: Context, task_name: str, texts: tuple[str, ...], named: tuple[str, ...], policy: str | None,
             k: int | None, show_neighbours: bool, server: str | None = None) -> list[dict[str, Any]]:
    """Classify texts with early exit: prints label, exit layer and label scores. A task with several
    inputs takes one example: its inputs in the task's order (positional), or by name (--input)."""
    examples = examples_of(texts, named, task_inputs(obj, task_name, server))
    if server:
        client = obj.client(server)
        labels = client.labels(task_name)
        predictions = client.classify(task_name, examples, policy, k, neighbours=show_neighbours)
        client.close()
    else:
        engine = obj.engine
        labels = engine.task_info(task_name).spec.label_names
        predictions = engine.classify(task_name, examples, policy=policy, k=k)
    answers = []
    for example, pred in zip(examples, predictions):
        text = example if isinstance(example, str) else " | ".join(example.values())
        scores = dict(zip(labels, pred.scores))
        answer: dict[str, Any] = {"text" if isinstance(example, str) else "inputs": example,
                                  "label": pred.label, "exit_layer": pred.exit_layer, "depth": pred.depth,
                                  "policy": pred.policy, "answered_by": pred.answered_by, "covered": pred.covered,
                                  "scores": scores, "timings_us": pred.timings_us}
        if show_neighbours:
            answer["neighbours"] = [{"id": n.id, "label": n.label, "similarity": n.similarity,
                                     "exits": [layer for layer, _ in n.exits]} for n in pred.neighbours]
        answers.append(answer)
        score_text = " ".join(f"{name}={p:.3f}" for name, p in scores.items())
        where = "key" if pred.answered_by == "key" else f"exit {pred.exit_layer:>2}/{pred.depth}"  # the key: no layer
        obj.say(f"{pred.label:<12} {where:<8}  {score_text}  [{pred.policy}]  {text}")
        if show_neighbours:
            for n in pred.neighbours:
                obj.say(f"    {n.similarity:.3f} {n.label:<12} exits {[l for l, _ in n.exits]}")
    return answers


def examples_of(texts: Sequence[str], named: Sequence[str], inputs: Sequence[str]) -> list[Example]:
    """The examples `classify` was given: texts, or one example's inputs (by --input, or in order)."""
    if named:
        if texts:
            raise click.UsageError("give texts, or --input NAME=TEXT, not both")
        pairs = [item.partition("=") for item in named]
        bad = [item for item, (_, eq, _) in zip(named, pairs) if not eq]
        if bad:
            raise click.UsageError(f"--input {bad[0]!r}: write NAME=TEXT")
        return [{name: value for name, _, value in pairs}]
    if not texts:
        raise click.UsageError("give the texts to classify (or --input NAME=TEXT)")
    if len(inputs) > 1:
        if len(texts) != len(inputs):
            raise click.UsageError(f"this task takes {len(inputs)} inputs ({', '.join(inputs)}), one example at a "
                                   f"time: give {len(inputs)} texts, or --input NAME=TEXT; got {len(texts)}")
        return [dict(zip(inputs, texts))]
    return list(texts)


@cli.command("eval")
@click.option("--task", "task_name", required=True)
@click.argument("file", type=click.Path(path_type=Path))
@file_options
@click.option("--policy", "policies", multiple=True, default=["auto"], show_default=True,
              help="policy to measure (repeatable); `full` is always measured too")
@click.option("--k", type=int, help="neighbours to retrieve (default 12)")
@click.option("--json-out", type=click.Path(path_type=Path), help="also write the report as JSON")
@server_option
@click.pass_obj
@reports
def evaluate_cmd(obj: Context, task_name: str, file: Path, text_column: str, label_column: str, fmt: str | None,
                 limit: int | None, policies: tuple[str, ...], k: int | None, json_out: Path | None,
                 server: str | None = None) -> dict[str, Any]:
    """Accuracy, mean exit layer and exit histogram of each policy and of full depth, on the same rows.
    With --server, the server measures them (the rows travel in the request; nothing is stored)."""
    from raee_server.core.evaluation import evaluate, format_report

    items = list(rows_of(file, text_column, label_column, fmt, limit, task_inputs(obj, task_name, server)))
    rows = [r for r in items if isinstance(r, Row)]
    if len(rows) != len(items):
        click.echo(f"skipping {len(items) - len(rows)} unusable row(s)", err=True)
    if server:
        from raee_server.protos.raee.v1 import raee_pb2 as pb

        request = pb.EvaluateRequest(task=task_name, examples=[pb.Example(text=r.text, label=r.label) for r in rows],
                                     policies=list(policies), k=k or 0)
        found = on_server(obj, server, "Evaluate", request, task_name)
    else:
        with tqdm(total=len(rows), unit="row", desc=f"eval {task_name}", file=sys.stderr) as bar:
            found = evaluate(obj.engine, task_name, rows, list(policies), k, progress=bar.update).to_dict()
    obj.say(format_report(found))
    if json_out:
        json_out.write_text(json.dumps(found, indent=2))
    return dict(found)



@cli.command()
@server_option
@click.pass_obj
@reports
def index(obj: Context, server: str | None = None) -> dict[str, Any]:
    """Build the embedded vector store's pending indexes (also done at server start and after ingest).

    Blocks whatever holds the store while it runs: with --server, the server's requests wait for it."""
    from raee_server.errors import NotReady

    if server:
        from raee_server.protos.raee.v1 import raee_pb2 as pb

        found = on_server(obj, server, "BuildIndex", pb.BuildIndexRequest())
    else:
        try:
            engine = obj.engine
        except NotReady as exc:
            raise NotReady(f"{exc}. A running server builds its indexes as an operation: "
                           "`raee-admin index --server HOST:PORT`") from None
        found = {"seconds": engine.build_index(), "points": engine.vectors.count()}
    obj.say(f"{found['points']:,} points, indexes up to date ({found['seconds']:.1f} s)")
    return found



@cli.command()
@click.option("--task", "task_name", required=True)
@click.option("--validation", type=int, default=None, show_default="2000",
              help="validation records (leave-one-out; all of them when fewer)")
@click.option("--all", "show_all", is_flag=True, help="print every candidate, not just the best ten")
@server_option
@click.pass_obj
@reports
def tune(obj: Context, task_name: str, validation: int | None, show_all: bool, server: str | None = None
         ) -> dict[str, Any]:
    """Choose the task's `auto` policy and k on a validation split of its own records, and store it."""
    from raee_server.core import auto as tuning

    if server:
        from raee_server.protos.raee.v1 import raee_pb2 as pb

        found = on_server(obj, server, "Tune", pb.TuneRequest(task=task_name, validation=validation or 0,
                                                              all_candidates=show_all), task_name)
    else:
        found = tuning.tune_report(obj.engine, task_name, validation, show_all)
    choice = found["choice"]
    objective = choice["objective"]
    obj.say(f"{'policy':<22} {'k':>3} {objective.replace('_', ' '):>17} {'mean exit':>10}")
    for c in found["candidates"]:
        obj.say(f"{c['policy']:<22} {c['k']:>3} {100 * c[objective]:>16.1f}% {c['mean_exit']:>10.2f}")
    obj.say(f"auto: the least mean exit within half a standard error of the best {objective.replace('_', ' ')}")
    obj.say(f"auto for {task_name}: {choice['policy']} with k = {choice['k']} ({objective.replace('_', ' ')} "
            f"{100 * choice['accuracy']:.1f}% at mean exit {choice['mean_exit']:.2f} on "
            f"{choice['validation_rows']} rows)")
    return found


@cli.command("fit-heads")
@click.option("--task", "task_name", required=True)
@click.option("--full", is_flag=True, help="a full fit (C cross-validated anew), not a warm refit")
@server_option
@click.pass_obj
@reports
def fit_heads_cmd(obj: Context, task_name: str, full: bool, server: str | None = None) -> dict[str, Any]:
    """Fit the task's exit heads (a linear head per exit on its records' exit features, C chosen by
    cross-validation) as a new version, then re-choose its `auto` policy. Warm where it can: from the
    served version, keeping its C, until the records double since its full fit. With --server, the
    server fits them in a low-priority child process."""
    from raee_server.core import auto

    if server:
        from raee_server.protos.raee.v1 import raee_pb2 as pb

        summary = on_server(obj, server, "FitHeads", pb.FitHeadsRequest(task=task_name, full=full), task_name)
    else:
        from raee_server.serving.claims import holding, replica_name

        engine = obj.engine

        def fit_and_tune() -> dict[str, Any]:
            heads = auto.fit_task_heads(engine, task_name, progress=lambda m: click.echo(f"  {m}", err=True),
                                        full=full)
            return {**heads.summary(), "auto": auto.tune(engine, task_name).to_dict()}

        # servers over the same database take turns with it (docs/deployment.md)
        summary = holding(engine.metadata, task_name, replica_name(engine.settings, "raee-admin:"),
                          engine.settings.lease_seconds, fit_and_tune)
    choice = summary["auto"]
    obj.say(f"exit heads v{summary['version']} for {task_name}: {summary['fit_records']} records fit the heads, "
            f"{summary['calibration_records']} certify the cascade, {summary['seconds']:.1f} s")
    obj.say("out-of-fold accuracy per exit: " + " ".join(
        f"L{layer}={100 * a:.1f}%" for layer, a in enumerate(summary["accuracy"])))
    obj.say("C per exit: " + " ".join(f"L{layer}={c:g}" for layer, c in enumerate(summary["c"]))
            + f" ({summary['c_at_grid_edge']} at an edge of the grid)")
    obj.say(f"best exit {summary['best_exit']}; auto for {task_name}: {choice['policy']} with k = {choice['k']} "
            f"({100 * choice['accuracy']:.1f}% at mean exit {choice['mean_exit']:.2f})")
    return summary


@cli.command("backfill-features")
@click.option("--task", "task_name", required=True)
@server_option
@click.pass_obj
@reports
def backfill_features(obj: Context, task_name: str, server: str | None = None) -> dict[str, Any]:
    """Compute exit features for records stored before exit heads existed (one forward each)."""
    if server:
        from raee_server.protos.raee.v1 import raee_pb2 as pb

        found = on_server(obj, server, "BackfillFeatures", pb.BackfillFeaturesRequest(task=task_name), task_name)
    else:
        engine = obj.engine
        missing = len(engine.metadata.without_features(task_name))
        with tqdm(total=missing, unit="record", desc=f"features {task_name}", file=sys.stderr) as bar:
            found = {"task": task_name, "records": engine.backfill_features(task_name, progress=bar.update)}
    obj.say(f"exit features added to {found['records']} records of {task_name}")
    return found


@cli.command()
@click.option("--task", "tasks", multiple=True, help="task to check (repeatable; default: all)")
@click.option("--repair", is_flag=True, help="recompute rows missing from the vector store, delete orphan vectors")
@server_option
@click.pass_obj
@reports
def doctor(obj: Context, tasks: tuple[str, ...], repair: bool, server: str | None = None) -> list[dict[str, Any]]:
    """Report (and with --repair fix) records present in one store and missing in the other."""
    from raee_server.core import doctor as checks

    found = []
    if server:
        from raee_server.protos.raee.v1 import raee_pb2 as pb

        if not tasks:
            client = obj.client(server)
            tasks = tuple(t.name for t in client.tasks())
            client.close()
        for name in tasks:
            one = on_server(obj, server, "CheckRecords", pb.CheckRecordsRequest(task=name, repair=repair), name)
            obj.say(one["found"] + ("" if one["found"] == one["now"] else "\n  repaired -> " + one["now"]))
            found.append(one)
    else:
        engine = obj.engine
        for name in list(tasks) or [i.spec.name for i in engine.metadata.list_tasks()]:
            diagnosis = checks.diagnose(engine, name)
            first = diagnosis.summary()
            obj.say(first)
            if not diagnosis.healthy and repair:
                diagnosis = checks.repair(engine, diagnosis)
                obj.say("  repaired -> " + diagnosis.summary())
            found.append({"task": name, "found": first, "healthy": diagnosis.healthy, "now": diagnosis.summary()})
    unhealthy = sum(not f["healthy"] for f in found)
    if unhealthy:
        click.echo(f"error: {unhealthy} task(s) inconsistent; run with --repair", err=True)
        obj.exit_code = EXIT_REJECTED
    return found


@cli.group()
def operation() -> None:
    """The long-running operations of a running server (tune, fit-heads, eval, ... with --server)."""


def _operation_dict(op: Any) -> dict[str, Any]:
    from google.protobuf import json_format

    return json_format.MessageToDict(op, preserving_proto_field_name=True)


@operation.command("list")
@click.option("--task", "task_name", default="", help="only this task's operations")
@server_option
@click.pass_obj
@reports
def operation_list(obj: Context, task_name: str, server: str | None) -> list[dict[str, Any]]:
    """The server's operations, newest first, of the tasks your key grants."""
    client = obj.client(need_server(server, "operation list"))
    ops = client.operations(task_name)
    client.close()
    for op in ops:
        total = f"/{op.progress_total}" if op.progress_total else ""
        obj.say(f"{op.name}  {op.kind:<17} {op.task or '-':<16} {pb_state(op.state):<9} "
                f"{op.progress_done}{total}  {op.progress_message}")
    return [_operation_dict(op) for op in ops]


@operation.command("show")
@click.argument("name")
@server_option
@click.pass_obj
@reports
def operation_show(obj: Context, name: str, server: str | None) -> dict[str, Any]:
    """One operation: its state, progress, and its report or error once done."""
    client = obj.client(need_server(server, "operation show"))
    op = client.operation(name)
    client.close()
    found = _operation_dict(op)
    obj.say(json.dumps(found, indent=2))
    return found


@operation.command("cancel")
@click.argument("name")
@server_option
@click.pass_obj
@reports
def operation_cancel(obj: Context, name: str, server: str | None) -> dict[str, Any]:
    """Cancel an operation: a queued one never starts, a running one stops."""
    client = obj.client(need_server(server, "operation cancel"))
    op = client.cancel(name)
    client.close()
    obj.say(f"{op.name}: {pb_state(op.state)}")
    return _operation_dict(op)

