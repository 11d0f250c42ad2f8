"""Access control: per-tenant API keys (stored hashed), admin keys, TLS and mutual TLS."""

from __future__ import annotations

import datetime
import http.client
import json
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from raee_server.errors import InvalidInput
from raee_server.protos.raee.v1 import raee_pb2 as pb
from raee_server.protos.raee.v1 import raee_pb2_grpc as pb_grpc
from raee_server.serving.auth import add_key

from .grpc_harness import ServerThread
from .http_stub import HttpStub
from .test_grpc import code_of, make_settings, tiny_engine_factory

LABELS = [pb.Label(name="negative", word=" negative"), pb.Label(name="positive", word=" positive")]


@pytest.fixture
def keyed(tmp_path: Path) -> Iterator[tuple[ServerThread, dict[str, str]]]:
    key_file = tmp_path / "keys.toml"
    keys = {"admin": add_key(key_file, "ops", [], scope="admin"),
            "sentiment": add_key(key_file, "team-a", ["sentiment"], scope="ingest"),
            "other": add_key(key_file, "team-b", ["other"], scope="ingest")}
    settings = make_settings(tmp_path, api_keys_file=key_file)
    server = ServerThread(settings, tiny_engine_factory(tmp_path, settings))
    server.wait_ready()
    yield server, keys
    server.stop()


def md(key: str) -> list[tuple[str, str]]:
    return [("x-api-key", key)]


