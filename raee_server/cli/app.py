"""`raee-admin`'s group, its shared options and helpers (the verbs live beside it, by role; main.py
assembles them). `raee-admin`: manage tasks, ingest labelled data, classify, evaluate, and run the demo.

Exit codes (the same for every command):
  0  done
  1  done, but some input was rejected or a check failed (ingest rejections, doctor, health)
  2  usage: a bad flag, argument or combination (nothing was done)
  3  refused: invalid input, an unknown task, a missing permission
  4  unavailable: the server or a store cannot be reached, the store is held by a running server, or a
     server is fitting or tuning the task now (try again later)

Every command that reports takes --json (also before the command: `raee-admin --json ...`):
one JSON document on stdout and nothing else; progress and warnings go to stderr.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any, TypeVar

import click
from tqdm import tqdm

from raee_server.cli import assets
from raee_server.cli.config import load_settings, settings_options
from raee_server.core.datafile import FORMATS, read_rows
from raee_server.errors import RaeeError
from raee_server.settings import Settings
from raee_server.types import Rejected, Row, TaskSpec

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

    from raee_server.errors import DeadlineExpired, NotReady, Overloaded, RunningElsewhere

    if isinstance(exc, (NotReady, Overloaded, DeadlineExpired, RunningElsewhere, ConnectionError)):
        return EXIT_UNAVAILABLE
    if isinstance(exc, grpc.RpcError):
        code = exc.code() if callable(getattr(exc, "code", None)) else None
        unavailable = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                       grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED)
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



# -- shared by the verbs ------------------------------------------------------------

def file_options(func: F) -> F:
    for option in reversed([
        click.option("--text-column", default="text", show_default=True),
        click.option("--label-column", default="label", show_default=True),
        click.option("--format", "fmt", type=click.Choice(FORMATS), help="default: from the file extension"),
        click.option("--limit", type=int, help="use only the first N data rows"),
    ]):
        func = option(func)
    return func


def rows_of(
    path: Path, text_column: str, label_column: str, fmt: str | None, limit: int | None,
    inputs: Sequence[str] = (),
) -> Iterator[Row | Rejected]:
    """A file's labelled rows; a task with several `inputs` reads a column per input."""
    return itertools.islice(read_rows(path, text_column, label_column, fmt, inputs), limit)


def task_inputs(obj: Context, task_name: str, server: str | None) -> list[str]:
    """The task's named inputs (`text` alone for a single-text task), from the server or the stores."""
    if server:
        client = obj.client(server)
        try:
            return client.inputs(task_name)
        finally:
            client.close()
    return list(obj.engine.spec(task_name).inputs)



def data_option(help_text: str = "folder with <task>/train.tsv and <task>/dev.tsv") -> Callable[[F], F]:
    """The benchmarks' --data: labelled files per task, the checkout's corpora/ by default."""
    return click.option("--data", "data_root", type=click.Path(path_type=Path),
                        default=Path(__file__).resolve().parents[2] / "corpora",
                        show_default="corpora/ of the checkout", help=help_text)


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


def pb_state(state: int) -> str:
    from raee_server.protos.raee.v1 import raee_pb2 as pb

    return pb.Operation.State.Name(state).removeprefix("STATE_").lower()


def need_server(server: str | None, verb: str) -> str:
    if not server:
        raise click.UsageError(f"{verb} reads a running server's operations: give --server HOST:PORT (or RAEE_SERVER)")
    return server
