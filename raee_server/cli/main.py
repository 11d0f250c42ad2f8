"""`raee-admin`: manage tasks, ingest labelled data, classify, evaluate, and run the demo.

Exit codes (the same for every command):
  0  done
  1  done, but some input was rejected or a check failed (ingest rejections, doctor, health)
  2  usage: a bad flag, argument or combination (nothing was done)
  3  refused: invalid input, an unknown task, a missing permission
  4  unavailable: the server or a store cannot be reached, or the store is held by a running server

Every command that reports takes --json (also before the command: `raee-admin --json ...`):
one JSON document on stdout and nothing else; progress and warnings go to stderr.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import sys
from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any, TypeVar

import click
from tqdm import tqdm

from raee_server.cli import assets
from raee_server.cli.config import load_settings, run_one_line, settings_options
from raee_server.core.datafile import FORMATS, read_rows
from raee_server.errors import RaeeError
from raee_server.serving.auth import SCOPES
from raee_server.settings import Settings
from raee_server.stores.records import record_id
from raee_server.types import Rejected, Row, TaskSpec, parse_label_flag

F = TypeVar("F", bound=Callable[..., Any])
EXIT_REJECTED, EXIT_USAGE, EXIT_REFUSED, EXIT_UNAVAILABLE = 1, 2, 3, 4
# The server's own certificate and key: raee-admin's --tls-cert/--tls-key are the client's (mutual TLS), so
# `raee-admin serve` takes the server's from RAEE_TLS_CERT / RAEE_TLS_KEY or --config.
SERVER_TLS = ("tls_cert", "tls_key")

DEMO_SENTENCES = [
    "a gorgeous, witty and deeply moving film",
    "the plot is a tedious mess and the jokes fall flat",
    "an unremarkable sequel that nobody asked for",
]


class Context:
    """Settings from flags and RAEE_* variables; the engine is opened on first use (it loads models)."""

    def __init__(self, settings: Settings, api_key: str | None = None, tls_ca: Path | None = None,
                 tls_cert: Path | None = None, tls_key: Path | None = None) -> None:
        self.settings = settings
        self.api_key = api_key
        self.tls_ca, self.tls_cert, self.tls_key = tls_ca, tls_cert, tls_key
        self.server: str | None = None  # raee-admin --server HOST:PORT, before the command
        self.json = False  # --json: stdout carries one JSON document, the command's report
        self.exit_code = 0  # set by a command that finished but must say something failed (EXIT_REJECTED)
        self._engine: Any = None

    def say(self, text: str) -> None:
        """A line of the human report (stdout); with --json the JSON document replaces them."""
        if not self.json:
            click.echo(text)

    def channel_credentials(self) -> Any:
        """TLS for a client call: the server's CA, and a client certificate for mutual TLS."""
        import grpc

        if self.tls_ca is None:
            if self.tls_cert or self.tls_key:
                raise click.UsageError("--tls-cert and --tls-key need --tls-ca (the server's CA)")
            return None
        if bool(self.tls_cert) != bool(self.tls_key):
            raise click.UsageError("give --tls-cert and --tls-key together (the client certificate and its key)")
        return grpc.ssl_channel_credentials(self.tls_ca.read_bytes(),
                                            private_key=self.tls_key.read_bytes() if self.tls_key else None,
                                            certificate_chain=self.tls_cert.read_bytes() if self.tls_cert else None)

    def client(self, server: str, timeout: float = 60.0) -> Any:
        from raee_server.client import RaeeClient

        self.channel_credentials()  # checks the TLS options
        read = (lambda p: p.read_bytes() if p else None)  # noqa: E731
        return RaeeClient(server, timeout, self.api_key, read(self.tls_ca), read(self.tls_cert), read(self.tls_key))

    @property
    def engine(self) -> Any:
        """The local stores and models. A command reaches here only when it runs locally: with a
        server named (--server before the command, or RAEE_SERVER) that is a mistake, refused."""
        if self.server:
            verb = click.get_current_context().command_path.removeprefix("raee-admin ").strip()
            raise click.UsageError(f"`{verb}` runs on this machine's stores, not on a server, and a server is named "
                                   f"({self.server}): drop --server / unset RAEE_SERVER to run it here")
        if self._engine is None:
            from raee_server.core.engine import Engine

            click.echo(f"loading backbone {self.settings.backbone} and encoder {self.settings.encoder} ...", err=True)
            self._engine = Engine.open(self.settings)
        return self._engine

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()


