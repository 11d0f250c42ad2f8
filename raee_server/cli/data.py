"""raee-admin's verbs for records: ingest, delete and relabel, export and import, ingest batches."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from raee_server.cli.app import (
    EXIT_REJECTED,
    Context,
    cli,
    file_options,
    reports,
    rows_of,
    server_option,
    task_inputs,
)
from raee_server.errors import RunningElsewhere
from raee_server.stores.records import record_id
from raee_server.types import Rejected, Row


@cli.command()
@click.option("--task", "task_name", required=True)
@click.argument("file", type=click.Path(path_type=Path))
@file_options
@server_option
@click.pass_obj
@reports
def ingest(obj: Context, task_name: str, file: Path, text_column: str, label_column: str, fmt: str | None,
           limit: int | None, server: str | None = None) -> dict[str, Any]:
    """Append labelled rows (TSV/CSV/JSONL with text and label columns) to a task's exit database."""
    inputs = task_inputs(obj, task_name, server)
    total = sum(1 for _ in rows_of(file, text_column, label_column, fmt, limit, inputs))  # fails before writing
    if server:
        click.echo(f"streaming {total} rows to {server} ...", err=True)
        client = obj.client(server, timeout=3600)
        report = client.ingest(task_name, rows_of(file, text_column, label_column, fmt, limit, inputs))
        client.close()
    else:
        engine = obj.engine
        with tqdm(total=total, unit="row", desc=f"ingest {task_name}", file=sys.stderr) as bar:
            report = engine.ingest(task_name, rows_of(file, text_column, label_column, fmt, limit, inputs),
                                   source=str(file), progress=bar.update)
        if report.added:
            click.echo("indexing the new records ...", err=True)
            engine.build_index()
            from raee_server.core import auto
            from raee_server.serving.claims import holding, replica_name

            def maintain() -> None:
                for step in auto.maintenance(engine, task_name):  # here, not on a later request
                    if step == "fit-heads":
                        heads = auto.fit_task_heads(engine, task_name)
                        click.echo(f"exit heads v{heads.version} for {task_name}: best exit {heads.best_exit} "
                                   f"({100 * heads.accuracy[heads.best_exit]:.1f}% out of fold)", err=True)
                    else:
                        choice = auto.tune(engine, task_name)
                        click.echo(f"auto for {task_name}: {choice.policy} with k = {choice.k}", err=True)

            try:  # servers over the same database take turns with it
                if auto.due(engine, task_name):
                    holding(engine.metadata, task_name, replica_name(engine.settings, "raee-admin:"),
                            engine.settings.lease_seconds, maintain)
            except RunningElsewhere as exc:  # the rows are in; that server refits them
                click.echo(f"not fitting here: {exc}", err=True)
    for rej in report.rejected:
        click.echo(f"{file}:{rej.line}: rejected: {rej.reason}", err=True)
    obj.say(f"added {report.added}, already present {report.present}, rejected {len(report.rejected)}")
    if report.rejected:
        click.echo(f"error: {len(report.rejected)} row(s) rejected; the other rows were ingested", err=True)
        obj.exit_code = EXIT_REJECTED
    return {"task": task_name, "file": str(file), "added": report.added, "already_present": report.present,
            "rejected": [{"line": r.line, "reason": r.reason} for r in report.rejected]}


@cli.group()
def records() -> None:
    """Delete or relabel a task's records (by id, exact text or ingest batch), here or on a server."""


@records.command("delete")
@click.option("--task", "task_name", required=True)
@click.option("--id", "ids", multiple=True, help="record id (repeatable)")
@click.option("--text", "texts", multiple=True, help="exact text of a record (repeatable)")
@click.option("--batch", type=int, help="every record whose latest ingest was this batch (see ingest-batches)")
@click.confirmation_option(prompt="Delete these records from both stores?")
@server_option
@click.pass_obj
@reports
def records_delete(obj: Context, task_name: str, ids: tuple[str, ...], texts: tuple[str, ...], batch: int | None,
                   server: str | None) -> dict[str, Any]:
    """Delete records: vectors, SQL rows and exit features together (a crash in between is finished
    by `doctor --repair`). Names that match no record are not an error; a malformed id is."""
    if not (ids or texts or batch is not None):
        raise click.UsageError("name the records: --id, --text or --batch")
    if server:
        deleted = obj.client(server).delete_records(task_name, ids, texts, batch)
    else:
        deleted = obj.engine.delete_records(task_name, ids, texts, batch)
    obj.say(f"deleted {len(deleted)} record(s) from {task_name}")
    return {"task": task_name, "deleted": deleted}


