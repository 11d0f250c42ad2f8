"""Property tests: random input never gets an undocumented answer, and tenants never see each other.

Every string field of every RPC of `raee.v1.RaeeService` is drawn from all of Unicode (see
`unicode_strategies`): task names, texts, policies, request ids, labels, label words,
templates, descriptions and Ingest examples. Each request must get a valid answer or an
error with a documented code (INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS) whose details
carry no traceback, and `unicode_strategies.Verdict` says which of the two it must be.
After every hypothesis run a valid Classify on the known task must still be answered and
`grpc.health.v1` must still say SERVING for the service "".

A request that kills the server's worker loop is caught at once (the call is watched, not
waited out) and the server is restarted, so hypothesis can shrink to the smallest killer;
the run then fails, naming every request that killed a worker.

Every property and targeted case runs against both transports: gRPC, and the HTTP/JSON gateway
(`http_stub.HttpStub` sends the same messages as JSON and checks each error's HTTP status).

Examples per property: tens by default (the whole file takes well under a minute); set
RAEE_PROPERTY_EXAMPLES=2000 (or more) for the long run, e.g.
    RAEE_PROPERTY_EXAMPLES=2000 .venv/bin/python -m pytest tests/test_properties.py -q
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raee_server.core.engine import Engine
from raee_server.protos.raee.v1 import raee_pb2 as pb
from raee_server.protos.raee.v1 import raee_pb2_grpc as pb_grpc
from raee_server.stores.records import record_id
from raee_server.types import Row, TaskSpec

from .conftest import SENTIMENT
from .grpc_harness import ServerThread
from .http_stub import HttpStub
from .test_engine import ROWS
from .test_grpc import make_settings, tiny_engine_factory
from .tiny_models import WORDS, tiny_tokenizer
from .unicode_strategies import (
    AE,
    IA,
    NF,
    PolicyReading,
    Verdict,
    blank_strings,
    is_blank,
    long_strings,
    near_misses,
    policies,
    policy_verdict,
    weird_strings,
    zero_width_strings,
)

T = TypeVar("T")
DOCUMENTED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS}
MAX_CHARS = 300  # the test server's RAEE_MAX_TEXT_CHARS
MAX_K = 32  # make_settings' RAEE_MAX_K
DEPTH = 4  # layers of the tiny backbone
CALL_TIMEOUT = 30.0  # seconds; a dead worker shows up as a failure, never as a hang
KNOWN = SENTIMENT.name
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # task names: ASCII, fullmatch (no trailing "\n")

CLIENT_OPTIONS = [("grpc.max_metadata_size", 8192), ("grpc.absolute_max_metadata_size", 8192)]
EXAMPLES = int(os.environ.get("RAEE_PROPERTY_EXAMPLES", "0"))


def examples(short: int) -> settings:
    """`short` examples in the suite; RAEE_PROPERTY_EXAMPLES for the long run."""
    return settings(max_examples=EXAMPLES or short, deadline=None, suppress_health_check=list(HealthCheck),
                    print_blob=True)


CODE_OF_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


# -- a server that is watched and restarted ------------------------------------------------


class WorkerDied(AssertionError):
    """The server stopped working during a call (its worker loop died or it stopped answering)."""


class LiveServer:
    """The in-process server of these tests. `call` runs one RPC and fails at once (restarting the
    server) when the worker loop dies under it, instead of waiting for every later call to time out."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory, transport: str) -> None:
        self.tmp_path_factory = tmp_path_factory
        self.transport = transport
        self.deaths: list[str] = []
        self.pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="rpc")
        self.srv = self._start()

    def _start(self) -> ServerThread:
        tmp = self.tmp_path_factory.mktemp("props")
        s = make_settings(tmp, max_text_chars=MAX_CHARS, max_k=MAX_K)
        srv = ServerThread(s, tiny_engine_factory(tmp, s))
        srv.wait_ready()
        # A client with gRPC's default 8 KiB metadata limit, made exact (by default, trailers between the
        # soft and the hard limit are refused at random): an error message that echoes a long input
        # overflows it, and must not.
        srv.channel.close()
        srv.channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}", options=CLIENT_OPTIONS)
        srv.stub = pb_grpc.RaeeServiceStub(srv.channel)
        reply = srv.stub.Ingest(iter([pb.IngestRequest(task=KNOWN, examples=[pb.Example(text=t, label=l)
                                                                             for t, l in ROWS])]), timeout=120)
        assert reply.added == len(ROWS)
        if self.transport == "http":  # every call of the tests goes through the HTTP/JSON gateway instead
            srv.stub = HttpStub(srv.server.http_port)  # type: ignore[assignment]
        return srv

    def restart(self) -> None:
        old = self.srv
        stopper = threading.Thread(target=self._stop_quietly, args=(old,), daemon=True)
        stopper.start()
        stopper.join(15)
        self.srv = self._start()

    @staticmethod
    def _stop_quietly(srv: ServerThread) -> None:
        try:
            srv.channel.close()
            srv.run(srv.server.stop(0), timeout=10)
            srv.loop.call_soon_threadsafe(srv.loop.stop)
        except BaseException:
            pass

    def stop(self) -> None:
        self.srv.stop()
        self.pool.shutdown(wait=False, cancel_futures=True)

    # -- health of the worker --------------------------------------------------------

    def worker_alive(self) -> bool:
        worker = self.srv.server.worker
        alive = getattr(worker, "alive", None)
        if isinstance(alive, bool):
            return alive
        runner = getattr(worker, "_runner", None)
        return runner is None or not runner.done()

    def worker_error(self) -> str:
        runner = getattr(self.srv.server.worker, "_runner", None)
        if runner is None or not runner.done():
            return "the worker loop is not running"

        async def outcome() -> str:
            if runner.cancelled():
                return "cancelled"
            exc = runner.exception()
            return f"{type(exc).__name__}: {exc}" if exc else "returned"

        try:
            return f"the worker loop ended: {self.srv.run(outcome(), timeout=5)}"
        except BaseException as exc:  # the loop itself is stuck
            return f"the worker loop ended ({exc!r})"

    def _answers(self) -> bool:
        try:
            reply = self.srv.stub.Classify(pb.ClassifyRequest(task=KNOWN, text="a great movie"), timeout=10)
            return reply.label in SENTIMENT.label_names
        except grpc.RpcError:
            return False

    # -- calls -------------------------------------------------------------------------

    def call(self, what: str, rpc: Callable[[Any], T]) -> T:
        """rpc(stub) on a helper thread, watched: WorkerDied (and a restart) if the worker dies meanwhile."""
        future = self.pool.submit(rpc, self.srv.stub)
        give_up = time.monotonic() + CALL_TIMEOUT + 10
        while True:
            try:
                return future.result(timeout=0.05)
            except FutureTimeout:
                pass
            except grpc.RpcError as exc:
                if exc.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE) \
                        and not self._answers():
                    self._died(what, f"{exc.code().name} {exc.details()!r}, and a valid Classify fails after it")
                raise
            if not self.worker_alive():
                self._died(what, self.worker_error())
            if time.monotonic() > give_up:
                self._died(what, f"no answer in {CALL_TIMEOUT + 10:.0f} s")

    def _died(self, what: str, why: str) -> None:
        message = f"{what} -> {why}"
        self.deaths.append(message)
        self.restart()
        raise WorkerDied(f"the server stopped working (restarted to go on): {message}")

    def task_names(self) -> dict[str, list[str]]:
        """Existing tasks and their label names."""
        reply = self.call("ListTasks()", lambda s: s.ListTasks(pb.ListTasksRequest(), timeout=CALL_TIMEOUT))
        return {t.name: [lb.name for lb in t.labels] for t in reply.tasks}

    def assert_still_serving(self, deaths_before: int) -> None:
        """The key property: after a hypothesis run the service still answers and is SERVING."""
        died = self.deaths[deaths_before:]
        assert not died, "requests of this run stopped the server:\n  " + "\n  ".join(died)
        reply = self.call("Classify(valid)", lambda s: s.Classify(
            pb.ClassifyRequest(task=KNOWN, text="a great movie", options=pb.ClassifyOptions(policy="static:2")),
            timeout=CALL_TIMEOUT))
        assert reply.label in SENTIMENT.label_names and reply.exit_layer == 2
        health = health_pb2_grpc.HealthStub(self.srv.channel)
        status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT).status
        assert status == health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.ServingStatus.Name(
            status)


