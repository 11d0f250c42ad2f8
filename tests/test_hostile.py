"""A careless or hostile client against a real `raee-server` process: it cannot stop, starve or pollute it.

One test per row of the table in docs/reliability.md ("Hostile clients"). None depends on how fast
the machine is: each compares orders, counts or codes, and sizes its work so that no machine could
finish it inside the deadlines used.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from raee_server.protos.raee.v1 import raee_pb2 as pb
from raee_server.protos.raee.v1 import raee_pb2_grpc as pb_grpc
from raee_server.stores.metadata import MetadataStore

from .processes import free_port, sentiment_task, start_server
from .test_engine import ROWS
from .tiny_models import save_tiny_backbone

MAX_BATCH_TEXTS = 5000  # room for a request no machine computes inside the short deadlines below
INVALID = grpc.StatusCode.INVALID_ARGUMENT


class Served:
    def __init__(self, proc: subprocess.Popen[bytes], address: str, metrics_port: int, data_dir: Path,
                 log: Path) -> None:
        self.proc, self.address, self.metrics_port, self.data_dir, self.log = proc, address, metrics_port, data_dir, log
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.RaeeServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            return str(r.read().decode("utf-8", "replace"))

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample (0 when absent)."""
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in self.metrics().splitlines():
            if line.startswith("#"):
                continue
            sample, _, value = line.rpartition(" ")
            got_name, _, got_labels = sample.partition("{")
            if got_name == name and ",".join(sorted(got_labels.rstrip("}").split(","))) == want:
                return float(value)
        return 0.0

    def computed_until_stable(self) -> float:
        """raee_classified_texts_total once the worker has stopped (unchanged over a few reads)."""
        last, same = -1.0, 0
        for _ in range(300):
            now = self.metric("raee_classified_texts_total")
            same = same + 1 if now == last else 0
            if same >= 3:
                return now
            last = now
            time.sleep(0.1)
        raise AssertionError("the worker never stopped computing")

    def assert_still_serving(self) -> None:
        reply = self.stub.Classify(pb.ClassifyRequest(task="t", text="a great movie"), timeout=60)
        assert reply.label in ("negative", "positive")
        status = self.health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("hostile")
    model = save_tiny_backbone(tmp / "model")
    base = ["--data-dir", str(tmp / "data"), "--backbone", str(model), "--encoder", "hashing:32"]
    env = {**os.environ, "RAEE_MAX_BATCH_SIZE": "4", "RAEE_MAX_BATCH_TEXTS": str(MAX_BATCH_TEXTS),
           "RAEE_INGEST_BATCH_SIZE": "8", "RAEE_FORWARD_BATCH_SIZE": "4"}
    address, metrics_port = f"127.0.0.1:{free_port()}", free_port()
    proc = start_server(base, address, env, metrics_port=metrics_port, log=tmp / "server.log")
    server = Served(proc, address, metrics_port, tmp / "data", tmp / "server.log")
    sentiment_task(server.stub, "t", ROWS)
    yield server
    server.channel.close()
    proc.terminate()
    proc.wait(60)


def code_of(call: object) -> tuple[grpc.StatusCode, str]:
    try:
        call()  # type: ignore[operator]
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


# -- input rules -------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["static:²", "knn-agree:²", "static:٣", "static:３", "paper-tol:٠.5",
                                    "confidence:½"])
def test_numbers_in_policy_arguments_are_ascii_and_never_stop_the_worker(served: Served, policy: str) -> None:
    code, details = code_of(lambda: served.stub.Classify(
        pb.ClassifyRequest(task="t", text="a film", options=pb.ClassifyOptions(policy=policy)), timeout=30))
    assert code == INVALID and "ASCII digits" in details, (code, details)
    served.assert_still_serving()


@pytest.mark.parametrize("text", ["\u200b", "\u2060\u200b \u2060", "\ufeff\u200d", " \t\u00ad "])
def test_a_text_of_invisible_characters_is_empty(served: Served, text: str) -> None:
    code, details = code_of(lambda: served.stub.Classify(pb.ClassifyRequest(task="t", text=text), timeout=30))
    assert code == INVALID and "empty text" in details
    code, details = code_of(lambda: served.stub.ClassifyBatch(
        pb.ClassifyBatchRequest(task="t", texts=["fine", text]), timeout=30))
    assert code == INVALID and "text[1]: empty text" in details
    reply = served.stub.Ingest(iter([pb.IngestRequest(task="t", examples=[pb.Example(text=text, label="positive")])]))
    assert reply.added == 0 and [(r.index, r.reason) for r in reply.rejections] == [(0, "empty text")]