@records.command("relabel")
@click.option("--task", "task_name", required=True)
@click.option("--label", help="the new label of every record named by --id or --text")
@click.option("--id", "ids", multiple=True, help="record id (repeatable)")
@click.option("--text", "texts", multiple=True, help="exact text of a record (repeatable)")
@click.option("--file", "file", type=click.Path(path_type=Path), help="rows of text and new label (by text)")
@file_options
@server_option
@click.pass_obj
@reports
def records_relabel(obj: Context, task_name: str, label: str | None, ids: tuple[str, ...], texts: tuple[str, ...],
                    file: Path | None, text_column: str, label_column: str, fmt: str | None, limit: int | None,
                    server: str | None) -> dict[str, Any]:
    """Give records new labels; each is recomputed from its text (one forward)."""
    wanted: list[tuple[str | None, str | None, str]] = []
    if ids or texts:
        if not label:
            raise click.UsageError("--label: the new label of the records named by --id or --text")
        wanted += [(i, None, label) for i in ids] + [(None, t, label) for t in texts]
    if file:
        rows = list(rows_of(file, text_column, label_column, fmt, limit, task_inputs(obj, task_name, server)))
        bad = [r for r in rows if isinstance(r, Rejected)]
        if bad:
            raise click.UsageError(f"{file}:{bad[0].line}: {bad[0].reason}")
        wanted += [(None, r.text, r.label) for r in rows if isinstance(r, Row)]
    if not wanted:
        raise click.UsageError("name the records: --id or --text with --label, or --file")
    if server:
        done, missing = obj.client(server).relabel(task_name, wanted)
    else:
        engine = obj.engine
        by_id = {(i or record_id(task_name, t or "")): (i or t or "", lb) for i, t, lb in wanted}
        done, missing_ids = engine.relabel(task_name, {rid: lb for rid, (_, lb) in by_id.items()})
        missing = [by_id[rid][0] for rid in missing_ids]
    for name in missing:
        click.echo(f"not found in {task_name}: {name}", err=True)
    obj.say(f"relabelled {done} record(s) of {task_name}; {len(missing)} not found")
    if missing:
        obj.exit_code = EXIT_REJECTED
    return {"task": task_name, "relabelled": done, "not_found": missing}


@cli.command("export")
@click.option("--task", "task_name", required=True)
@click.argument("file", type=click.Path(path_type=Path))
@click.pass_obj
@reports
def export_cmd(obj: Context, task_name: str, file: Path) -> dict[str, Any]:
    """Write a task to one portable file (records, keys, exit information, features, heads, `auto`'s
    choice; gzip JSON lines with a checksum), for `raee-admin import` in another deployment."""
    from raee_server.core import transfer

    engine = obj.engine
    total = engine.task_info(task_name).records
    with tqdm(total=total, unit="record", desc=f"export {task_name}", file=sys.stderr) as bar:
        written = transfer.export_task(engine, task_name, file, progress=bar.update)
    obj.say(f"exported {written} records of {task_name} to {file}")
    return {"task": task_name, "file": str(file), "records": written, "bytes": file.stat().st_size}


@cli.command("import")
@click.argument("file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.pass_obj
@reports
def import_cmd(obj: Context, file: Path) -> dict[str, Any]:
    """Create a task from a `raee-admin export` file in this deployment (its SQL database and vector
    store, e.g. RAEE_DATABASE_URL and RAEE_QDRANT_URL): no backbone forward. The file's checksum, the
    backbone and the key encoder are checked before anything is written."""
    from raee_server.core import transfer

    engine = obj.engine
    with tqdm(total=None, unit="record", desc=f"import {file.name}", file=sys.stderr) as bar:
        name, count = transfer.import_task(engine, file, progress=bar.update)
    engine.build_index()
    obj.say(f"imported {count} records of {name} from {file}")
    return {"task": name, "file": str(file), "records": count}


@cli.command("ingest-batches")
@click.option("--task", "task_name", help="only this task's batches")
@click.option("--limit", default=20, show_default=True, help="newest N batches")
@click.pass_obj
@reports
def ingest_batches(obj: Context, task_name: str | None, limit: int) -> list[dict[str, Any]]:
    """List ingest batches, newest first, with how each ended (done, cancelled, failed, interrupted).

    Reads the metadata database directly (it may be shared with a running server). A batch
    `cancelled` by its client kept the chunks written before (see its counts); re-sending the
    same rows adds only the missing ones.
    """
    from raee_server.stores.metadata import MetadataStore

    batches = MetadataStore(obj.settings.sql_url).list_batches(task_name, limit)
    if not batches:
        obj.say("no ingest batches")
    for b in batches:
        ended = b.finished_at.strftime("%Y-%m-%d %H:%M:%S") if b.finished_at else "-"
        obj.say(f"#{b.id:<5} {b.task:<16} {b.status:<11} added {b.added:>6}  present {b.present:>6}  "
                f"rejected {b.rejected:>4}  ended {ended}  {b.source}")
    return [{**vars(b), "started_at": b.started_at.isoformat(),
             "finished_at": b.finished_at.isoformat() if b.finished_at else None} for b in batches]