def exit_code_of(exc: BaseException) -> int:
    """The one place that decides a failed command's exit code (see the module docstring)."""
    import grpc

    from raee_server.errors import DeadlineExpired, NotReady, Overloaded

    if isinstance(exc, (NotReady, Overloaded, DeadlineExpired, ConnectionError)):
        return EXIT_UNAVAILABLE
    if isinstance(exc, grpc.RpcError):
        code = exc.code() if callable(getattr(exc, "code", None)) else None
        unavailable = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                       grpc.StatusCode.RESOURCE_EXHAUSTED)
        return EXIT_UNAVAILABLE if code in unavailable else EXIT_REFUSED
    return EXIT_REFUSED


def friendly_errors(func: F) -> F:
    """Report a failure as one line on stderr with its exit code: never a traceback for a user mistake
    or an unreachable service."""
    import grpc

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (RaeeError, ConnectionError) as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exit_code_of(exc))
        except grpc.RpcError as exc:  # a call the client does not type (e.g. health, benchmarks)
            details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
            click.echo(f"error: server: {exc.code().name}: {details}", err=True)
            sys.exit(exit_code_of(exc))

    return wrapper  # type: ignore[return-value]


def reports(func: F) -> F:
    """A command that reports: adds --json, turns failures into exit codes (friendly_errors), and, with
    --json, prints what the command returns as one JSON document (its human lines, `obj.say`, are not
    printed). A command that must also fail (rejected rows) sets obj.exit_code; it is applied after."""

    @click.option("--json", "as_json", is_flag=True, help="print one JSON document on stdout, nothing else")
    @functools.wraps(func)
    def wrapper(*args: Any, as_json: bool = False, **kwargs: Any) -> Any:
        obj = click.get_current_context().find_object(Context)
        assert obj is not None
        obj.json = obj.json or as_json
        result = friendly_errors(func)(*args, **kwargs)
        if obj.json:
            click.echo(json.dumps(result, ensure_ascii=False, default=str))
        if obj.exit_code:
            sys.exit(obj.exit_code)
        return result

    return wrapper  # type: ignore[return-value]


POLICY_HELP = ("exit policy: auto (the task's tuned choice), paper, full, static:<layer>, paper-all, paper-tol:<t>, "
               "confidence:<t>, knn-vote, knn-agree[:<bound>]; with exit heads heads[:<layer>], paper-heads, "
               "knn-heads[:<t>[:<bound>]], cascade[:<margin>[:<bound>]]")


def shipped_spec(name: str) -> TaskSpec:
    """A task spec that ships with the package (raee_server/cli/tasks), or a usage error naming those that do."""
    spec = assets.task_spec(name)
    if spec is None:
        raise click.UsageError(f"no shipped task spec {name!r}; shipped: {', '.join(assets.task_spec_names())}")
    return spec


@click.group()
@click.version_option(version("raee-serve"), prog_name="raee-admin")
@click.option("--api-key", envvar="RAEE_API_KEY", help="key for a server that requires one [RAEE_API_KEY]")
@click.option("--tls-ca", envvar="RAEE_TLS_CA", type=click.Path(path_type=Path),
              help="CA certificate (PEM) of a TLS server [RAEE_TLS_CA]")
@click.option("--tls-cert", envvar="RAEE_TLS_CLIENT_CERT", type=click.Path(path_type=Path),
              help="client certificate (PEM) for a server that requires one (mutual TLS) [RAEE_TLS_CLIENT_CERT]")