def test_a_body_that_is_not_protobuf_is_invalid_argument_with_one_log_line(served: Served) -> None:
    raw = served.channel.unary_unary("/raee.v1.RaeeService/Classify")  # no serializer: bytes as they are
    not_protobuf = b"\xff\xff\xff\xff\x0f"
    bad_utf8 = b"\x0a\x01t\x12\x02\xc3\x28"  # task="t", text=<invalid UTF-8>
    before = served.log.read_text()
    for body in (not_protobuf, bad_utf8):
        code, details = code_of(lambda b=body: raw(b, timeout=30))
        assert code == INVALID and "not a valid Classify message" in details, (code, details)
        assert "Unexpected" not in details and "Error" not in details.split("(")[0]
    stream = served.channel.stream_stream("/raee.v1.RaeeService/ClassifyStream")
    good = pb.ClassifyStreamRequest(task="t", text="a great movie").SerializeToString()
    answers = [pb.ClassifyStreamResponse.FromString(r) for r in stream(iter([good, bad_utf8, good]), timeout=30)]
    assert [(a.index, a.error.code) for a in answers] == [(0, 0), (1, INVALID.value[0]), (2, 0)]
    time.sleep(0.5)  # the log is written by another process
    new = served.log.read_text()[len(before):]
    assert "Traceback" not in new and new.count("undecodable request message") == 3
    served.assert_still_serving()


# -- limits, fairness, cancellation --------------------------------------------------


def test_a_batch_over_the_limit_is_refused_naming_the_setting(served: Served) -> None:
    code, details = code_of(lambda: served.stub.ClassifyBatch(
        pb.ClassifyBatchRequest(task="t", texts=["x"] * 10_000), timeout=60))
    assert code == INVALID and "RAEE_MAX_BATCH_TEXTS" in details and "10000 texts" in details


def test_a_large_batch_does_not_starve_a_single_classify(served: Served) -> None:
    big = served.stub.ClassifyBatch.future(
        pb.ClassifyBatchRequest(task="t", texts=[f"film number {i}" for i in range(1500)]), timeout=600)
    single = served.stub.Classify(pb.ClassifyRequest(task="t", text="a great movie"), timeout=600)
    assert single.label
    assert not big.done(), "the single call waited for the whole large batch"
    assert len(big.result().results) == 1500  # the large one still completes, in order


def test_work_for_a_call_whose_deadline_passed_stops_at_the_next_chunk(served: Served) -> None:
    before = served.computed_until_stable()
    texts = [f"slow text {i}" for i in range(MAX_BATCH_TEXTS)]
    code, _ = code_of(lambda: served.stub.ClassifyBatch(pb.ClassifyBatchRequest(task="t", texts=texts), timeout=0.3))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    computed = served.computed_until_stable() - before
    assert computed < MAX_BATCH_TEXTS / 2, computed
    served.assert_still_serving()


def test_a_bad_stream_message_gets_its_own_error_and_the_stream_goes_on(served: Served) -> None:
    texts = ["good", "bad film", "", "fine", "\u200b", "great", "awful", "ok"]
    requests = [pb.ClassifyStreamRequest(task="t", text=t, request_id=f"r{i}") for i, t in enumerate(texts)]
    requests[5] = pb.ClassifyStreamRequest(task="made-up", text="great", request_id="r5")
    answers = list(served.stub.ClassifyStream(iter(requests), timeout=60))
    assert [a.index for a in answers] == list(range(8))
    assert [a.request_id for a in answers] == [f"r{i}" for i in range(8)]
    failed = {a.index: (a.error.code, a.error.message) for a in answers if a.error.code}
    assert failed == {2: (INVALID.value[0], "text: empty text"), 4: (INVALID.value[0], "text: empty text"),
                      5: (grpc.StatusCode.NOT_FOUND.value[0], failed[5][1])}
    assert "made-up" in failed[5][1]
    assert all(a.result.label in ("negative", "positive") for a in answers if a.index not in failed)


