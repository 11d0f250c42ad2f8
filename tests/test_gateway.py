"""The HTTP/JSON gateway: routes from the proto, protobuf's JSON mapping, google.rpc.Status errors with
Google's HTTP statuses, NDJSON streams, limits, deadlines, probes, and the generated OpenAPI document.

The shared hostile and property tables run over HTTP in test_properties.py and test_security.py;
this file holds what only HTTP has."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raee_server.protos.raee.v1 import raee_pb2 as pb
from raee_server.serving.gateway import routes
from raee_server.serving.http_errors import CODE_OF_NUMBER, HTTP_STATUS
from raee_server.serving.openapi import openapi

from .grpc_harness import ServerThread
from .test_engine import ROWS
from .test_grpc import make_settings, tiny_engine_factory
from .unicode_strategies import weird_strings

ROOT = Path(__file__).resolve().parents[1]
MAX_BYTES = 64 * 1024


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ServerThread]:
    settings = make_settings(tmp_path, max_message_bytes=MAX_BYTES)
    server = ServerThread(settings, tiny_engine_factory(tmp_path, settings))
    server.wait_ready()
    server.stub.Ingest(iter([pb.IngestRequest(task="sentiment", examples=[pb.Example(text=t, label=l)
                                                                         for t, l in ROWS])]))
    yield server
    server.stop()


def call(server: ServerThread, verb: str, path: str, body: bytes | str | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", server.server.http_port, timeout=60)
    try:
        connection.request(verb, path, body=body.encode() if isinstance(body, str) else body, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def error(server: ServerThread, verb: str, path: str, body: bytes | str | None = None,
          headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    status, head, raw = call(server, verb, path, body, headers)
    assert head["content-type"].startswith("application/json"), raw
    return status, json.loads(raw)


def test_every_rpc_has_a_route_and_the_committed_openapi_document_is_generated_from_the_proto() -> None:
    service = pb.DESCRIPTOR.services_by_name["RaeeService"]
    assert sorted(r.name for r in routes()) == sorted(m.name for m in service.methods)
    committed = json.loads((ROOT / "docs" / "openapi.json").read_text())
    assert committed == openapi(), "docs/openapi.json is stale: run `raee-admin openapi > docs/openapi.json`"
    paths = openapi()["paths"]
    assert paths["/v1/tasks/{task}:classify"]["post"]["operationId"] == "Classify"
    assert paths["/v1/tasks/{name}"].keys() == {"get", "delete"}
    assert "exitLayer" in openapi()["components"]["schemas"]["raee.v1.ClassifyResponse"]["properties"]


def test_classify_over_http_gives_the_grpc_answer_in_protobufs_json_mapping(served: ServerThread) -> None:
    options = pb.ClassifyOptions(policy="static:2", return_neighbours=True)
    by_grpc = served.stub.Classify(pb.ClassifyRequest(task="sentiment", text="a great movie", options=options))
    status, head, raw = call(served, "POST", "/v1/tasks/sentiment:classify",
                             '{"text": "a great movie", "options": {"policy": "static:2", "return_neighbours": true}}',
                             {"x-request-id": "req-42"})
    assert status == 200 and head["x-request-id"] == "req-42"
    answer = json.loads(raw)
    assert answer["label"] == by_grpc.label and answer["exitLayer"] == 2 == by_grpc.exit_layer
    assert [s["label"] for s in answer["scores"]] == ["negative", "positive"]
    assert [round(s["score"], 5) for s in answer["scores"]] == [round(s.score, 5) for s in by_grpc.scores]
    assert [n["id"] for n in answer["neighbours"]] == [n.id for n in by_grpc.neighbours]
    assert isinstance(answer["timings"]["totalUs"], str)  # 64-bit integers are strings in the JSON mapping
    # Fields at their default value are written out: exit layer 0 is an answer, not a missing field.
    status, _, raw = call(served, "POST", "/v1/tasks/sentiment:classify", '{"text": "good", "options": '
                                                                          '{"policy": "static:0"}}')
    assert status == 200 and json.loads(raw)["exitLayer"] == 0 and json.loads(raw)["policy"] == "static:0"
    assert answer["policy"] == by_grpc.policy == "static:2"


def test_a_classify_over_http_that_names_no_policy_is_answered_by_auto_and_says_so(served: ServerThread) -> None:
    task = served.stub.GetTask(pb.GetTaskRequest(name="sentiment")).task
    assert task.records and not task.auto.policy  # records, no tuned choice yet: the fallback answers
    expected = "auto=knn-vote (no auto choice yet)"
    status, _, raw = call(served, "POST", "/v1/tasks/sentiment:classify", '{"text": "a great movie"}')
    by_grpc = served.stub.Classify(pb.ClassifyRequest(task="sentiment", text="a great movie"))
    assert status == 200 and json.loads(raw)["policy"] == by_grpc.policy == expected
    assert json.loads(raw)["exitLayer"] == 0
    status, _, raw = call(served, "POST", "/v1/tasks/sentiment:classifyBatch",
                          '{"texts": ["good", "bad"], "options": {"policy": "auto"}}')
    assert status == 200
    assert [r["policy"] for r in json.loads(raw)["results"]] == [expected] * 2


def test_errors_are_status_bodies_with_googles_http_status_and_details(served: ServerThread) -> None:
    status, body = error(served, "POST", "/v1/tasks/sentiment:classify", '{"text": "\\u200b"}')
    assert (status, body["code"]) == (400, grpc.StatusCode.INVALID_ARGUMENT.value[0])
    kinds = {d["@type"].rsplit("/", 1)[1]: d for d in body["details"]}
    assert kinds["google.rpc.BadRequest"]["fieldViolations"][0]["field"] == "text"
    assert kinds["google.rpc.ErrorInfo"]["domain"] == "raee.v1"
    status, body = error(served, "GET", "/v1/tasks/nope")
    assert (status, body["code"]) == (404, 5) and "nope" in body["message"]
    create = json.dumps({"name": "sentiment", "template": "{text}", "labels": [
        {"name": "a", "word": " a"}, {"name": "b", "word": " b"}]})
    status, body = error(served, "POST", "/v1/tasks", create)
    assert (status, body["code"]) == (409, 6)
    status, head, raw = call(served, "PUT", "/v1/tasks/sentiment")
    assert status == 405 and head["allow"] == "GET, DELETE" and json.loads(raw)["code"] == 12
    status, body = error(served, "GET", "/nowhere")
    assert (status, body["code"]) == (404, 5) and "openapi.json" in body["message"]
    # A deadline that has passed: DEADLINE_EXCEEDED, 504.
    status, body = error(served, "POST", "/v1/tasks/sentiment:classify", '{"text": "good"}',
                         {"x-server-timeout": "0.000001"})
    assert (status, body["code"]) == (504, 4)
    assert all(HTTP_STATUS[c] // 100 in (2, 4, 5) for c in HTTP_STATUS)


@pytest.mark.parametrize(("body", "expected"), [
    ('{"text": "good"', "body: not valid JSON (Expecting ',' delimiter at line 1 column 16)"),
    ('{"txet": "good"}', 'no field named "txet"'),
    ('{"text": 5}', "Failed to parse text field"),
    ('{"text": "good", "options": {"k": "many"}}', "Failed to parse k field"),
    ('["good"]', "body: a JSON object is expected, not list"),
    ('{"task": "other", "text": "good"}', "task: the path names 'sentiment' and the body 'other'"),
    (b'{"text": "\xff"}', "body: not UTF-8"),
    ('{"text": "good"}', None),
])
def test_a_bad_body_is_invalid_argument_naming_the_field_or_position(served: ServerThread, body: str | bytes,
                                                                   expected: str | None) -> None:
    status, _, raw = call(served, "POST", "/v1/tasks/sentiment:classify", body)
    if expected is None:
        assert status == 200
        return
    answer = json.loads(raw)
    assert (status, answer["code"]) == (400, 3) and expected in answer["message"], answer


def test_a_body_over_the_size_limit_is_refused_and_nothing_is_stored(served: ServerThread) -> None:
    before = served.stub.GetTask(pb.GetTaskRequest(name="sentiment")).task.records
    big = json.dumps({"examples": [{"text": f"text number {i} " + "x" * 100, "label": "positive"}
                                   for i in range(1000)]})
    assert len(big) > MAX_BYTES
    status, body = error(served, "POST", "/v1/tasks/sentiment:ingest", big, {"Content-Type": "application/json"})
    assert (status, body["code"]) == (413, grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
    assert "RAEE_MAX_MESSAGE_BYTES" in body["message"]
    assert served.stub.GetTask(pb.GetTaskRequest(name="sentiment")).task.records == before


def test_ndjson_ingest_reports_rejections_and_a_bad_line_by_its_number(served: ServerThread) -> None:
    lines = [{"examples": [{"text": "a fresh film", "label": "positive"}, {"text": "", "label": "negative"}]},
             {"examples": [{"text": "a stale film", "label": "negative"}]}]
    ndjson = "".join(json.dumps(line) + "\n" for line in lines)
    status, head, raw = call(served, "POST", "/v1/tasks/sentiment:ingest", ndjson,
                             {"Content-Type": "application/x-ndjson"})
    reply = json.loads(raw)
    assert status == 200, reply
    assert (reply["added"], reply["rejected"]) == (2, 1) and reply["rejections"] == [{"index": 1,
                                                                                       "reason": "empty text"}]
    # A line that is not JSON fails the call, naming the line; sent again fixed, only what is missing is added.
    broken = json.dumps({"examples": [{"text": "a new film", "label": "positive"}]}) + "\n{oops\n"
    status, body = error(served, "POST", "/v1/tasks/sentiment:ingest", broken,
                         {"Content-Type": "application/x-ndjson"})
    assert (status, body["code"]) == (400, 3) and body["message"].startswith("body line 2: not valid JSON")
    fixed = json.dumps({"examples": [{"text": "a new film", "label": "positive"},
                                     {"text": "a fresh film", "label": "positive"}]})
    status, _, raw = call(served, "POST", "/v1/tasks/sentiment:ingest", fixed, {"Content-Type": "application/json"})
    again = json.loads(raw)
    assert status == 200 and again["added"] + again["alreadyPresent"] == 2 and again["alreadyPresent"] >= 1


def test_classify_stream_is_ndjson_in_request_order_with_errors_in_place(served: ServerThread) -> None:
    requests = [{"task": "sentiment", "text": "good", "requestId": "a"}, {"task": "sentiment", "text": ""},
                {"task": "nope", "text": "good"}, {"task": "sentiment", "text": "bad", "requestId": "d"}]
    status, head, raw = call(served, "POST", "/v1:classifyStream", "".join(json.dumps(r) + "\n" for r in requests))
    assert status == 200 and head["content-type"].startswith("application/x-ndjson")
    answers = [json.loads(line) for line in raw.splitlines()]
    assert [a["index"] for a in answers] == [0, 1, 2, 3]
    assert answers[0]["requestId"] == "a" and answers[0]["result"]["label"] and "error" not in answers[0]
    assert answers[1]["error"]["code"] == 3 and answers[2]["error"]["code"] == 5 and "result" not in answers[1]
    assert answers[3]["requestId"] == "d" and answers[3]["result"]["label"]


def test_task_stats_count_recent_answers_by_exit_layer(served: ServerThread) -> None:
    for policy in ("static:1", "static:1", "static:3"):
        status, _, _ = call(served, "POST", "/v1/tasks/sentiment:classify",
                            json.dumps({"text": "good", "options": {"policy": policy}}))
        assert status == 200
    status, _, raw = call(served, "GET", "/v1/tasks/sentiment/stats")
    stats = json.loads(raw)
    assert status == 200 and stats["answers"] == 3 and stats["depth"] == 4
    assert [int(c) for c in stats["exitLayerCounts"]] == [0, 2, 0, 1, 0]
    assert 0 < stats["latencyP50Ms"] <= stats["latencyP90Ms"] <= stats["latencyP99Ms"] and stats["since"]
    assert error(served, "GET", "/v1/tasks/nope/stats")[0] == 404
    # The same over gRPC; a deleted task's window goes with it.
    assert served.stub.GetTaskStats(pb.GetTaskStatsRequest(name="sentiment")).answers == 3


def test_probes_follow_health_and_the_console_and_openapi_are_served(tmp_path: Path) -> None:
    gate = threading.Event()
    settings = make_settings(tmp_path)
    server = ServerThread(settings, tiny_engine_factory(tmp_path, settings, gate))
    try:
        assert call(server, "GET", "/healthz")[0] == 200  # alive while the models load
        status, _, raw = call(server, "GET", "/readyz")
        assert status == 503 and json.loads(raw)["status"] == "NOT_SERVING"
        gate.set()
        server.wait_ready()
        assert call(server, "GET", "/readyz")[0] == 200
        status, head, raw = call(server, "GET", "/")
        assert status == 200 and head["content-type"].startswith("text/html") and b"console.js" in raw
        assert call(server, "GET", "/console/console.js")[0] == 200
        status, _, raw = call(server, "GET", "/openapi.json")
        assert status == 200 and json.loads(raw) == openapi()
    finally:
        gate.set()
        server.stop()


def test_list_tasks_pages_over_grpc_and_http_query_parameters(served: ServerThread) -> None:
    labels = [pb.Label(name="a", word=" good"), pb.Label(name="b", word=" bad")]
    for name in ("t1", "t2", "t3", "t4"):
        served.stub.CreateTask(pb.CreateTaskRequest(name=name, template="{text} :", labels=labels))
    names, token, pages = [], "", 0
    while True:
        page = served.stub.ListTasks(pb.ListTasksRequest(page_size=2, page_token=token))
        names += [t.name for t in page.tasks]
        pages += 1
        if not (token := page.next_page_token):
            break
    assert names == ["sentiment", "t1", "t2", "t3", "t4"] and pages == 3
    status, _, raw = call(served, "GET", "/v1/tasks?page_size=3")
    first = json.loads(raw)
    assert status == 200 and [t["name"] for t in first["tasks"]] == ["sentiment", "t1", "t2"]
    status, _, raw = call(served, "GET", f"/v1/tasks?page_size=3&page_token={first['nextPageToken']}")
    second = json.loads(raw)
    assert [t["name"] for t in second["tasks"]] == ["t3", "t4"] and second["nextPageToken"] == ""
    for query, field in (("page_size=0x", "page_size"), ("page_size=5000", "page_size"),
                         ("page_token=%25%25", "page_token"), ("colour=red", "colour")):
        status, body = error(served, "GET", f"/v1/tasks?{query}")
        assert (status, body["code"]) == (400, 3) and field in body["message"], (query, body)


def test_server_info_names_the_models_limits_and_policies(served: ServerThread) -> None:
    info = served.stub.GetServerInfo(pb.GetServerInfoRequest())
    assert (info.backbone, info.encoder, info.depth) == ("tiny-gemma3", "hashing-32", 4)
    assert info.max_k == 32 and info.max_text_chars == 200 and info.max_message_bytes == MAX_BYTES
    assert {"paper", "auto", "cascade", "heads"} <= set(info.policies) and not info.api_keys_required
    status, _, raw = call(served, "GET", "/v1/server")
    assert status == 200 and json.loads(raw)["depth"] == 4


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(verb=st.sampled_from(["GET", "POST", "DELETE", "PUT", "PATCH"]),
       path=st.lists(weird_strings(max_size=20, long=False), max_size=4),
       suffix=st.sampled_from(["", ":classify", ":classifyBatch", ":ingest", "/stats"]),
       query=st.dictionaries(weird_strings(max_size=10, long=False), weird_strings(max_size=10, long=False),
                             max_size=2),
       body=st.one_of(st.binary(max_size=200), weird_strings(max_size=60).map(str.encode),
                      st.just(b'{"text": "good"}')),
       content_type=st.sampled_from(["application/json", "application/x-ndjson", "text/plain", ""]),
       extra=st.dictionaries(st.sampled_from(["x-api-key", "x-request-id", "authorization", "x-server-timeout"]),
                             st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF,
                                                   exclude_categories=("Cc",)), max_size=30), max_size=3))
def test_any_http_request_gets_a_status_body_and_never_stops_the_server(
        http_served: ServerThread, verb: str, path: list[str], suffix: str, query: dict[str, str], body: bytes,
        content_type: str, extra: dict[str, str]) -> None:
    """Paths, query parameters, headers and bodies from all of Unicode and raw bytes: every answer is a JSON body
    (an answer or a google.rpc.Status whose HTTP status is its code's), and the server keeps serving."""
    from urllib.parse import quote, urlencode

    target = "/v1/" + "/".join(quote(p, safe="") for p in path) + quote(suffix, safe=":/")
    if query:
        target += "?" + urlencode(query)
    headers = {**({"Content-Type": content_type} if content_type else {}), **extra}
    status, head, raw = call(http_served, verb, target, body if verb in ("POST", "PUT", "PATCH") else None, headers)
    assert head["content-type"].startswith(("application/json", "application/x-ndjson")), (status, raw[:200])
    if status != 200:
        answer = json.loads(raw)
        code = CODE_OF_NUMBER[answer["code"]]
        assert status in (HTTP_STATUS[code], 405, 413) and answer["message"], answer
        assert "Traceback" not in answer["message"]
    assert http_served.stub.Classify(pb.ClassifyRequest(task="sentiment", text="a great movie"), timeout=30).label


@pytest.fixture(scope="module")
def http_served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    where = tmp_path_factory.mktemp("http-props")
    settings = make_settings(where, max_message_bytes=MAX_BYTES)
    server = ServerThread(settings, tiny_engine_factory(where, settings))
    server.wait_ready()
    yield server
    server.stop()


def test_the_gateways_own_errors_carry_error_info(served: ServerThread) -> None:
    cases = [("POST", "/v1/tasks/sentiment:classify", '{"text": ', "INVALID_INPUT", 400),
             ("GET", "/nowhere", None, "NO_ROUTE", 404),
             ("PUT", "/v1/tasks/sentiment", None, "METHOD_NOT_ALLOWED", 405),
             ("POST", "/v1/tasks/sentiment:classify", '{"text": "' + "x" * MAX_BYTES + '"}', "BODY_TOO_LARGE", 413)]
    for verb, path, body, reason, http_status in cases:
        status, answer = error(served, verb, path, body)
        info = [d for d in answer["details"] if d["@type"].endswith("google.rpc.ErrorInfo")]
        assert status == http_status and info == [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                                                   "reason": reason, "domain": "raee.v1"}], answer


@pytest.mark.parametrize("wrap", [lambda d: "[" * d + "]" * d, lambda d: '{"text": "good", "options": ' + '{"a":' * d
                                  + "1" + "}" * d + "}"])
def test_a_hostile_deeply_nested_body_is_400_and_the_next_request_answers(tmp_path: Path, wrap: Any) -> None:
    settings = make_settings(tmp_path)  # the default 4 MiB limit: 200,000 levels fit in it
    server = ServerThread(settings, tiny_engine_factory(tmp_path, settings))
    try:
        server.wait_ready()
        for path in ("/v1/tasks/sentiment:classify", "/v1/tasks/sentiment:ingest"):
            status, answer = error(server, "POST", path, wrap(200_000))
            assert (status, answer["code"]) == (400, 3) and "nested too deeply" in answer["message"], answer
        status, head, _ = call(server, "POST", "/v1/tasks/sentiment:ingest", wrap(200_000),
                               {"Content-Type": "application/x-ndjson"})
        assert status == 400
        status, _, raw = call(server, "POST", "/v1/tasks/sentiment:classify", '{"text": "good"}')
        assert status == 200 and json.loads(raw)["label"]
    finally:
        server.stop()
