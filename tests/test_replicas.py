"""Several servers over one database (docs/deployment.md): leases on background work, shared state.

The two-server tests run two real gRPC servers in this process over one Postgres and one vector store
both reach: a real Qdrant server when RAEE_TEST_QDRANT_URL is set, else one in-memory Qdrant client
(no Qdrant server runs on these machines). Postgres is CI's; the lease tests of the store alone run
on SQLite too.
"""

from __future__ import annotations

import asyncio
import copy
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from sqlalchemy import text

from raee_server.core.engine import Engine
from raee_server.errors import RunningElsewhere
from raee_server.models.backbone import CausalLMBackbone
from raee_server.models.encoders import HashingEncoder
from raee_server.protos.raee.v1 import raee_pb2 as pb
from raee_server.protos.raee.v1 import raee_pb2_grpc as pb_grpc
from raee_server.serving.auth import add_key, revoke_key
from raee_server.serving.claims import Claims
from raee_server.stores.metadata import MetadataStore
from raee_server.stores.records import record_id
from raee_server.stores.vectors import QdrantServerStore, VectorStore
from raee_server.types import METADATA_KEY

from .conftest import SENTIMENT, corpus
from .databases import database
from .grpc_harness import ServerThread
from .test_grpc import ingest, make_settings
from .test_vector_store_congruence import qdrant_server_url
from .tiny_models import tiny_causal_lm, tiny_tokenizer

DEADLINE = 300.0  # seconds a background step may take on a busy machine (never a speed claim)


def until(check: Callable[[], Any], what: str, timeout: float = DEADLINE) -> Any:
    end = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < end, what
        time.sleep(0.1)
    return found


@pytest.fixture
def postgres(tmp_path: Path) -> Iterator[str]:
    with database("postgres", tmp_path) as url:
        yield url


# -- the lease alone ---------------------------------------------------------------------------------


def test_a_lease_has_one_holder_until_it_lapses(database_url: str) -> None:
    store = MetadataStore(database_url)
    store.create_task(SENTIMENT, "bb", "enc")
    assert store.lease(SENTIMENT.name) is None
    assert store.claim_lease(SENTIMENT.name, "a", 60)
    assert not store.claim_lease(SENTIMENT.name, "b", 60)  # held
    assert store.claim_lease(SENTIMENT.name, "a", 60)  # its own
    lease = store.lease(SENTIMENT.name)
    assert lease is not None and lease.holder == "a"
    assert timedelta(seconds=50) < lease.expires_at - datetime.now(UTC) <= timedelta(seconds=60)
    store.release_lease(SENTIMENT.name, "b")  # not b's to give up
    assert store.lease(SENTIMENT.name) is not None
    assert store.renew_lease(SENTIMENT.name, "a", 0.2)
    time.sleep(0.4)  # a's deadline passes without a renewal: a died
    assert store.claim_lease(SENTIMENT.name, "b", 60)
    assert not store.renew_lease(SENTIMENT.name, "a", 60)  # a, come back, learns it lost the lease
    assert store.lease(SENTIMENT.name).holder == "b"  # type: ignore[union-attr]
    store.release_lease(SENTIMENT.name, "b")
    assert store.lease(SENTIMENT.name) is None
    store.claim_lease(SENTIMENT.name, "b", 60)
    store.delete_task(SENTIMENT.name)  # the lease goes with its task
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM job_leases")).scalar() == 0
    store.close()


def test_of_many_replicas_racing_for_a_lease_exactly_one_wins(postgres: str) -> None:
    """Real concurrency on Postgres: eight writers claim at once, from their own connections."""
    MetadataStore(postgres).create_task(SENTIMENT, "bb", "enc")
    stores = [MetadataStore(postgres) for _ in range(8)]
    start = threading.Barrier(len(stores))
    won: list[str] = []

    def claim(i: int) -> None:
        start.wait()
        if stores[i].claim_lease(SENTIMENT.name, f"replica-{i}", 60):
            won.append(f"replica-{i}")

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(won) == 1 and stores[0].lease(SENTIMENT.name).holder == won[0]  # type: ignore[union-attr]
    for s in stores:
        s.close()