def test_a_cancelled_stream_drops_its_queued_work(served: Served) -> None:
    before = served.computed_until_stable()
    release = threading.Event()

    def requests() -> Iterator[pb.ClassifyStreamRequest]:
        for i in range(400):
            yield pb.ClassifyStreamRequest(task="t", text=f"stream text {i}")
        release.wait(60)

    call = served.stub.ClassifyStream(requests(), timeout=120)
    next(call)  # the first answer is back: the rest is queued
    call.cancel()
    release.set()
    computed = served.computed_until_stable() - before
    assert computed < 400, computed
    served.assert_still_serving()


# -- ingest: acknowledged chunks are kept, and the batch row tells the truth ---------------


def _batches(served: Served, task: str) -> list:  # type: ignore[type-arg]
    store = MetadataStore(f"sqlite:///{served.data_dir / 'metadata.sqlite'}")
    try:
        return store.list_batches(task)
    finally:
        store.close()


def _records(served: Served, task: str) -> int:
    return int(served.stub.GetTask(pb.GetTaskRequest(name=task), timeout=30).task.records)


def _wait_for(predicate, what: str, seconds: float = 120) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def _new_task(served: Served, name: str) -> None:
    served.stub.CreateTask(pb.CreateTaskRequest(name=name, template="{text} ?", labels=[
        pb.Label(name="negative", word=" negative"), pb.Label(name="positive", word=" positive")]))


def test_an_ingest_cancelled_after_sending_keeps_its_chunks_and_says_cancelled(served: Served) -> None:
    _new_task(served, "cancel-after")
    release = threading.Event()

    def messages() -> Iterator[pb.IngestRequest]:
        for chunk in range(3):
            yield pb.IngestRequest(task="cancel-after" if chunk == 0 else "", examples=[
                pb.Example(text=f"review {chunk}-{i}", label="positive" if i % 2 else "negative") for i in range(32)])
        release.wait(120)  # the call stays open until the client cancels it

    future = served.stub.Ingest.future(messages(), timeout=300)
    _wait_for(lambda: _records(served, "cancel-after") == 96, "the three chunks were not written")
    future.cancel()
    release.set()
    _wait_for(lambda: _batches(served, "cancel-after")[0].status != "running", "the batch stayed running")
    [batch] = _batches(served, "cancel-after")
    assert (batch.status, batch.added, batch.present, batch.rejected) == ("cancelled", 96, 0, 0)
    assert batch.finished_at is not None and _records(served, "cancel-after") == 96
    # Re-sending the same examples adds only what is missing (here nothing).
    again = served.stub.Ingest(iter([pb.IngestRequest(task="cancel-after", examples=[
        pb.Example(text=f"review {c}-{i}", label="positive" if i % 2 else "negative")
        for c in range(3) for i in range(32)])]), timeout=300)
    assert (again.added, again.already_present) == (0, 96)


def test_an_ingest_cut_by_its_deadline_records_what_it_stored(served: Served) -> None:
    _new_task(served, "cut")
    release = threading.Event()

    def messages() -> Iterator[pb.IngestRequest]:
        yield pb.IngestRequest(task="cut", examples=[pb.Example(text=f"line {i}", label="positive")
                                                     for i in range(64)])
        release.wait(60)

    code, _ = code_of(lambda: served.stub.Ingest(messages(), timeout=2))
    release.set()
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    _wait_for(lambda: _batches(served, "cut")[0].status != "running", "the batch stayed running")
    [batch] = _batches(served, "cut")
    assert batch.status == "cancelled" and batch.added == _records(served, "cut") <= 64


def test_an_ingest_cancelled_before_its_first_chunk_leaves_nothing_running(served: Served) -> None:
    _new_task(served, "early")
    for first in ([], [pb.IngestRequest(task="early")]):  # nothing sent; only the task named
        release = threading.Event()

        def messages(
            first: list[pb.IngestRequest] = first, release: threading.Event = release
        ) -> Iterator[pb.IngestRequest]:
            yield from first
            release.wait(60)

        future = served.stub.Ingest.future(messages(), timeout=60)
        time.sleep(0.5)
        future.cancel()
        release.set()
    _wait_for(lambda: all(b.status != "running" for b in _batches(served, "early")), "a batch stayed running")
    assert [(b.status, b.added) for b in _batches(served, "early")] in ([("cancelled", 0)], [])


