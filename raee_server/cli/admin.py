"""raee-admin's verbs for the deployment: tasks, API keys, migrations, the demo, health, serve, openapi."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from raee_server.cli import assets
from raee_server.cli.app import (
    DEMO_SENTENCES,
    EXIT_REJECTED,
    Context,
    cli,
    friendly_errors,
    reports,
    server_option,
    shipped_spec,
)
from raee_server.cli.data import ingest
from raee_server.cli.model import classify
from raee_server.serving.auth import SCOPES
from raee_server.types import DEFAULT_RETRIEVAL_KEY, RETRIEVAL_KEYS, TEXT_INPUT, TaskSpec, parse_label_flag

# -- tasks ---------------------------------------------------------------------


@cli.group()
def task() -> None:
    """Create, list, show and delete tasks (tenants)."""


@task.command("create")
@click.argument("name", required=False)
@click.option("--file", "spec_file", type=click.Path(path_type=Path), help="TOML task spec")
@click.option("--template", help="prompt template containing {text} (or a {name} slot per --input)")
@click.option("--label", "labels", multiple=True, help="label as name=word (word with its leading space), repeatable")
@click.option("--input", "inputs", multiple=True, metavar="NAME",
              help="a named input, repeatable: a sentence-pair task names two (default: one, text)")
@click.option("--retrieval-key", type=click.Choice(RETRIEVAL_KEYS), default=DEFAULT_RETRIEVAL_KEY,
              show_default=True, help="how several inputs make the retrieval key")
@click.option("--description", default="")
@server_option
@click.pass_obj
@reports
def task_create(obj: Context, name: str | None, spec_file: Path | None, template: str | None,
                labels: tuple[str, ...], inputs: tuple[str, ...], retrieval_key: str, description: str,
                server: str | None) -> dict[str, Any]:
    """Create a task from flags or from a TOML file (see raee_server/cli/tasks/*.toml)."""
    if spec_file:
        spec = TaskSpec.from_toml(spec_file)
    else:
        if not name or template is None:
            raise click.UsageError("give NAME, --template and --label ... or --file spec.toml")
        spec = TaskSpec(name, template, tuple(parse_label_flag(v) for v in labels), description,
                        inputs=inputs or (TEXT_INPUT,), retrieval_key=retrieval_key)
    if server:
        obj.client(server).create_task(spec)
    else:
        obj.engine.create_task(spec)
    obj.say(f"created task {spec.name} with labels {', '.join(spec.label_names)}")
    return {"created": spec.name, **spec.to_dict()}


@task.command("list")
@server_option
@click.pass_obj
@reports
def task_list(obj: Context, server: str | None) -> list[dict[str, Any]]:
    """List tasks with their record counts."""
    from raee_server.stores.metadata import MetadataStore

    if server:
        tasks = [(t.name, t.records, [lb.name for lb in t.labels]) for t in obj.client(server).tasks()]
    else:
        tasks = [(i.spec.name, i.records, i.spec.label_names) for i in MetadataStore(obj.settings.sql_url).list_tasks()]
    if not tasks:
        obj.say("no tasks (create one with `raee-admin task create`)")
    for name, records, labels in tasks:
        obj.say(f"{name:<20} {records:>8} records  labels: {', '.join(labels)}")
    return [{"name": n, "records": r, "labels": lb} for n, r, lb in tasks]


@task.command("show")
@click.argument("name")
@server_option
@click.pass_obj
@reports
def task_show(obj: Context, name: str, server: str | None) -> dict[str, Any]:
    """Show a task as one JSON document: its spec, records per label, `auto` choice, and the share of
    records each exit gets right (a warning on stderr when the records' label mix is imbalanced).
    With --server: the server's GetTask answer, in protobuf's JSON mapping."""
    from raee_server.stores.metadata import MetadataStore

    if server:
        from google.protobuf.json_format import MessageToDict

        from raee_server.protos.raee.v1 import raee_pb2 as pb

        message = obj.client(server).stub.GetTask(pb.GetTaskRequest(name=name)).task
        shown = MessageToDict(message, preserving_proto_field_name=True)
        obj.say(json.dumps(shown, indent=2, ensure_ascii=False))
        return shown
    store = MetadataStore(obj.settings.sql_url)
    info = store.task(name)
    shown = {**info.spec.to_dict(), "backbone": info.backbone_id, "encoder": info.encoder_id,
             "records": info.records, "label_records": info.label_records,
             "imbalanced": info.imbalanced, "created": info.created_at.isoformat(),
             "auto": info.tuned.to_dict() if info.tuned else None,
             "exit_accuracy": {str(layer): a for layer, a in store.layer_accuracy(name).items()}}
    obj.say(json.dumps(shown, indent=2, ensure_ascii=False))
    if info.imbalanced:
        mix = ", ".join(f"{label} {100 * n / info.records:.0f} %" for label, n in info.label_records.items())
        click.echo(f"warning: the records' label mix ({mix}) is far from the expected traffic's "
                   f"({', '.join(f'{lb.name} {100 * w:.0f} %' for lb, w in zip(info.spec.labels, info.spec.shares))})"
                   f"; votes are {'corrected toward it' if info.spec.prior_correction else 'NOT corrected'}",
                   err=True)
    return shown


@task.command("delete")
@click.argument("name")
@click.confirmation_option(prompt="Delete the task and all its records?")
@server_option
@click.pass_obj
@reports
def task_delete(obj: Context, name: str, server: str | None) -> dict[str, str]:
    """Delete a task from both stores."""
    if server:
        obj.client(server).delete_task(name)
    else:
        obj.engine.delete_task(name)
    obj.say(f"deleted task {name}")
    return {"deleted": name}


@cli.group()
def key() -> None:
    """API keys (stored hashed) for a server with RAEE_API_KEYS_FILE set."""


@key.command("create")
@click.option("--name", required=True, help="who the key is for")
@click.option("--task", "tasks", multiple=True, help="task the key grants (repeatable; '*' for all)")
@click.option("--scope", type=click.Choice(SCOPES), default=None,
              help="classify (answers and task info), ingest (also Ingest, delete, relabel) or admin (every RPC on "
              "every task); default ingest, or admin with --admin")
@click.option("--admin", is_flag=True, help="the same as --scope admin")
@click.option("--file", "key_file", type=click.Path(path_type=Path), help="default: RAEE_API_KEYS_FILE")
@click.pass_obj
@reports
def key_create(obj: Context, name: str, tasks: tuple[str, ...], scope: str | None, admin: bool,
               key_file: Path | None) -> dict[str, Any]:
    """Create a key: its hash goes into the key file, the key itself is printed once. A running server
    takes it from its next call on."""
    from raee_server.serving.auth import add_key

    if admin and scope not in (None, "admin"):
        raise click.UsageError(f"--admin contradicts --scope {scope}")
    scope = "admin" if admin else scope or "ingest"
    if not tasks and scope != "admin":
        raise click.UsageError("a key needs --task (repeatable) or the admin scope")
    path = key_path(obj, key_file)
    key = add_key(path, name, tasks, scope)
    obj.say(key)  # printed once: only its hash is stored
    return {"name": name, "key": key, "tasks": list(tasks), "scope": scope, "admin": scope == "admin",
            "file": str(path)}


@key.command("list")
@click.option("--file", "key_file", type=click.Path(path_type=Path), help="default: RAEE_API_KEYS_FILE")
@click.pass_obj
@reports
def key_list(obj: Context, key_file: Path | None) -> dict[str, Any]:
    """The keys the file grants: name, scope, tasks and the first 12 hex digits of the hash (no secret)."""
    from raee_server.serving.auth import list_keys

    keys = list_keys(key_path(obj, key_file))
    for k in keys:
        obj.say(f"{k['name']}\t{k['scope']}\t{','.join(k['tasks']) or '-'}\t{k['sha256']}")
    return {"keys": keys}


@key.command("revoke")
@click.argument("name", required=False)
@click.option("--sha256", help="revoke the one key whose hash starts with this (at least 6 hex digits; see key list)")
@click.option("--file", "key_file", type=click.Path(path_type=Path), help="default: RAEE_API_KEYS_FILE")
@click.pass_obj
@reports
def key_revoke(obj: Context, name: str | None, sha256: str | None, key_file: Path | None) -> dict[str, Any]:
    """Revoke every key of NAME (or one by --sha256). A running server refuses it from its next call on,
    without a restart (it reads the file again when it changes, and on SIGHUP)."""
    from raee_server.serving.auth import revoke_key

    if (name is None) == (sha256 is None):
        raise click.UsageError("give a key NAME or --sha256 PREFIX")
    if sha256 is not None and len(sha256) < 6:
        raise click.UsageError("--sha256 needs at least 6 hex digits")
    gone = revoke_key(key_path(obj, key_file), name, sha256)
    obj.say(f"revoked {len(gone)} key(s): {', '.join(gone)}")
    return {"revoked": gone}


def key_path(obj: Context, key_file: Path | None) -> Path:
    path = key_file or obj.settings.api_keys_file
    if path is None:
        raise click.UsageError("give --file or set RAEE_API_KEYS_FILE")
    return path




@cli.command()
@click.option("--revision", default="head", show_default=True, help="target revision")
@click.option("--downgrade", is_flag=True, help="downgrade to --revision (e.g. base) instead of upgrading")
@click.pass_obj
@reports
def migrate(obj: Context, revision: str, downgrade: bool) -> dict[str, Any]:
    """Migrate the metadata database (SQLite in the data dir, or RAEE_DATABASE_URL) to a schema revision."""
    from raee_server.stores import migrate as migrations
    from raee_server.stores.sql import open_engine

    obj.settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = open_engine(obj.settings.sql_url)
    before = migrations.current_revision(engine)
    (migrations.downgrade if downgrade else migrations.upgrade)(engine, revision)
    after = migrations.current_revision(engine)
    url = engine.url.render_as_string(hide_password=True)
    obj.say(f"{url}: schema {before or 'empty'} -> {after or 'base'}")
    engine.dispose()
    return {"database": url, "before": before, "after": after}


@cli.command()
@click.pass_context
@friendly_errors
def demo(ctx: click.Context) -> None:
    """Build a small sst2 database from the shipped sample if none exists, then classify a few sentences."""
    obj: Context = ctx.obj
    engine = obj.engine
    from raee_server.errors import TaskNotFound

    try:
        info = engine.task_info("sst2")
    except TaskNotFound:
        engine.create_task(shipped_spec("sst2"))
        info = engine.task_info("sst2")
    if info.records == 0:
        sample = assets.demo_sample()
        click.echo(f"building the demo database from {sample.name} ...", err=True)
        ctx.invoke(ingest, task_name="sst2", file=sample, text_column="text", label_column="label", fmt=None,
                   limit=None)
    ctx.invoke(classify, task_name="sst2", texts=tuple(DEMO_SENTENCES), policy="auto", k=None,
               show_neighbours=False)




@cli.command()
@server_option
@click.option("--timeout", default=3.0, show_default=True)
@click.option("--service", default="readiness", show_default=True, type=click.Choice(["readiness", "liveness"]),
              help="readiness: models loaded and stores reachable; liveness: the process and its worker run")
@click.pass_obj
@reports
def health(obj: Context, server: str | None, timeout: float, service: str) -> dict[str, str]:
    """Exit 0 when the server's health check says SERVING, else 1 (for container health checks).
    Uses --tls-ca (and --tls-cert, --tls-key) for a TLS server."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if not server:
        raise click.UsageError("give --server HOST:PORT (or RAEE_SERVER)")
    credentials = obj.channel_credentials()
    channel = grpc.secure_channel(server, credentials) if credentials else grpc.insecure_channel(server)
    try:
        with channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                              timeout=timeout)
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    except grpc.RpcError as exc:
        status = exc.code().name
    obj.say(f"{server}: {status}")
    if status != "SERVING":
        obj.exit_code = EXIT_REJECTED
    return {"server": server, "service": service, "status": status}



@cli.command()
@click.pass_obj
def serve(obj: Context) -> None:
    """Run the server: gRPC, HTTP/JSON and the web console (same as `raee-server`; settings from the global flags,
    RAEE_* variables and --config)."""
    from raee_server.cli.server import serve_until_stopped

    serve_until_stopped(obj.settings, "raee-admin serve")


@cli.command()
def openapi() -> None:
    """Print the HTTP/JSON API's OpenAPI document (generated from the proto; served at /openapi.json)."""
    import json

    from raee_server.serving.openapi import openapi as document

    click.echo(json.dumps(document(), indent=2, ensure_ascii=False))