def test_heads_versions_stay_unique_and_increasing_when_writers_race(postgres: str) -> None:
    MetadataStore(postgres).create_task(SENTIMENT, "bb", "enc")
    stores = [MetadataStore(postgres) for _ in range(6)]
    start = threading.Barrier(len(stores))
    versions: list[int] = []

    def save(i: int) -> None:
        start.wait()
        for _ in range(3):
            versions.append(stores[i].save_heads(SENTIMENT.name, {"by": i}, b""))

    threads = [threading.Thread(target=save, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(versions) == list(range(1, 19))
    assert stores[0].heads(SENTIMENT.name).version == 18  # type: ignore[union-attr]
    for s in stores:
        s.close()


def test_a_replica_that_loses_its_lease_stops_its_work(tmp_path: Path) -> None:
    """A replica that stalled past its deadline, while another took the work over, must not go on
    to store a second fit: its next renewal fails and the work stops with RunningElsewhere."""
    store = MetadataStore(f"sqlite:///{tmp_path / 'm.sqlite'}")
    store.create_task(SENTIMENT, "bb", "enc")

    async def scenario() -> None:
        # 15 s: far past any stall of a busy machine between a's claim and b's try (a renews every 5 s)
        claims = Claims(lambda: store, "a", seconds=15)
        other = Claims(lambda: store, "b", seconds=15)

        async def work() -> None:
            async with claims.hold(SENTIMENT.name):
                async with claims.hold(SENTIMENT.name):  # nested holds share the lease
                    assert claims.holds(SENTIMENT.name)
                with pytest.raises(RunningElsewhere, match="replica a is fitting or tuning"):
                    async with other.hold(SENTIMENT.name):
                        pass
                with store.engine.begin() as conn:  # b took over while a stalled
                    conn.execute(text("UPDATE job_leases SET holder = 'b'"))
                await asyncio.sleep(DEADLINE)

        with pytest.raises(RunningElsewhere, match="lost its lease"):
            await asyncio.wait_for(work(), DEADLINE)
        assert not claims.holds(SENTIMENT.name)
        assert store.lease(SENTIMENT.name).holder == "b"  # type: ignore[union-attr]  # a did not release b's

    asyncio.run(scenario())
    store.close()


# -- two servers ---------------------------------------------------------------------------------------


class Replicas:
    """Servers over one Postgres and one vector store; each has its own data directory and name."""

    def __init__(self, tmp_path: Path, database_url: str, **overrides: Any) -> None:
        self.tmp_path, self.database_url, self.overrides = tmp_path, database_url, overrides
        self.url = qdrant_server_url()
        self.collection = f"replicas-{uuid.uuid4().hex[:8]}"
        self.first: VectorStore | None = None
        self.servers: list[ServerThread] = []

    def _vectors(self) -> VectorStore:
        if self.url:  # a connection of its own to a real server, as a replica has
            return QdrantServerStore(self.url, self.collection, 32)
        if self.first is None:
            self.first = QdrantServerStore(":memory:", self.collection, 32)
            return self.first
        shared = copy.copy(self.first)  # its own store object over the one in-memory client
        shared._shard_keys = set()
        return shared

    def start(self, name: str, **overrides: Any) -> ServerThread:
        settings = make_settings(self.tmp_path / name, database_url=self.database_url, replica_id=name,
                                 **{**self.overrides, **overrides})

        settings.data_dir.mkdir(parents=True, exist_ok=True)

        def factory() -> Engine:
            backbone = CausalLMBackbone(tiny_causal_lm(), tiny_tokenizer(), "tiny-gemma3")
            engine = Engine(backbone, HashingEncoder(32), self._vectors(), MetadataStore(settings.sql_url), settings)
            if SENTIMENT.name not in [i.spec.name for i in engine.metadata.list_tasks()]:
                engine.create_task(SENTIMENT)
            return engine

        server = ServerThread(settings, factory)
        server.wait_ready()
        self.servers.append(server)
        return server

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


@pytest.fixture
def replicas(tmp_path: Path, postgres: str) -> Iterator[Callable[..., Replicas]]:
    made: list[Replicas] = []

    def make(**overrides: Any) -> Replicas:
        made.append(Replicas(tmp_path, postgres, **overrides))
        return made[-1]

    yield make
    for r in made:
        r.stop()


def fits(server: ServerThread) -> list[Any]:
    """The fit-heads operations this replica ran to the end."""
    return [op for op in server.server.servicer.operations.list() if op.kind == "fit-heads" and op.response]


def test_what_one_replica_ingests_the_other_classifies_with(replicas: Callable[..., Replicas]) -> None:
    group = replicas(retune_check_seconds=3600)
    a, b = group.start("a"), group.start("b")
    assert a.stub.GetServerInfo(pb.GetServerInfoRequest()).replica == "a"
    assert b.stub.GetServerInfo(pb.GetServerInfoRequest()).replica == "b"
    ingest(a.stub, SENTIMENT.name, corpus(12))
    text = "an utterly singular sentence about a marmot"
    ingest(a.stub, SENTIMENT.name, [(text, "positive")])
    reply = b.stub.Classify(pb.ClassifyRequest(task=SENTIMENT.name, text=text, options=pb.ClassifyOptions(
        policy="paper", k=3, return_neighbours=True)), timeout=60)
    own = record_id(SENTIMENT.name, text)
    assert reply.neighbours[0].id == own and reply.neighbours[0].similarity > 0.99
    assert b.stub.GetTask(pb.GetTaskRequest(name=SENTIMENT.name)).task.records == 13
    # and back: what b deletes, a no longer finds
    b.stub.DeleteRecords(pb.DeleteRecordsRequest(task=SENTIMENT.name, texts=[text]))
    reply = a.stub.Classify(pb.ClassifyRequest(task=SENTIMENT.name, text=text, options=pb.ClassifyOptions(
        policy="paper", k=3, return_neighbours=True)), timeout=60)
    assert own not in [n.id for n in reply.neighbours]


def test_two_replicas_fit_a_task_once_and_both_serve_the_new_heads(replicas: Callable[..., Replicas]) -> None:
    """Once the ingest ends, both background loops find the task due at once; exactly one fits it,
    and within a check period both serve the version it stored."""
    group = replicas(retune_check_seconds=0.2, retune_growth=0.0, heads_refit_rows=10_000, fit_niceness=0)
    a, b = group.start("a"), group.start("b")
    ingest(a.stub, SENTIMENT.name, corpus(40), chunk=40)  # one call: no fit while it writes
    ran = until(lambda: fits(a) + fits(b), "no replica fitted the task")
    version = ran[0].response["version"]
    for server in (a, b):
        until(lambda s=server: s.stub.GetTask(pb.GetTaskRequest(name=SENTIMENT.name)).task.heads.version == version,
              f"the new heads did not reach replica {server.server.servicer.replica}")
    until(lambda: MetadataStore(group.database_url).lease(SENTIMENT.name) is None, "the lease was not given back")
    time.sleep(2.0)  # ten more check periods on each: still no second fit
    assert len(fits(a) + fits(b)) == 1 and version == 1
    answers = [s.stub.Classify(pb.ClassifyRequest(task=SENTIMENT.name, text="a fine film", options=pb.ClassifyOptions(
        policy="heads:3")), timeout=60) for s in (a, b)]
    assert [r.label for r in answers] == [answers[0].label] * 2
    assert [list(r.scores) for r in answers] == [list(answers[0].scores)] * 2


def test_when_the_fitting_replica_dies_another_takes_the_job_over_after_its_lease(
        replicas: Callable[..., Replicas]) -> None:
    """A replica killed mid-fit leaves its lease row behind, never renewed. Until it lapses the
    other replica does not fit (an explicit fit is refused, naming the holder); then it does."""
    group = replicas(retune_check_seconds=0.2, retune_growth=0.0, heads_refit_rows=10_000, fit_niceness=0)
    b = group.start("b")
    store = MetadataStore(group.database_url)
    assert store.claim_lease(SENTIMENT.name, "a-killed-mid-fit", 3600)  # what the dead replica left
    ingest(b.stub, SENTIMENT.name, corpus(40), chunk=40)
    op = b.stub.FitHeads(pb.FitHeadsRequest(task=SENTIMENT.name)).operation
    done = until(lambda: (o := b.stub.GetOperation(pb.GetOperationRequest(name=op.name)).operation).done and o,
                 "the explicit fit did not end")
    assert done.error.code == grpc.StatusCode.ABORTED.value[0] and "a-killed-mid-fit" in done.error.message
    time.sleep(2.0)  # ten background checks, each finding the task due and the lease held
    assert not fits(b) and store.heads(SENTIMENT.name) is None
    with store.engine.begin() as conn:  # its deadline passes
        conn.execute(text("UPDATE job_leases SET expires_at = :t"), {"t": datetime.now(UTC) - timedelta(seconds=1)})
    lapsed = time.time()
    ran = until(lambda: fits(b), "the job was not taken over after the lease lapsed")
    assert ran[0].started >= lapsed - 1
    assert store.heads(SENTIMENT.name).version == ran[0].response["version"] == 1  # type: ignore[union-attr]
    store.close()


def test_every_replica_reads_one_key_file_and_a_revoked_key_is_refused_by_all(
        replicas: Callable[..., Replicas], tmp_path: Path) -> None:
    keys = tmp_path / "shared-keys.toml"  # a mounted secret every replica reads
    key = add_key(keys, "team", [SENTIMENT.name], scope="ingest")
    group = replicas(retune_check_seconds=3600, api_keys_file=keys)
    a, b = group.start("a"), group.start("b")
    ingest_rows = [pb.IngestRequest(task=SENTIMENT.name, examples=[pb.Example(text="a fine film", label="positive")])]
    a.stub.Ingest(iter(ingest_rows), metadata=[(METADATA_KEY, key)])
    for server in (a, b):
        reply = server.stub.Classify(pb.ClassifyRequest(task=SENTIMENT.name, text="a fine film"),
                                     metadata=[(METADATA_KEY, key)], timeout=60)
        assert reply.label
    revoke_key(keys, "team")
    for server in (a, b):
        with pytest.raises(grpc.RpcError) as refused:
            server.stub.Classify(pb.ClassifyRequest(task=SENTIMENT.name, text="a fine film"),
                                 metadata=[(METADATA_KEY, key)], timeout=60)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_client_balances_calls_over_two_replicas(replicas: Callable[..., Replicas]) -> None:
    """gRPC's round_robin over a name with several addresses (here the ipv4: form; DNS in a
    deployment) spreads calls over the replicas: both count answers."""
    group = replicas(retune_check_seconds=3600)
    a, b = group.start("a"), group.start("b")
    ingest(a.stub, SENTIMENT.name, corpus(12))
    target = f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}"
    sent = 0

    def answers() -> list[int]:
        return [s.stub.GetTaskStats(pb.GetTaskStatsRequest(name=SENTIMENT.name)).answers for s in (a, b)]

    with grpc.insecure_channel(target, options=[("grpc.lb_policy_name", "round_robin")]) as channel:
        stub = pb_grpc.RaeeServiceStub(channel)

        def both_answered() -> bool:  # round_robin picks among the connected: the second may connect late
            nonlocal sent
            stub.Classify(pb.ClassifyRequest(task=SENTIMENT.name, text=f"film number {sent}"), timeout=60)
            sent += 1
            return sent >= 20 and min(answers()) > 0

        until(both_answered, "the calls were not spread over both replicas")
    assert sum(answers()) == sent


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_background_fit_dies_with_its_server() -> None:
    """A replica killed mid-fit must not leave its fit running to race the replica that takes over."""
    parent = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys\n"
        "child = subprocess.Popen([sys.executable, '-c', 'from raee_server.serving.fitter import _die_with_parent;"
        " _die_with_parent(); print(flush=True); import time; time.sleep(600)'], stdout=subprocess.PIPE)\n"
        "child.stdout.readline()\n"
        "print(child.pid, flush=True)\n"
        "import time; time.sleep(600)\n")], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    assert psutil.pid_exists(child)
    parent.send_signal(signal.SIGKILL)
    parent.wait(30)
    until(lambda: not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE,
          "the fit outlived its server", timeout=30)