@click.option("--tls-key", envvar="RAEE_TLS_CLIENT_KEY", type=click.Path(path_type=Path),
              help="the client certificate's private key (PEM) [RAEE_TLS_CLIENT_KEY]")
@click.option("--json", "as_json", is_flag=True, help="every command that reports prints one JSON document")
@click.option("--server", envvar="RAEE_SERVER", metavar="HOST:PORT",
              help="send the work of every command that can to this running raee-server [RAEE_SERVER]")
@click.option("-v", "--verbose", is_flag=True, help="log progress of model loading and conversion")
@settings_options(skip=SERVER_TLS)
@click.pass_context
def cli(ctx: click.Context, verbose: bool, api_key: str | None, tls_ca: Path | None, tls_cert: Path | None,
        tls_key: Path | None, as_json: bool, server: str | None, config_file: Path | None, **overrides: Any) -> None:
    """Administer a RAEE (retrieval-augmented early exit) inference service.

    Exit codes: 0 done; 1 done, some input rejected or a check failed; 2 usage error; 3 refused
    (invalid input, unknown task, permission); 4 the server or a store is unavailable."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    settings = load_settings(overrides, config_file)
    ctx.obj = Context(settings, api_key, tls_ca, tls_cert, tls_key)
    ctx.obj.server = server
    ctx.obj.json = as_json
    ctx.call_on_close(ctx.obj.close)


def _global_server(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """A command's own --server, else the one given before the command (raee-admin --server ...)."""
    found = ctx.find_object(Context)
    return value or (found.server if found else None)


server_option = click.option(
    "--server", metavar="HOST:PORT", callback=_global_server,
    help="send the work to a running raee-server instead of opening the stores (also before the command)")


# -- tasks ---------------------------------------------------------------------


@cli.group()
def task() -> None:
    """Create, list, show and delete tasks (tenants)."""


@task.command("create")
@click.argument("name", required=False)
@click.option("--file", "spec_file", type=click.Path(path_type=Path), help="TOML task spec")
@click.option("--template", help="prompt template containing {text}")
@click.option("--label", "labels", multiple=True, help="label as name=word (word with its leading space), repeatable")
@click.option("--description", default="")
@server_option
@click.pass_obj
@reports
def task_create(obj: Context, name: str | None, spec_file: Path | None, template: str | None,
                labels: tuple[str, ...], description: str, server: str | None) -> dict[str, Any]:
    """Create a task from flags or from a TOML file (see raee_server/cli/tasks/*.toml)."""
    if spec_file:
        spec = TaskSpec.from_toml(spec_file)
    else:
        if not name or template is None:
            raise click.UsageError("give NAME, --template and --label ... or --file spec.toml")
        spec = TaskSpec(name, template, tuple(parse_label_flag(v) for v in labels), description)
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


# -- data ----------------------------------------------------------------------


def _file_options(func: F) -> F:
    for option in reversed([
        click.option("--text-column", default="text", show_default=True),
        click.option("--label-column", default="label", show_default=True),
        click.option("--format", "fmt", type=click.Choice(FORMATS), help="default: from the file extension"),
        click.option("--limit", type=int, help="use only the first N data rows"),
    ]):
        func = option(func)
    return func


def _rows(
    path: Path, text_column: str, label_column: str, fmt: str | None, limit: int | None
) -> Iterator[Row | Rejected]:
    return itertools.islice(read_rows(path, text_column, label_column, fmt), limit)