def test_keys_are_stored_hashed(keyed, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, keys = keyed
    stored = (tmp_path / "keys.toml").read_text()
    assert all(k not in stored for k in keys.values()) and stored.count("sha256 =") == 3


def _stub(server: ServerThread, transport: str) -> Any:
    """The same calls over gRPC or over the HTTP/JSON gateway (the key in the x-api-key header)."""
    return server.stub if transport == "grpc" else HttpStub(server.server.http_port)


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_a_key_grants_its_own_tenant_only(keyed, transport: str) -> None:  # type: ignore[no-untyped-def]
    server, keys = keyed
    stub = _stub(server, transport)
    request = pb.ClassifyRequest(task="sentiment", text="a great film")
    assert code_of(lambda: stub.Classify(request))[0] == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(lambda: stub.Classify(request, metadata=md("raee_wrong")))[0] == grpc.StatusCode.UNAUTHENTICATED
    assert stub.Classify(request, metadata=md(keys["sentiment"])).label
    code, details = code_of(lambda: stub.Classify(request, metadata=md(keys["other"])))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "does not grant task 'sentiment'" in details
    ingest = pb.IngestRequest(task="sentiment", examples=[pb.Example(text="good", label="positive")])
    assert code_of(lambda: stub.Ingest(iter([ingest]), metadata=md(keys["other"])))[0] == \
        grpc.StatusCode.PERMISSION_DENIED
    assert stub.Ingest(iter([ingest]), metadata=md(keys["sentiment"])).added == 1
    stream = [pb.ClassifyStreamRequest(task="sentiment", text="good")] * 2
    assert len(list(stub.ClassifyStream(iter(stream), metadata=md(keys["sentiment"])))) == 2
    # A stream names a task per message: a task the key does not grant fails that message alone.
    denied = list(stub.ClassifyStream(iter(stream), metadata=md(keys["other"])))
    assert [(r.index, r.error.code) for r in denied] == [(0, grpc.StatusCode.PERMISSION_DENIED.value[0]),
                                                          (1, grpc.StatusCode.PERMISSION_DENIED.value[0])]
    assert "does not grant task 'sentiment'" in denied[0].error.message and not denied[0].HasField("result")
    # No key at all: the whole stream is refused.
    with pytest.raises(grpc.RpcError) as info:
        list(stub.ClassifyStream(iter(stream)))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_admin_rpcs_need_an_admin_key(keyed, transport: str) -> None:  # type: ignore[no-untyped-def]
    server, keys = keyed
    stub = _stub(server, transport)
    create = pb.CreateTaskRequest(name="other", template="{text} :", labels=LABELS)
    code, details = code_of(lambda: stub.CreateTask(create, metadata=md(keys["other"])))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "admin" in details
    assert stub.CreateTask(create, metadata=md(keys["admin"])).task.name == "other"
    assert stub.Classify(pb.ClassifyRequest(task="other", text="x"), metadata=md(keys["other"])).label
    assert code_of(lambda: stub.ListTasks(pb.ListTasksRequest(), metadata=md(keys["sentiment"])))[0] == \
        grpc.StatusCode.PERMISSION_DENIED
    if transport == "http":  # HTTP also takes the key as a bearer token
        assert stub.ListTasks(pb.ListTasksRequest(), metadata=[("authorization", f"Bearer {keys['admin']}")]).tasks
    health = server.channel.unary_unary("/grpc.health.v1.Health/Check")
    assert health(b"") is not None  # health checks need no key


def _cert(name: str, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None, ca: bool) -> tuple[bytes, bytes,
                                                                                                   x509.Name, object]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = issuer if issuer else (subject, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
    cert = builder.sign(issuer_key, hashes.SHA256())
    pem_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), pem_key, subject, key


@pytest.mark.parametrize("mutual", [False, True])
def test_tls_and_mutual_tls(tmp_path: Path, mutual: bool) -> None:
    ca_pem, _, ca_name, ca_key = _cert("raee test CA", None, ca=True)
    server_pem, server_key, _, _ = _cert("localhost", (ca_name, ca_key), ca=False)
    client_pem, client_key, _, _ = _cert("client", (ca_name, ca_key), ca=False)
    for name, data in (("ca.pem", ca_pem), ("server.pem", server_pem), ("server.key", server_key),
                       ("client.pem", client_pem), ("client.key", client_key)):
        (tmp_path / name).write_bytes(data)
    settings = make_settings(tmp_path, address="localhost:0", tls_cert=tmp_path / "server.pem",
                             tls_key=tmp_path / "server.key", tls_client_ca=(tmp_path / "ca.pem") if mutual else None)
    server = ServerThread(settings, tiny_engine_factory(tmp_path, settings))
    try:
        server.wait_ready()
        target = f"localhost:{server.port}"
        request = pb.ClassifyRequest(task="sentiment", text="good")
        plaintext = pb_grpc.RaeeServiceStub(grpc.insecure_channel(target))
        assert code_of(lambda: plaintext.Classify(request, timeout=3))[0] == grpc.StatusCode.UNAVAILABLE
        no_cert = pb_grpc.RaeeServiceStub(grpc.secure_channel(target, grpc.ssl_channel_credentials(ca_pem)))
        if mutual:
            assert code_of(lambda: no_cert.Classify(request, timeout=3))[0] == grpc.StatusCode.UNAVAILABLE
            with_cert = pb_grpc.RaeeServiceStub(grpc.secure_channel(target, grpc.ssl_channel_credentials(
                ca_pem, private_key=client_key, certificate_chain=client_pem)))
            assert with_cert.Classify(request, timeout=10).label
        else:
            assert no_cert.Classify(request, timeout=10).label
        # The HTTP port: the same certificate and the same client-certificate rule.
        http_port = server.server.http_port
        assert http_port
        with pytest.raises((ConnectionError, http.client.HTTPException)):
            _get(http.client.HTTPConnection("localhost", http_port, timeout=10))
        verify = ssl.create_default_context(cafile=tmp_path / "ca.pem")
        if mutual:
            with pytest.raises((ssl.SSLError, ConnectionError)):
                _get(http.client.HTTPSConnection("localhost", http_port, context=verify, timeout=10))
            verify.load_cert_chain(tmp_path / "client.pem", tmp_path / "client.key")
        assert _get(http.client.HTTPSConnection("localhost", http_port, context=verify, timeout=10)) == 200
    finally:
        server.stop()


def _get(connection: http.client.HTTPConnection) -> int:
    """GET /v1/tasks; the HTTP status."""
    try:
        connection.request("GET", "/v1/tasks")
        return connection.getresponse().status
    finally:
        connection.close()


@pytest.mark.parametrize("name", ['a"b', "back\\slash", "two\nlines", "tab\there", "ünïcödé ☃", "'single'"])
def test_key_names_round_trip_through_the_key_file(tmp_path: Path, name: str) -> None:
    from raee_server.serving.auth import KeyRing

    path = tmp_path / "keys.toml"
    first = add_key(path, "ops", [], scope="admin")
    key = add_key(path, name, ['task"x', "t\\y"], scope="ingest")
    ring = KeyRing.load(path)  # still parses
    principal = ring.authenticate(key)
    assert principal.name == name and principal.tasks == frozenset({'task"x', "t\\y"}) and not principal.admin
    assert ring.authenticate(first).admin  # the earlier key survived the rewrite
    assert not (tmp_path / "keys.toml.partial").exists()


def test_a_key_file_that_does_not_parse_is_never_extended(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text("[[keys]\nbroken", encoding="utf-8")
    with pytest.raises(InvalidInput, match="cannot read the API key file"):
        add_key(path, "ops", [], scope="admin")
    assert path.read_text(encoding="utf-8") == "[[keys]\nbroken"


def test_the_client_sends_its_key_as_call_credentials_over_tls(tmp_path: Path) -> None:
    from raee_server.client import RaeeClient
    from raee_server.errors import Unauthenticated

    ca_pem, _, ca_name, ca_key = _cert("raee test CA", None, ca=True)
    server_pem, server_key, _, _ = _cert("localhost", (ca_name, ca_key), ca=False)
    (tmp_path / "server.pem").write_bytes(server_pem)
    (tmp_path / "server.key").write_bytes(server_key)
    key = add_key(tmp_path / "keys.toml", "team-a", ["sentiment"], scope="ingest")
    settings = make_settings(tmp_path, address="localhost:0", tls_cert=tmp_path / "server.pem",
                             tls_key=tmp_path / "server.key", api_keys_file=tmp_path / "keys.toml")
    server = ServerThread(settings, tiny_engine_factory(tmp_path, settings))
    try:
        server.wait_ready()
        target = f"localhost:{server.port}"
        with_key = RaeeClient(target, timeout=10, api_key=key, tls_ca=ca_pem)
        assert with_key.classify("sentiment", ["a great film"])[0].label in ("negative", "positive")
        with_key.close()
        without = RaeeClient(target, timeout=10, tls_ca=ca_pem)
        with pytest.raises(Unauthenticated):
            without.classify("sentiment", ["a great film"])
        without.close()
    finally:
        server.stop()


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_a_classify_only_key_cannot_write(keyed, tmp_path: Path, transport: str) -> None:  # type: ignore[no-untyped-def]
    server, keys = keyed
    reader = add_key(tmp_path / "keys.toml", "reader", ["sentiment"], scope="classify")  # taken live
    stub = _stub(server, transport)
    assert stub.Classify(pb.ClassifyRequest(task="sentiment", text="a great film"), metadata=md(reader)).label
    assert stub.GetTask(pb.GetTaskRequest(name="sentiment"), metadata=md(reader)).task.name == "sentiment"
    writes = [
        lambda: stub.Ingest(iter([pb.IngestRequest(task="sentiment", examples=[
            pb.Example(text="fine", label="positive")])]), metadata=md(reader)),
        lambda: stub.DeleteRecords(pb.DeleteRecordsRequest(task="sentiment", texts=["good"]), metadata=md(reader)),
        lambda: stub.RelabelRecords(pb.RelabelRecordsRequest(task="sentiment", records=[
            pb.Relabel(text="good", label="negative")]), metadata=md(reader)),
    ]
    for write in writes:
        code, details = code_of(write)
        assert code == grpc.StatusCode.PERMISSION_DENIED and "may only classify" in details, details
    # An ingest key of the same task may write (Ingest includes delete).
    assert stub.DeleteRecords(pb.DeleteRecordsRequest(task="sentiment", texts=["no such text"]),
                              metadata=md(keys["sentiment"])).deleted_ids == []


def test_a_revoked_key_is_refused_without_a_restart(keyed, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from click.testing import CliRunner

    from raee_server.cli.main import cli

    server, keys = keyed
    key_file = str(tmp_path / "keys.toml")
    request = pb.ClassifyRequest(task="sentiment", text="a great film")
    assert server.stub.Classify(request, metadata=md(keys["sentiment"])).label
    listed = CliRunner().invoke(cli, ["key", "list", "--file", key_file, "--json"])
    assert listed.exit_code == 0, listed.output
    assert {(k["name"], k["scope"]) for k in json.loads(listed.output)["keys"]} == {
        ("ops", "admin"), ("team-a", "ingest"), ("team-b", "ingest")}
    assert all(k not in listed.output for k in keys.values())
    revoked = CliRunner().invoke(cli, ["key", "revoke", "team-a", "--file", key_file])
    assert revoked.exit_code == 0, revoked.output
    code, details = code_of(lambda: server.stub.Classify(request, metadata=md(keys["sentiment"])))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "unknown API key" in details
    assert server.stub.Classify(request, metadata=md(keys["admin"])).label  # the others stand
    created = CliRunner().invoke(cli, ["key", "create", "--name", "team-c", "--task", "sentiment", "--scope",
                                       "classify", "--file", key_file, "--json"])
    assert created.exit_code == 0, created.output
    assert server.stub.Classify(request, metadata=md(json.loads(created.output)["key"])).label
    again = CliRunner().invoke(cli, ["key", "revoke", "team-a", "--file", key_file])
    assert again.exit_code == 3 and "no key named 'team-a'" in again.output


def test_a_key_file_that_stops_parsing_keeps_the_last_good_keys(tmp_path: Path) -> None:
    from raee_server.errors import PermissionDenied, Unauthenticated
    from raee_server.serving.auth import LiveKeys, revoke_key

    path = tmp_path / "keys.toml"
    ops = add_key(path, "ops", [], scope="admin")
    live = LiveKeys(path)
    reader = add_key(path, "reader", ["t"], scope="classify")
    assert live.authorize(reader, "Classify", "t").scope == "classify"
    with pytest.raises(PermissionDenied, match="may only classify"):
        live.authorize(reader, "Ingest", "t")
    path.write_text("[[keys]\nbroken", encoding="utf-8")  # an operator's half-finished edit
    assert live.authenticate(ops).admin and live.authenticate(reader).name == "reader"
    path.unlink()  # no file: no key is valid
    with pytest.raises(Unauthenticated):
        live.authenticate(ops)
    with pytest.raises(InvalidInput, match="no key named"):
        revoke_key(path, "ops")


def test_a_key_file_written_before_scopes_keeps_its_grants(tmp_path: Path) -> None:
    from raee_server.serving.auth import KeyRing, hash_key

    path = tmp_path / "keys.toml"
    path.write_text(f'[[keys]]\nname = "ops"\nsha256 = "{hash_key("a")}"\nadmin = true\n'
                    f'[[keys]]\nname = "team"\nsha256 = "{hash_key("b")}"\ntasks = ["t"]\nadmin = false\n',
                    encoding="utf-8")
    ring = KeyRing.load(path)
    assert ring.authorize("a", "CreateTask", None).admin
    assert ring.authorize("b", "Ingest", "t").scope == "ingest"
    path.write_text(f'[[keys]]\nname = "x"\nsha256 = "{hash_key("c")}"\nscope = "root"\n', encoding="utf-8")
    with pytest.raises(InvalidInput, match=r"keys\[0\]: scope must be one of classify, ingest, admin"):
        KeyRing.load(path)


def _code(call: Any) -> grpc.StatusCode:
    """The status a call ends with, OK included."""
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_sighup_reloads_the_key_file_of_a_server_process(tmp_path: Path) -> None:
    """The whole path in a real `raee-server` process: a key added by editing the file in place (the
    same inode, size and mtime kept, so only SIGHUP can tell the server) is taken after SIGHUP."""
    import os
    import signal
    import time

    from .processes import free_port, start_server
    from .tiny_models import save_tiny_backbone

    path = tmp_path / "keys.toml"
    ops = add_key(path, "ops", [], scope="admin")
    model = save_tiny_backbone(tmp_path / "model")
    address = f"127.0.0.1:{free_port()}"
    proc = start_server(["--data-dir", str(tmp_path / "data"), "--backbone", str(model), "--encoder", "hashing:32",
                         "--api-keys-file", str(path)], address, dict(os.environ))
    try:
        stub = pb_grpc.RaeeServiceStub(grpc.insecure_channel(address))
        assert _code(lambda: stub.ListTasks(pb.ListTasksRequest(), metadata=md(ops), timeout=10)) == \
            grpc.StatusCode.OK
        stamp = os.stat(path)
        text = path.read_text(encoding="utf-8")
        late = "raee_" + "x" * 43
        from raee_server.serving.auth import hash_key

        swapped = text.replace('name = "ops"', 'name = "op2"').replace(text.split('sha256 = "')[1][:64],
                                                                       hash_key(late))
        assert len(swapped) == len(text)
        with path.open("r+", encoding="utf-8") as f:  # in place: the same inode and size
            f.write(swapped)
        os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # and the same mtime
        assert _code(lambda: stub.ListTasks(pb.ListTasksRequest(), metadata=md(late), timeout=10)) == \
            grpc.StatusCode.UNAUTHENTICATED  # unseen without the signal
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while _code(lambda: stub.ListTasks(pb.ListTasksRequest(), metadata=md(late), timeout=10)) != \
                grpc.StatusCode.OK:
            assert time.monotonic() < deadline, "SIGHUP did not reload the key file"
            time.sleep(0.2)
        assert _code(lambda: stub.ListTasks(pb.ListTasksRequest(), metadata=md(ops), timeout=10)) == \
            grpc.StatusCode.UNAUTHENTICATED
        assert proc.poll() is None  # SIGHUP does not stop the server
    finally:
        proc.terminate()
        proc.wait(timeout=60)