def test_ingest_batches_are_listed_by_raee_admin(served: Served) -> None:
    _new_task(served, "listed")
    served.stub.Ingest(iter([pb.IngestRequest(task="listed", examples=[pb.Example(text="a", label="positive")])]))
    out = subprocess.run([sys.executable, "-c", "from raee_server.cli.main import main; main()", "--data-dir",
                          str(served.data_dir), "ingest-batches", "--task", "listed"],
                         capture_output=True, text=True, check=True).stdout
    assert re.search(r"#\d+\s+listed\s+done\s+added\s+1\b", out), out


# -- metrics stay truthful and bounded ------------------------------------------------------


def test_expired_and_cancelled_calls_are_counted_with_their_codes(served: Served) -> None:
    def counted() -> dict[str, float]:
        return {c: served.metric("raee_requests_total", method="Classify", task="t", code=c)
                for c in ("OK", "DEADLINE_EXCEEDED", "CANCELLED")}

    before = counted()
    # The worker is busy with a large batch, so these short calls expire while queued (as under load). Both
    # name a policy that runs the backbone: `auto` here may be the kNN vote, which answers in microseconds.
    paper = pb.ClassifyOptions(policy="paper")
    busy = served.stub.ClassifyBatch.future(
        pb.ClassifyBatchRequest(task="t", texts=[f"busy {i}" for i in range(1000)], options=paper), timeout=600)
    codes = [code_of(lambda i=i, t=t: served.stub.Classify(
        pb.ClassifyRequest(task="t", text=f"deadline {i}", options=paper), timeout=t))[0]
             for i, t in enumerate([0.001] * 20)]  # expire while the worker computes a chunk of the batch
    busy.result()
    time.sleep(1.0)  # a handler may still be finishing
    after = counted()
    ok = after["OK"] - before["OK"]
    ended = after["DEADLINE_EXCEEDED"] + after["CANCELLED"] - before["DEADLINE_EXCEEDED"] - before["CANCELLED"]
    assert ok + ended <= len(codes)  # each call counted once at most; calls that never reached a handler are not
    # The server counts what the caller sees: OK only for an answer made before the deadline. An answer
    # made at the deadline itself can still be seen on one side and not the other (it is in flight when
    # the deadline passes), so the two views may differ by that one call, no more.
    assert abs(ok - codes.count(grpc.StatusCode.OK)) <= 1, (ok, codes)


def test_made_up_task_names_do_not_become_metric_labels(served: Served) -> None:
    names = [f"nope-{i}" for i in range(13)] + ["x" * 10_000, "bad\x00name"]
    for name in names:
        code_of(lambda n=name: served.stub.Classify(pb.ClassifyRequest(task=n, text="hi"), timeout=30))
        code_of(lambda n=name: served.stub.GetTask(pb.GetTaskRequest(name=n), timeout=30))
    body = served.metrics()
    assert "\x00" not in body and "nope-" not in body and "x" * 100 not in body
    assert 'task="_other"' in body and 'task="t"' in body
    served.assert_still_serving()


# -- the network binding --------------------------------------------------------------


def test_an_open_address_without_keys_is_refused_unless_allowed(tmp_path: Path) -> None:
    command = [sys.executable, "-c", "from raee_server.cli.server import main; main()", "--data-dir",
               str(tmp_path / "data"), "--address", f"0.0.0.0:{free_port()}", "--metrics-port", "-1",
               "--http-address", ""]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=120,
                             env={k: v for k, v in os.environ.items() if k != "RAEE_ALLOW_UNAUTHENTICATED"})
    assert refused.returncode != 0
    assert "no API keys are configured" in refused.stderr and "RAEE_ALLOW_UNAUTHENTICATED" in refused.stderr
    assert "Traceback" not in refused.stderr
    # Allowed on purpose: it starts listening, with a warning in its log.
    model = save_tiny_backbone(tmp_path / "model")
    port = free_port()
    proc = start_server(["--data-dir", str(tmp_path / "data"), "--backbone", str(model), "--encoder", "hashing:32"],
                        f"0.0.0.0:{port}", {**os.environ, "RAEE_ALLOW_UNAUTHENTICATED": "1"}, log=tmp_path / "log")
    try:
        assert "WITHOUT API keys" in (tmp_path / "log").read_text()
    finally:
        proc.terminate()
        proc.wait(60)