def test_a_local_fit_takes_turns_with_the_servers_of_its_database(tmp_path: Path) -> None:
    """raee-admin's local fit and tune (after an ingest, or fit-heads) take the task's lease too."""
    from .conftest import admin_cli, write_tsv
    from .tiny_models import save_tiny_backbone

    run = admin_cli(tmp_path / "data", save_tiny_backbone(tmp_path / "model"))
    spec = tmp_path / "s.toml"
    spec.write_text(f'name = "{SENTIMENT.name}"\ntemplate = "{SENTIMENT.template}"\n'
                    'labels = [{ name = "negative", word = " negative" }, { name = "positive", word = " positive" }]\n')
    run("task", "create", "--file", str(spec))
    store = MetadataStore(f"sqlite:///{tmp_path / 'data' / 'metadata.sqlite'}")
    assert store.claim_lease(SENTIMENT.name, "server-1", 3600)  # a server is fitting the task
    out = run("ingest", "--task", SENTIMENT.name, str(write_tsv(tmp_path / "rows.tsv", corpus(40))))
    assert "added 40" in out and "not fitting here" in out and "server-1" in out  # the rows are in
    assert store.heads(SENTIMENT.name) is None
    refused = run("fit-heads", "--task", SENTIMENT.name, code=4)
    assert "replica server-1 is fitting or tuning task" in refused
    store.release_lease(SENTIMENT.name, "server-1")
    assert "exit heads v1" in run("fit-heads", "--task", SENTIMENT.name)
    assert store.lease(SENTIMENT.name) is None  # given back
    store.close()