@cli.command()
@click.option("--task", "task_name", required=True)
@click.argument("file", type=click.Path(path_type=Path))
@_file_options
@server_option
@click.pass_obj
@reports
def ingest(obj: Context, task_name: str, file: Path, text_column: str, label_column: str, fmt: str | None,
           limit: int | None, server: str | None = None) -> dict[str, Any]:
    """Append labelled rows (TSV/CSV/JSONL with text and label columns) to a task's exit database."""
    total = sum(1 for _ in _rows(file, text_column, label_column, fmt, limit))  # reads it all: fails before writing
    if server:
        click.echo(f"streaming {total} rows to {server} ...", err=True)
        client = obj.client(server, timeout=3600)
        report = client.ingest(task_name, _rows(file, text_column, label_column, fmt, limit))
        client.close()
    else:
        engine = obj.engine
        with tqdm(total=total, unit="row", desc=f"ingest {task_name}", file=sys.stderr) as bar:
            report = engine.ingest(task_name, _rows(file, text_column, label_column, fmt, limit), source=str(file),
                                   progress=bar.update)
        if report.added:
            click.echo("indexing the new records ...", err=True)
            engine.build_index()
            from raee_server.core import auto

            if auto.needs_heads(engine, task_name):  # here, not on a later request
                heads = auto.fit_task_heads(engine, task_name)
                click.echo(f"exit heads v{heads.version} for {task_name}: best exit {heads.best_exit} "
                           f"({100 * heads.accuracy[heads.best_exit]:.1f}% out of fold)", err=True)
            if auto.needs_tuning(engine, task_name) or auto.needs_tuning_after_heads(engine, task_name):
                choice = auto.tune(engine, task_name)
                click.echo(f"auto for {task_name}: {choice.policy} with k = {choice.k}", err=True)
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
@_file_options
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
        rows = list(_rows(file, text_column, label_column, fmt, limit))
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


@cli.command()
@click.option("--task", "task_name", required=True)
@click.argument("texts", nargs=-1, required=True)
@click.option("--policy", default="auto", show_default=True, help=POLICY_HELP)
@click.option("--k", type=int, help="neighbours to retrieve (default 12)")
@click.option("--neighbours", "show_neighbours", is_flag=True, help="print the retrieved neighbours")
@server_option
@click.pass_obj
@reports
def classify(obj: Context, task_name: str, texts: tuple[str, ...], policy: str | None, k: int | None,
             show_neighbours: bool, server: str | None = None) -> list[dict[str, Any]]:
    """Classify texts with early exit: prints label, exit layer and label scores."""
    if server:
        client = obj.client(server)
        labels = client.labels(task_name)
        predictions = client.classify(task_name, list(texts), policy, k, neighbours=show_neighbours)
        client.close()
    else:
        engine = obj.engine
        labels = engine.task_info(task_name).spec.label_names
        predictions = engine.classify(task_name, list(texts), policy=policy, k=k)
    answers = []
    for text, pred in zip(texts, predictions):
        scores = dict(zip(labels, pred.scores))
        answer: dict[str, Any] = {"text": text, "label": pred.label, "exit_layer": pred.exit_layer,
                                  "depth": pred.depth, "policy": pred.policy, "answered_by": pred.answered_by,
                                  "covered": pred.covered, "scores": scores, "timings_us": pred.timings_us}
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


@cli.command("eval")
@click.option("--task", "task_name", required=True)
@click.argument("file", type=click.Path(path_type=Path))
@_file_options
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

    items = list(_rows(file, text_column, label_column, fmt, limit))
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


def data_option(help_text: str = "folder with <task>/train.tsv and <task>/dev.tsv") -> Callable[[F], F]:
    """The benchmarks' --data: labelled files per task, the checkout's corpora/ by default."""
    return click.option("--data", "data_root", type=click.Path(path_type=Path),
                        default=Path(__file__).resolve().parents[2] / "corpora",
                        show_default="corpora/ of the checkout", help=help_text)