@pytest.fixture(scope="module", params=["grpc", "http"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    srv = LiveServer(tmp_path_factory, request.param)
    yield srv
    srv.stop()


def run_then_check(server: LiveServer, prop: Callable[[], None]) -> None:
    deaths = len(server.deaths)
    try:
        prop()
    finally:
        server.assert_still_serving(deaths)


# -- oracles ------------------------------------------------------------------------------


def _short(value: str, keep: int = 40) -> str:
    return value if len(value) <= 2 * keep else f"{value[:keep]}...<{len(value)} characters>...{value[-20:]}"


def _abbreviated(message: Any) -> Any:
    """A copy of a protobuf message whose long strings are cut (for readable failure messages)."""
    copy = type(message)()
    copy.CopyFrom(message)
    for fd, value in copy.ListFields():
        if fd.type == fd.TYPE_STRING:
            if fd.is_repeated:
                value[:] = [_short(v) for v in value]
            else:
                setattr(copy, fd.name, _short(value))
        elif fd.message_type is not None and not fd.message_type.GetOptions().map_entry:
            for sub in value if fd.is_repeated else [value]:
                sub.CopyFrom(_abbreviated(sub))
    return copy


def show(message: Any) -> str:
    """A request or reply on one line, long strings cut, every non-ASCII character escaped (so
    invisible ones can be seen)."""
    if isinstance(message, str):
        return ascii(_short(message))
    return ascii(str(_abbreviated(message)).replace("\n", " ").strip()) if hasattr(message, "ListFields") \
        else ascii(_short(str(message)))


def reasons(verdict: Verdict) -> str:
    return "; ".join(ascii(_short(why, 60)) for why, _ in verdict.must + verdict.may)


def expect(verdict: Verdict, what: str, rpc: Callable[[], T]) -> T | None:
    """Run rpc(); check an error against the verdict; return the reply when it was answered."""
    try:
        reply = rpc()
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details()
        assert not verdict.must_succeed, f"{what} failed with {code.name} {show(details)}; it must be answered"
        allowed = sorted(c.name for c in verdict.codes)
        assert code in verdict.codes and code in DOCUMENTED, \
            f"{what} failed with {code.name} {show(details)}; allowed {allowed} ({reasons(verdict)})"
        assert details and "Traceback" not in details, f"{what}: details {show(details)}"
        return None
    assert not verdict.must_fail, f"{what} was answered ({show(reply)}) but must fail: {reasons(verdict)}"
    return reply


def text_verdict(text: str, truncate: bool = False, where: str = "text") -> Verdict:
    v = Verdict()
    effective = text[:MAX_CHARS] if truncate else text
    if is_blank(effective):
        v.fail(f"{where} is empty or invisible only")
    if "\x00" in effective:
        v.fail(f"{where} holds NUL")
    if len(effective) > MAX_CHARS:
        v.fail(f"{where} is {len(effective)} characters, over {MAX_CHARS}")
    return v


def task_verdict(server: LiveServer, name: str) -> tuple[Verdict, list[str] | None]:
    if name == KNOWN:
        return Verdict(), SENTIMENT.label_names
    labels = server.task_names().get(name)
    if labels is not None:
        return Verdict(), labels
    return Verdict().fail(f"no task {name!r}", NF, IA), None


def k_verdict(k: int) -> Verdict:
    return Verdict().fail(f"k {k} over {MAX_K}") if k > MAX_K else Verdict()


def classify_verdict(server: LiveServer, request: pb.ClassifyRequest) -> tuple[Verdict, list[str] | None,
                                                                               PolicyReading | None]:
    task, labels = task_verdict(server, request.task)
    policy, reading = policy_verdict(request.options.policy, DEPTH)
    verdict = task + text_verdict(request.text, request.options.truncate) + policy + k_verdict(request.options.k)
    return verdict, labels, reading


def check_prediction(reply: pb.ClassifyResponse, labels: Sequence[str], reading: PolicyReading | None,
                     request_id: str | None = None) -> None:
    where = show(reply)
    assert reply.label in labels, where
    assert [s.label for s in reply.scores] == list(labels), where
    scores = [s.score for s in reply.scores]
    assert all(math.isfinite(s) and -1e-6 <= s <= 1 + 1e-6 for s in scores), where
    assert abs(sum(scores) - 1) < 1e-4, where
    assert reply.depth == DEPTH and 0 <= reply.exit_layer <= DEPTH, where
    for n in reply.neighbours:
        assert n.label in labels and all(0 <= layer <= DEPTH for layer in n.exit_layers), where
    if request_id is not None:
        assert reply.request_id == request_id, f"request_id not echoed: {where}"
    if reading is None:
        return
    if reading.name == "static" and reading.arg is not None:
        assert reply.exit_layer == int(reading.arg.lstrip("0") or "0"), f"policy static:{reading.arg}: {where}"
    elif reading.name == "full":
        assert reply.exit_layer == DEPTH, where
    elif reading.name == "knn-vote":
        assert reply.exit_layer == 0, where
    elif reading.name == "knn-agree" and reading.arg is not None:
        assert reply.exit_layer <= int(reading.arg.lstrip("0") or "0"), where


def classify_request(task: str, text: str, policy: str, k: int, flags: tuple[bool, bool],
                     request_id: str) -> pb.ClassifyRequest:
    options = pb.ClassifyOptions(k=k, policy=policy, return_neighbours=flags[0], truncate=flags[1])
    return pb.ClassifyRequest(task=task, text=text, options=options, request_id=request_id)


# -- strategies ------------------------------------------------------------------------------
# Hypothesis favours the first and the last branch of a one_of, and a request with several bad
# fields is refused for the first one checked; so each request draws which fields are adversarial
# (`focus`): one field at a time, or all at once, the others being valid.

words = st.lists(st.sampled_from(WORDS), min_size=1, max_size=8).map(" ".join)
texts = st.one_of(words, weird_strings(), blank_strings, zero_width_strings,
                  st.text(min_size=MAX_CHARS - 10, max_size=MAX_CHARS + 10),
                  st.builds(lambda w, junk: w + junk, words, weird_strings(long=False)), words)
task_names = st.one_of(st.just(KNOWN), near_misses(KNOWN), weird_strings(), st.just("missing"), st.just(KNOWN))
ks = st.one_of(st.integers(0, MAX_K + 8), st.just(2**32 - 1), st.integers(0, 2**32 - 1))
flags = st.tuples(st.booleans(), st.booleans())  # return_neighbours, truncate
request_ids = st.one_of(st.just(""), weird_strings())
valid_policies = st.sampled_from(["", "paper", "paper-all", "full", "static:0", "static:2", "static:4", "knn-vote",
                                  "knn-agree", "knn-agree:3", "confidence:0.7", "paper-tol:0.2", "auto"])
CLASSIFY_FOCUS = ("text", "policy", "task", "request_id", "k", "all")


def _focused_classify(focus: str, task: str, text: str, policy: str, k: int, options: tuple[bool, bool],
                      request_id: str, plain_text: str, plain_policy: str, plain_k: int) -> pb.ClassifyRequest:
    every = focus == "all"
    return classify_request(task if every or focus == "task" else KNOWN,
                            text if every or focus == "text" else plain_text,
                            policy if every or focus == "policy" else plain_policy,
                            k if every or focus == "k" else plain_k, options,
                            request_id if every or focus == "request_id" else "")


classify_requests = st.builds(_focused_classify, st.sampled_from(CLASSIFY_FOCUS), task_names, texts, policies, ks,
                              flags, request_ids, words, valid_policies, st.integers(0, MAX_K))
label_names = st.one_of(st.sampled_from(["negative", "positive", "Positive", " positive ", "positive\u200b", "",
                                         "neutral"]),
                        near_misses("positive"), weird_strings(long=False), blank_strings)
valid_task_names = st.from_regex(NAME_RE, fullmatch=True)
TOKENIZER = tiny_tokenizer()


# -- one check per RPC (used by the hypothesis tests and by the targeted cases) ---------------------


def check_classify(server: LiveServer, request: pb.ClassifyRequest) -> None:
    verdict, labels, reading = classify_verdict(server, request)
    what = f"Classify({show(request)})"
    reply = expect(verdict, what, lambda: server.call(what, lambda s: s.Classify(request, timeout=CALL_TIMEOUT)))
    if reply is not None:
        assert labels is not None
        check_prediction(reply, labels, reading, request.request_id)


def check_classify_batch(server: LiveServer, request: pb.ClassifyBatchRequest) -> None:
    options = request.options
    task_v, labels = task_verdict(server, request.task)
    policy_v, reading = policy_verdict(options.policy, DEPTH)
    verdict = task_v + policy_v + k_verdict(options.k)
    if not request.texts:
        verdict.fail("no texts")
    for i, text in enumerate(request.texts):
        verdict += text_verdict(text, options.truncate, f"texts[{i}]")
    what = f"ClassifyBatch({show(request)})"
    reply = expect(verdict, what, lambda: server.call(what, lambda s: s.ClassifyBatch(request, timeout=CALL_TIMEOUT)))
    if reply is not None:
        assert labels is not None and len(reply.results) == len(request.texts), show(reply)
        for result in reply.results:
            check_prediction(result, labels, reading)


def check_classify_stream(server: LiveServer, requests: list[pb.ClassifyRequest]) -> None:
    """One answer per request, in order; a failing request gets its own `error` and the stream goes on."""
    verdicts = [classify_verdict(server, r) for r in requests]
    messages = [pb.ClassifyStreamRequest(task=r.task, text=r.text, options=r.options, request_id=r.request_id)
                for r in requests]
    what = f"ClassifyStream([{', '.join(show(r) for r in requests)}])"
    replies: list[pb.ClassifyStreamResponse] = []

    def stream(stub: Any) -> None:
        for reply in stub.ClassifyStream(iter(messages), timeout=CALL_TIMEOUT):
            replies.append(reply)

    server.call(what, stream)
    assert len(replies) == len(requests), f"{what}: {len(replies)} answers"
    for i, (request, reply, (verdict, labels, reading)) in enumerate(zip(requests, replies, verdicts)):
        one = f"{what}[{i}] = {show(request)}"
        assert reply.index == i and reply.request_id == request.request_id, f"{one}: {show(reply)}"
        if reply.HasField("error"):
            code = CODE_OF_NUMBER.get(reply.error.code)
            message = reply.error.message
            assert not verdict.must_succeed, f"{one} failed with {code} {show(message)}; it must be answered"
            assert code in verdict.codes and code in DOCUMENTED, \
                f"{one} failed with {code} {show(message)}; allowed {sorted(c.name for c in verdict.codes)}"
            assert message and "Traceback" not in message, f"{one}: {show(message)}"
        else:
            assert not verdict.must_fail, f"{one} was answered but must fail: {reasons(verdict)}"
            assert labels is not None and reply.HasField("result"), f"{one}: {show(reply)}"
            check_prediction(reply.result, labels, reading, request.request_id)


def ingest_verdict(server: LiveServer, messages: Sequence[pb.IngestRequest]) -> tuple[Verdict, list[str] | None]:
    v = Verdict()
    named = [m.task for m in messages if m.task]
    if not named:
        return v.fail("no task named in the stream"), None
    if any(n != named[0] for n in named):
        v.fail(f"two tasks in one stream: {named}")
    if messages[0].task == "":
        v.maybe("the first message names no task")
    task_v, labels = task_verdict(server, named[0])
    return v + task_v, labels


def must_reject(text: str, label: str, labels: Sequence[str]) -> bool:
    """An Ingest example is rejected iff its text is empty (or invisible only), holds NUL or is over the
    limit, or its label, stripped of surrounding whitespace, is not exactly one of the task's labels."""
    return is_blank(text) or "\x00" in text or len(text) > MAX_CHARS or label.strip() not in labels


def check_ingest_reply(what: str, reply: pb.IngestResponse, examples_: Sequence[pb.Example],
                       labels: Sequence[str]) -> None:
    assert reply.added + reply.already_present + reply.rejected == len(examples_), f"{what}: {show(reply)}"
    indexes = [r.index for r in reply.rejections]
    assert indexes == sorted(set(indexes)) and len(indexes) == reply.rejected, f"{what}: {show(reply)}"
    for r in reply.rejections:
        assert r.reason and "Traceback" not in r.reason, f"{what}: {show(r)}"
    expected = [i for i, ex in enumerate(examples_) if must_reject(ex.text, ex.label, labels)]
    wrong = sorted(set(indexes) ^ set(expected))
    assert not wrong, "; ".join(
        f"{what}: example {i} ({show(examples_[i])}) {'wrongly rejected' if i in indexes else 'wrongly accepted'}"
        for i in wrong) + f" -> {show(reply)}"


def check_ingest(server: LiveServer, messages: list[pb.IngestRequest]) -> None:
    verdict, labels = ingest_verdict(server, messages)
    what = f"Ingest([{', '.join(show(m) for m in messages)}])"
    reply = expect(verdict, what, lambda: server.call(what, lambda s: s.Ingest(iter(messages), timeout=CALL_TIMEOUT)))
    if reply is not None:
        assert labels is not None
        check_ingest_reply(what, reply, [ex for m in messages for ex in m.examples], labels)


def check_task(what: str, task: pb.Task, name: str) -> None:
    assert task.name == name and task.depth == DEPTH, f"{what}: {show(task)}"
    assert len(task.earliest_exit_counts) == DEPTH + 1, f"{what}: {show(task)}"
    assert sum(task.earliest_exit_counts) + task.never_correct == task.records, f"{what}: {show(task)}"


def check_get_task(server: LiveServer, name: str) -> None:
    verdict, _ = task_verdict(server, name)
    what = f"GetTask(name={show(name)})"
    reply = expect(verdict, what,
                   lambda: server.call(what, lambda s: s.GetTask(pb.GetTaskRequest(name=name),
                                                                 timeout=CALL_TIMEOUT).task))
    if reply is not None:
        check_task(what, reply, name)


def check_delete_task(server: LiveServer, name: str) -> None:
    assert name != KNOWN
    verdict, _ = task_verdict(server, name)
    what = f"DeleteTask(name={show(name)})"
    try:
        expect(verdict, what, lambda: server.call(
            what, lambda s: s.DeleteTask(pb.DeleteTaskRequest(name=name), timeout=CALL_TIMEOUT)))
    finally:
        if KNOWN not in server.task_names():
            server.restart()
            raise AssertionError(f"{what} deleted task {KNOWN!r} (server restarted to go on)")


def create_verdict(request: pb.CreateTaskRequest, existing: Collection[str]) -> Verdict:
    """CreateTask's rules: an ASCII name (1-64 of letters, digits, '_', '-', '.', first a letter or digit),
    a template with {text} (and, on a causal backbone, no {mask}), at least two labels with distinct,
    non-empty names and non-empty words whose first sub-tokens differ; a taken name: ALREADY_EXISTS."""
    v = Verdict()
    if not NAME_RE.fullmatch(request.name):
        v.fail(f"task name {request.name!r} is not 1-64 ASCII letters, digits, '_', '-', '.'")
    if "{text}" not in request.template:
        v.fail("template has no {text}")
    if "{mask}" in request.template:
        v.fail("template has {mask} on a causal backbone")
    labels = list(request.labels)
    if len(labels) < 2:
        v.fail(f"{len(labels)} labels")
    names = [lb.name for lb in labels]
    if len(set(names)) != len(names):
        v.fail("duplicate label names")
    first_tokens: list[int] = []
    for lb in labels:
        if is_blank(lb.name):
            v.fail(f"label name {lb.name!r} is empty or invisible only")
        if lb.name != lb.name.strip():
            v.maybe(f"label name {lb.name!r} has whitespace around it")
        if is_blank(lb.word):
            v.fail(f"label word {lb.word!r} is empty or invisible only")
            continue
        ids = TOKENIZER(lb.word, add_special_tokens=False).input_ids
        if not ids:
            v.fail(f"label word {lb.word!r} has no token")
        elif ids[0] in first_tokens:
            v.fail(f"label word {lb.word!r} shares its first sub-token with another")
        else:
            first_tokens.append(ids[0])
    for field_name, value in [("template", request.template), ("description", request.description),
                              *((f"label {lb.name!r}", lb.name + lb.word) for lb in labels)]:
        if "\x00" in value:
            v.maybe(f"{field_name} holds NUL")
        if len(value) > 1000:
            v.maybe(f"{field_name} is {len(value)} characters long")
    if request.name in existing:
        if v.must or v.may:
            v.maybe("the name is taken", AE)
        else:
            v.fail("the name is taken", AE)
    return v


def _echo(task: pb.Task | pb.CreateTaskRequest) -> tuple[Any, ...]:
    return task.name, task.template, task.description, [(lb.name, lb.word) for lb in task.labels]


def check_create_task(server: LiveServer, request: pb.CreateTaskRequest, text: str = "a great movie",
                      policy: str = "", ingest: Sequence[pb.Example] = ()) -> None:
    """CreateTask, then (when it was created) every other RPC on the new task, then DeleteTask."""
    existing = server.task_names()
    verdict = create_verdict(request, existing)
    what = f"CreateTask({show(request)})"
    try:
        reply = expect(verdict, what, lambda: server.call(what, lambda s: s.CreateTask(request,
                                                                                        timeout=CALL_TIMEOUT).task))
    except AssertionError:
        # Created though it must not be: delete it, or it would answer ALREADY_EXISTS to the next check.
        if request.name not in existing and request.name in server.task_names():
            server.call("DeleteTask", lambda s: s.DeleteTask(pb.DeleteTaskRequest(name=request.name),
                                                             timeout=CALL_TIMEOUT))
        raise
    if reply is None:
        assert server.task_names().keys() == existing.keys(), f"{what} failed but changed the task list"
        return
    name = request.name
    labels = [lb.name for lb in request.labels]
    try:
        assert _echo(reply) == _echo(request) and reply.records == 0, f"{what} -> {show(reply)}"
        check_task(what, reply, name)
        got = server.call("GetTask", lambda s: s.GetTask(pb.GetTaskRequest(name=name), timeout=CALL_TIMEOUT).task)
        assert _echo(got) == _echo(request), f"GetTask after {what} -> {show(got)}"
        listed = server.call("ListTasks", lambda s: s.ListTasks(pb.ListTasksRequest(), timeout=CALL_TIMEOUT))
        assert [_echo(t) for t in listed.tasks if t.name == name] == [_echo(request)], f"ListTasks after {what}"
        plain = server.call("Classify", lambda s: s.Classify(pb.ClassifyRequest(task=name, text="a great movie"),
                                                             timeout=CALL_TIMEOUT))
        check_prediction(plain, labels, PolicyReading("paper", None))
        # Its labels are ingestible by name (a label with whitespace around it is not: Ingest strips labels).
        rows = [*ingest, *(pb.Example(text=f"{w} movie", label=lb) for w, lb in zip(["good", "bad", "fun", "dull"],
                                                                                     labels))]
        added = server.call("Ingest", lambda s: s.Ingest(iter([pb.IngestRequest(task=name, examples=rows)]),
                                                         timeout=CALL_TIMEOUT))
        check_ingest_reply(f"Ingest into {what}", added, rows, labels)
        check_classify(server, classify_request(name, text, policy, 0, (True, False), ""))
        check_classify_batch(server, pb.ClassifyBatchRequest(task=name, texts=["a great movie", text],
                                                             options=pb.ClassifyOptions(policy=policy)))
    finally:
        server.call("DeleteTask", lambda s: s.DeleteTask(pb.DeleteTaskRequest(name=name), timeout=CALL_TIMEOUT))
    gone = Verdict().fail("deleted", NF)
    expect(gone, f"GetTask after deleting {show(name)}", lambda: server.call(
        "GetTask", lambda s: s.GetTask(pb.GetTaskRequest(name=name), timeout=CALL_TIMEOUT)))
    expect(gone, f"Classify after deleting {show(name)}", lambda: server.call(
        "Classify", lambda s: s.Classify(pb.ClassifyRequest(task=name, text="a great movie"), timeout=CALL_TIMEOUT)))
    names = server.task_names()
    assert name not in names and KNOWN in names


# -- the hypothesis runs: each ends by checking the service still answers and is SERVING -------------


ingest_examples = st.lists(st.builds(
    lambda focus, text, label, plain_text, plain_label: pb.Example(
        text=text if focus in ("text", "all") else plain_text,
        label=label if focus in ("label", "all") else plain_label),
    st.sampled_from(("text", "label", "all", "none")), texts, label_names, words,
    st.sampled_from(SENTIMENT.label_names)),
    max_size=5)
ingest_messages = st.lists(
    st.builds(lambda task, exs: pb.IngestRequest(task=task, examples=exs),
              st.one_of(st.just(KNOWN), st.just(""), near_misses(KNOWN), weird_strings(long=False), st.just(KNOWN)),
              ingest_examples),
    max_size=3)


def _with_slot(template: str, at: int) -> str:
    at = min(at, len(template))
    return template[:at] + "{text}" + template[at:]


templates = st.one_of(
    st.builds(_with_slot, weird_strings(long=False), st.integers(0, 40)),
    st.builds(_with_slot, long_strings(1_000, 3_000), st.integers(0, 3_000)),
    st.just(SENTIMENT.template), st.just("{text}"), weird_strings(), st.just("{mask} {text}"), st.just("{ text}"),
    st.builds(_with_slot, weird_strings(long=False), st.integers(0, 40)),
)
label_words = st.one_of(st.sampled_from([" " + w for w in WORDS]), st.sampled_from(WORDS), weird_strings(long=False),
                        blank_strings)
any_labels = st.lists(st.builds(lambda n, w: pb.Label(name=n, word=w), label_names, label_words), max_size=4)
visible_label_names = st.builds(
    lambda core, junk, at: core[:at] + junk + core[at:],
    st.sampled_from(["negative", "positive", "neutral", "spam", "٣", "ｙｅｓ", "👍🏽", "אב", "x{text}"]),
    weird_strings(long=False), st.integers(0, 9),
).filter(lambda n: not is_blank(n) and "\x00" not in n and n == n.strip() and len(n) < 1000)
good_labels = st.lists(st.builds(lambda n, w: pb.Label(name=n, word=w), visible_label_names,
                                 st.sampled_from([" " + w for w in WORDS])),
                       min_size=2, max_size=4, unique_by=(lambda lb: lb.name, lambda lb: lb.word.split()[0]))
task_names_to_create = st.one_of(valid_task_names, st.just(KNOWN), near_misses(KNOWN), weird_strings(long=False),
                                 valid_task_names.map(lambda n: n + "\n"), st.just("x" * 65), valid_task_names)
CREATE_FOCUS = ("description", "labels", "template", "name", "label-names", "all", "description")


def _focused_create(focus: str, name: str, template: str, labels: list[pb.Label], description: str,
                    plain_name: str, plain_template: str, plain_labels: list[pb.Label],
                    names: list[str]) -> pb.CreateTaskRequest:
    every = focus == "all"
    if focus == "label-names":  # valid words, any names
        labels = [pb.Label(name=n, word=lb.word) for n, lb in zip(names, plain_labels)] + plain_labels[len(names):]
    return pb.CreateTaskRequest(
        name=name if every or focus == "name" else plain_name,
        template=template if every or focus == "template" else plain_template,
        labels=labels if every or focus in ("labels", "label-names") else plain_labels,
        description=description)  # the description is always drawn: any string is valid there


create_requests = st.builds(
    _focused_create, st.sampled_from(CREATE_FOCUS), task_names_to_create, templates, any_labels, weird_strings(),
    valid_task_names.filter(lambda n: n != KNOWN),
    st.one_of(st.just(SENTIMENT.template), st.builds(_with_slot, weird_strings(long=False), st.integers(0, 40)))
    .filter(lambda t: "{mask}" not in t),
    good_labels, st.lists(label_names, max_size=4))


def test_classify_answers_validly_or_with_a_documented_code(server: LiveServer) -> None:
    @examples(100)
    @given(request=classify_requests)
    def prop(request: pb.ClassifyRequest) -> None:
        check_classify(server, request)

    run_then_check(server, prop)


def test_classify_batch_answers_validly_or_with_a_documented_code(server: LiveServer) -> None:
    @examples(60)
    @given(focus=st.sampled_from(("texts", "policy", "task", "k", "all")), task=task_names,
           batch=st.lists(texts, max_size=5), policy=policies, k=ks, options=flags,
           plain=st.tuples(st.lists(words, min_size=1, max_size=5), valid_policies, st.integers(0, MAX_K)))
    def prop(focus: str, task: str, batch: list[str], policy: str, k: int, options: tuple[bool, bool],
             plain: tuple[list[str], str, int]) -> None:
        every = focus == "all"
        check_classify_batch(server, pb.ClassifyBatchRequest(
            task=task if every or focus == "task" else KNOWN,
            texts=batch if every or focus == "texts" else plain[0],
            options=pb.ClassifyOptions(k=k if every or focus == "k" else plain[2],
                                       policy=policy if every or focus == "policy" else plain[1],
                                       return_neighbours=options[0], truncate=options[1])))

    run_then_check(server, prop)


def test_classify_stream_answers_every_request_validly_or_with_a_documented_code(server: LiveServer) -> None:
    @examples(60)
    @given(requests=st.lists(classify_requests, max_size=5))
    def prop(requests: list[pb.ClassifyRequest]) -> None:
        check_classify_stream(server, requests)

    run_then_check(server, prop)


def test_ingest_accounts_for_every_example(server: LiveServer) -> None:
    @examples(60)
    @given(messages=ingest_messages)
    def prop(messages: list[pb.IngestRequest]) -> None:
        check_ingest(server, messages)

    run_then_check(server, prop)


def test_get_task_finds_exactly_the_named_task(server: LiveServer) -> None:
    @examples(60)
    @given(name=st.one_of(st.just(KNOWN), near_misses(KNOWN), weird_strings()))
    def prop(name: str) -> None:
        check_get_task(server, name)

    run_then_check(server, prop)


def test_delete_task_deletes_only_the_named_task(server: LiveServer) -> None:
    @examples(60)
    @given(name=st.one_of(near_misses(KNOWN), weird_strings(), st.just("missing")).filter(lambda n: n != KNOWN))
    def prop(name: str) -> None:
        check_delete_task(server, name)

    run_then_check(server, prop)


def record_count(server: LiveServer) -> int:
    reply = server.call("GetTask", lambda s: s.GetTask(pb.GetTaskRequest(name=KNOWN), timeout=CALL_TIMEOUT))
    return int(reply.task.records)


def check_edit_answer(what: str, rpc: Callable[[], T]) -> T | None:
    """An edit of records answers, or fails with a documented code and a message (never INTERNAL)."""
    try:
        return rpc()
    except grpc.RpcError as exc:
        assert exc.code() in DOCUMENTED, f"{what} failed with {exc.code().name} {show(exc.details())}"
        assert exc.details() and "Traceback" not in exc.details(), f"{what}: {show(exc.details())}"
        return None


def test_deleting_records_by_any_name_never_deletes_another_record(server: LiveServer) -> None:
    @examples(40)
    @given(task=task_names, ids=st.lists(weird_strings(long=False), max_size=3),
           names=st.lists(texts, max_size=3), batch=st.sampled_from([0, 0, 987654]))
    def prop(task: str, ids: list[str], names: list[str], batch: int) -> None:
        before = record_count(server)
        request = pb.DeleteRecordsRequest(task=task, ids=ids, texts=[n for n in names if n not in dict(ROWS)],
                                          batch=batch)
        what = f"DeleteRecords({show(request)})"
        reply = check_edit_answer(what, lambda: server.call(what, lambda s: s.DeleteRecords(request,
                                                                                            timeout=CALL_TIMEOUT)))
        if reply is not None:
            assert task == KNOWN and list(reply.deleted_ids) == [], f"{what}: {show(reply)}"
        assert record_count(server) == before, f"{what} deleted records it did not name"

    run_then_check(server, prop)


def test_relabelling_records_by_any_name_changes_only_what_it_names(server: LiveServer) -> None:
    relabels = st.builds(lambda i, t, lb: pb.Relabel(id=i, text=t, label=lb),
                         st.one_of(st.just(""), weird_strings(long=False)),
                         st.one_of(st.just(""), texts), st.one_of(st.sampled_from(["positive", "negative"]),
                                                                  weird_strings(long=False)))

    @examples(40)
    @given(task=task_names, records=st.lists(relabels, max_size=3))
    def prop(task: str, records: list[pb.Relabel]) -> None:
        records = [r for r in records if r.text not in dict(ROWS)]  # only names that match no record
        request = pb.RelabelRecordsRequest(task=task, records=records)
        what = f"RelabelRecords({show(request)})"
        reply = check_edit_answer(what, lambda: server.call(what, lambda s: s.RelabelRecords(request,
                                                                                             timeout=CALL_TIMEOUT)))
        if reply is not None:
            assert task == KNOWN and reply.relabelled == 0, f"{what}: {show(reply)}"
            assert sorted(r.index for r in reply.rejections) == list(range(len(records))), f"{what}: {show(reply)}"

    run_then_check(server, prop)


def test_create_task_round_trips_every_string_then_serves_and_deletes_it(server: LiveServer) -> None:
    @examples(40)
    @given(request=create_requests, text=texts, policy=policies, ingest=ingest_examples)
    def prop(request: pb.CreateTaskRequest, text: str, policy: str, ingest: list[pb.Example]) -> None:
        check_create_task(server, request, text, policy, ingest)

    run_then_check(server, prop)


# -- targeted cases: the inputs most likely to break a check, each run every time -----------------------


def _classify(text: str = "a great movie", policy: str = "", task: str = KNOWN) -> Callable[[LiveServer], None]:
    return lambda server: check_classify(server, pb.ClassifyRequest(task=task, text=text,
                                                                    options=pb.ClassifyOptions(policy=policy)))


def _create(name: str = "t-new", labels: Sequence[tuple[str, str]] = (("no", " bad"), ("yes", " good")),
            template: str = "{text} ?", description: str = "") -> Callable[[LiveServer], None]:
    request = pb.CreateTaskRequest(name=name, template=template, description=description,
                                   labels=[pb.Label(name=n, word=w) for n, w in labels])
    return lambda server: check_create_task(server, request)


LONG_NAME = "\u0214" * 30_000  # its echo in an error message must not overflow gRPC's metadata limits
TARGETED: dict[str, Callable[[LiveServer], None]] = {
    **{f"Classify policy {ascii(p)}": _classify(policy=p) for p in [
        "static:²", "static:٣", "static:३", "static:߃", "static:３", "static:𝟑", "static:①", "static:2\u200b",
        "static:\u20602", "static:" + "9" * 5000, "static:" + "0" * 5000 + "1", "knn-agree:²", "knn-agree:٣",
        "knn-agree:" + "1" * 5000, "confidence:٠.٥", "confidence:０.５", "confidence:0.٥", "confidence:½",
        "confidence:nan", "confidence:0.5\u200b", "paper-tol:٠.١", "paper-tol:０.１", "paper-tol:inf", "paper:²",
        "\u202estatic:2", "static\u200b:2", "ｓｔａｔｉｃ:2", "STATIC:2", "static:2", "confidence:0.7", "knn-agree:2"]},
    **{f"Classify text {ascii(t)}": _classify(text=t) for t in [
        "\u200b", "\u2060", "\ufeff", "\u202e", "\u200b\u2060\ufeff", "\u200b \u2060\n", "\u00ad", "\x00", "a\x00b",
        "\U000e0001", "a\u200b", "²", "٣", "\u202egood movie"]},
    **{f"Classify long policy {name}": _classify(policy=p) for name, p in [
        ("unknown", "\xa1" * 3000), ("static:<foreign digits>", "static:" + "\u0663" * 3000),
        ("confidence:<junk>", "confidence:" + "x\u200b" * 3000), ("paper:<arg>", "paper:" + "\xb2" * 3000),
        ("knn-agree:<junk>", "knn-agree:" + "\U0010ffff" * 2000)]},
    "Classify task 'sentiment\\n'": _classify(task=KNOWN + "\n"),
    "Classify task fullwidth": _classify(task="ｓｅｎｔｉｍｅｎｔ"),
    "Classify task 30k characters": _classify(task=LONG_NAME),
    "ClassifyBatch zero-width text": lambda server: check_classify_batch(server, pb.ClassifyBatchRequest(
        task=KNOWN, texts=["a great movie", "\u200b\u2060"])),
    "ClassifyStream static:\\xb2 then a valid request": lambda server: check_classify_stream(server, [
        pb.ClassifyRequest(task=KNOWN, text="good", options=pb.ClassifyOptions(policy="static:²")),
        pb.ClassifyRequest(task=KNOWN, text="good")]),
    "Ingest zero-width text": lambda server: check_ingest(server, [pb.IngestRequest(task=KNOWN, examples=[
        pb.Example(text="\u200b\u2060", label="positive"), pb.Example(text="\ufeff", label="negative"),
        pb.Example(text="a fine movie", label="positive\u200b"), pb.Example(text="a fine movie", label=" positive")])]),
    "Ingest two tasks with long names": lambda server: check_ingest(server, [
        pb.IngestRequest(task=KNOWN, examples=[pb.Example(text="a fine film", label="positive")]),
        pb.IngestRequest(task=LONG_NAME, examples=[pb.Example(text="a dull film", label="negative")])]),
    "GetTask 30k characters": lambda server: check_get_task(server, LONG_NAME),
    "GetTask 'sentiment\\n'": lambda server: check_get_task(server, KNOWN + "\n"),
    "DeleteTask 30k characters": lambda server: check_delete_task(server, LONG_NAME),
    "DeleteTask 'sentiment\\n'": lambda server: check_delete_task(server, KNOWN + "\n"),
    "Classify request_id echoed": lambda server: check_classify(server, classify_request(
        KNOWN, "a great movie", "", 0, (False, False), "r-1\u200b٣")),
    "ClassifyStream request_id echoed": lambda server: check_classify_stream(server, [
        classify_request(KNOWN, "good", "", 0, (False, False), "a"), classify_request(KNOWN, "\u200b", "", 0,
                                                                                       (False, False), "b\x00")]),
    "CreateTask valid": _create(name="t-valid"),
    "CreateTask name ending in newline": _create(name="t-newline\n"),
    "CreateTask name with a zero-width space": _create(name="t\u200bzw"),
    "CreateTask name with an Arabic-Indic digit": _create(name="t\u0663"),
    "CreateTask name 30k characters": _create(name=LONG_NAME),
    "CreateTask zero-width label name": _create(name="t-zw-name", labels=(("\u200b", " bad"), ("yes", " good"))),
    "CreateTask zero-width label word": _create(name="t-zw-word", labels=(("no", "\u2060"), ("yes", " good"))),
    "CreateTask zero-width and space label word": _create(name="t-zw-word2",
                                                          labels=(("no", "\u200b\xa0"), ("yes", " good"))),
    "CreateTask template with only a zero-width slot": _create(name="t-tpl", template="{te\u200bxt}"),
    "CreateTask weird strings everywhere": _create(
        name="t-weird", labels=(("٣\u202e", " bad"), ("ｙｅｓ", " good")), template="\u202e{text}\ufeff²",
        description="\u200b٣\x01" + "\U0010ffff" * 100),
}


@pytest.mark.parametrize("case", list(TARGETED), ids=[c if len(c) < 70 else c[:60] + "..." for c in TARGETED])
def test_targeted_input_gets_a_valid_or_documented_answer(server: LiveServer, case: str) -> None:
    run_then_check(server, lambda: TARGETED[case](server))


# -- tenants -----------------------------------------------------------------------------------


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.lists(st.tuples(st.sampled_from(["t0", "t1", "t2"]), st.lists(st.sampled_from(WORDS), min_size=1,
                                                                               max_size=5).map(" ".join),
                               st.sampled_from(["negative", "positive"])), min_size=3, max_size=30),
       queries=st.lists(st.lists(st.sampled_from(WORDS), min_size=1, max_size=5).map(" ".join), min_size=1,
                        max_size=4))
def test_a_task_never_reads_or_is_influenced_by_another(engine_factory_dir: Path, data: list[tuple[str, str, str]],
                                                        queries: list[str]) -> None:
    where = engine_factory_dir / uuid.uuid4().hex
    engine: Engine = tiny_engine_factory(where, make_settings(where))()
    try:
        for name in ("t0", "t1", "t2"):
            engine.create_task(TaskSpec(name, SENTIMENT.template, SENTIMENT.labels))
        t0_rows = [Row(i, text, label) for i, (task, text, label) in enumerate(data) if task == "t0"]
        engine.ingest("t0", t0_rows)
        alone = engine.classify("t0", queries, k=32, policy="paper")
        # The same texts and labels in the other tenants must change nothing for t0.
        for name in ("t1", "t2"):
            engine.ingest(name, [Row(i, text, label) for i, (_, text, label) in enumerate(data)])
        shared = engine.classify("t0", queries, k=32, policy="paper")
        own = {record_id("t0", r.text) for r in t0_rows}
        for a, b in zip(alone, shared):
            assert (a.label, a.exit_layer, [n.id for n in a.neighbours]) == (b.label, b.exit_layer,
                                                                             [n.id for n in b.neighbours])
            assert {n.id for n in b.neighbours} <= own
    finally:
        engine.close()


@pytest.fixture(scope="module")
def engine_factory_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tenants")


# -- a task with several inputs (a sentence pair) ----------------------------------------------------------

PAIRS = TaskSpec("pairs", "first {first} second {second} ? the answer is", SENTIMENT.labels, inputs=("first", "second"))
pair_inputs = st.dictionaries(st.one_of(st.sampled_from(["first", "second", "third", "text"]),
                                        weird_strings(long=False)), texts, max_size=3)


def test_a_pair_tasks_inputs_are_answered_or_refused_naming_the_input(server: LiveServer) -> None:
    """Any inputs, with or beside a text, truncated or not: an answer exactly when the task's own rule
    (TaskSpec.text_of) takes them, else INVALID_ARGUMENT whose message starts with the field at fault."""
    from raee_server.errors import InvalidInput
    from raee_server.types import truncate as cut

    if PAIRS.name not in server.task_names():
        server.call("CreateTask", lambda s: s.CreateTask(pb.CreateTaskRequest(
            name=PAIRS.name, template=PAIRS.template, inputs=list(PAIRS.inputs),
            labels=[pb.Label(name=lb.name, word=lb.word) for lb in PAIRS.labels]), timeout=CALL_TIMEOUT))

    @examples(60)
    @given(values=pair_inputs, text=st.one_of(st.just(""), words), shorten=st.booleans())
    def prop(values: dict[str, str], text: str, shorten: bool) -> None:
        request = pb.ClassifyRequest(task=PAIRS.name, text=text, inputs=values,
                                     options=pb.ClassifyOptions(truncate=shorten, policy="knn-vote"))
        field: str | None = None
        if values and text:
            field = "text"
        else:
            try:
                example = values or text
                PAIRS.text_of(cut(example, MAX_CHARS) if shorten else example, "inputs" if values else "text",
                              MAX_CHARS)
            except InvalidInput as exc:
                field = exc.field or "inputs"
        try:
            reply = server.call("Classify(pair)", lambda s: s.Classify(request, timeout=CALL_TIMEOUT))
        except grpc.RpcError as exc:
            assert field is not None, f"{show(request)} failed with {exc.code().name} {show(exc.details())}"
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT and exc.details().startswith(field[:20]), \
                f"{show(request)}: {exc.code().name} {show(exc.details())}, expected one naming {show(field)}"
            return
        assert field is None, f"{show(request)} was answered but must be refused at {show(field)}"
        assert reply.label in PAIRS.label_names

    run_then_check(server, prop)