@cli.command()
@click.argument("tasks", nargs=-1, required=True)
@data_option()
@click.option("--train-rows", default=5000, show_default=True, help="database: the first N train rows")
@click.option("--dev-rows", default=500, show_default=True, help="measured: the first N dev rows")
@click.option("--k", default=12, show_default=True)
@click.option("--latency-rows", default=48, show_default=True, help="served requests timed per policy")
@click.option("--sweep", "sweeps", multiple=True, type=click.Choice(["k", "size", "encoder"]),
              default=["k", "size", "encoder"], show_default=True)
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
    from raee_server.bench import harness
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
        harness.print_summary(report, obj.say)
        done.append(report)
    command = "raee-admin " + " ".join(sys.argv[1:])
    written = [str(path) for path in harness.write_reports(done, out, command)]
    for path in written:
        obj.say(f"wrote {path}")
    for other in others:
        other.vectors.close()
    return {"tasks": list(tasks), "written": written}


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
@click.option("--server", required=True, metavar="HOST:PORT", help="a server on this machine (loopback only)")
@click.option("--task", "task_name", required=True)
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--policy", "policies", multiple=True, default=["auto", "full"], show_default=True)
@click.option("--clients", default=16, show_default=True)
@click.option("--seconds", default=30.0, show_default=True)
@click.option("--sequential", default=50, show_default=True, help="one-at-a-time requests per policy")
@click.option("--json-out", type=click.Path(path_type=Path))
@click.pass_obj
@reports
def loadtest(obj: Context, server: str, task_name: str, file: Path, policies: tuple[str, ...], clients: int,
             seconds: float, sequential: int, json_out: Path | None) -> dict[str, Any]:
    """Policies side by side against a running server: sequential latency, then N concurrent clients."""
    from raee_server.bench.soak import compare_policies

    texts = [r.text for r in read_rows(file) if isinstance(r, Row)]
    results = compare_policies(server, task_name, texts, policies, clients, seconds, sequential, obj.api_key)
    obj.say(f"{'policy':<12} {'seq p50 ms':>10} {'rps':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>6}")
    for name, r in results.items():
        obj.say(f"{name:<12} {r['sequential_p50_ms']:>10.1f} {r['throughput_rps']:>7.2f} {r['p50_ms']:>8.1f} "
                f"{r['p95_ms']:>8.1f} {r['p99_ms']:>8.1f} {int(r['errors']):>6}")
    if json_out:
        json_out.write_text(json.dumps(results, indent=2))
    return results


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


def on_server(obj: Context, server: str, method: str, request: Any, task: str = "") -> dict[str, Any]:
    """Run a verb's work as an operation of the server: start it, show its progress, return its
    report. Ctrl-C cancels the operation on the server, not only this command."""
    client = obj.client(server)
    try:
        op = client.start(method, request, task)
        click.echo(f"{op.kind} {task}: operation {op.name} on {server} (Ctrl-C cancels it)".replace("  ", " "),
                   err=True)
        with tqdm(desc=op.kind, file=sys.stderr, unit="") as bar:
            def show(op: Any) -> None:
                bar.total = op.progress_total or None
                bar.n = op.progress_done
                bar.set_postfix_str(op.progress_message, refresh=True)

            try:
                return client.wait(op, show)
            except KeyboardInterrupt:
                client.cancel(op.name)
                click.echo(f"cancelled operation {op.name} on {server}", err=True)
                sys.exit(130)
    finally:
        client.close()


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
        engine = obj.engine
        heads = auto.fit_task_heads(engine, task_name, progress=lambda m: click.echo(f"  {m}", err=True), full=full)
        summary = {**heads.summary(), "auto": auto.tune(engine, task_name).to_dict()}
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


def pb_state(state: int) -> str:
    from raee_server.protos.raee.v1 import raee_pb2 as pb

    return pb.Operation.State.Name(state).removeprefix("STATE_").lower()


def need_server(server: str | None, verb: str) -> str:
    if not server:
        raise click.UsageError(f"{verb} reads a running server's operations: give --server HOST:PORT (or RAEE_SERVER)")
    return server


@cli.command()
@click.option("--revision", default="head", show_default=True, help="target revision")
@click.option("--downgrade", is_flag=True, help="downgrade to --revision (e.g. base) instead of upgrading")
@click.pass_obj
@reports
def migrate(obj: Context, revision: str, downgrade: bool) -> dict[str, Any]:
    """Migrate the metadata database (SQLite in the data dir, or RAEE_DATABASE_URL) to a schema revision."""
    from raee_server.stores import migrate as migrations
    from raee_server.stores.metadata import open_engine

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


def main(args: list[str] | None = None) -> None:
    run_one_line(cli, "raee-admin", args)


if __name__ == "__main__":
    main()
