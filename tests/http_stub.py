"""The gRPC stub's interface over the HTTP/JSON gateway, so one table of cases runs against both transports.

`HttpStub(port).Classify(request, timeout=...)` sends the request message as JSON to the route its
`google.api.http` rule names and returns the reply message, or raises `HttpRpcError` (a
`grpc.RpcError` with `code()` and `details()`) built from the google.rpc.Status body. Every error
answer is checked on the way: a Status JSON body whose HTTP status is the one Google's mapping gives
its code (a client of the HTTP API relies on both).
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterable, Iterator
from typing import Any

import grpc
from google.protobuf import json_format, message_factory
from google.protobuf.message import Message

from raee_server.serving.gateway import NDJSON, TIMEOUT_HEADER, Route, routes
from raee_server.serving.http_errors import CODE_OF_NUMBER, HTTP_STATUS


class HttpRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, message: str, http_status: int, body: dict[str, Any]) -> None:
        super().__init__(f"{code.name}: {message}")
        self._code, self._message, self.http_status, self.body = code, message, http_status, body

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._message

    def trailing_metadata(self) -> tuple[()]:
        return ()


def _line(message: Message) -> bytes:
    return json.dumps(json_format.MessageToDict(message)).encode() + b"\n"


class HttpStub:
    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.host, self.port = host, port
        for route in routes():
            setattr(self, route.name, self._method(route))

    def _method(self, route: Route) -> Any:
        def call(request: Message | Iterable[Message], timeout: float | None = None,
                 metadata: Iterable[tuple[str, str]] | None = None) -> Any:
            messages = list(request) if route.method.client_streaming else [request]  # type: ignore[arg-type]
            first: Any = messages[0] if messages else message_factory.GetMessageClass(route.method.input_type)()
            path = route.path(**{v: getattr(first, v) for v in route.variables})
            headers = dict(metadata or ())
            if timeout is not None:
                headers[TIMEOUT_HEADER] = str(timeout)
            if route.method.client_streaming:
                body = b"".join(_line(m) for m in messages)
                headers["Content-Type"] = NDJSON
            elif route.body:
                body = _line(first)
                headers["Content-Type"] = "application/json"
            else:
                body = b""
            status, raw = self._send(route.verb, path, body, headers, timeout)
            output = message_factory.GetMessageClass(route.method.output_type)
            if status != 200:
                raise self._error(status, raw)
            if route.method.server_streaming:
                return self._stream(raw, output)
            reply = output()
            if route.response_body:  # the HTTP answer is one field of the response message
                json_format.Parse(raw, getattr(reply, route.response_body))
            else:
                json_format.Parse(raw, reply)
            return reply

        return call

    def _send(self, verb: str, path: str, body: bytes, headers: dict[str, str],
              timeout: float | None) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=None if timeout is None else timeout + 10)
        try:
            connection.request(verb, path, body=body or None, headers=headers)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    @staticmethod
    def _error(status: int, raw: bytes) -> HttpRpcError:
        try:
            body = json.loads(raw)
        except ValueError:
            raise AssertionError(f"HTTP {status} without a google.rpc.Status JSON body: {raw[:300]!r}") from None
        code = CODE_OF_NUMBER[body["code"]]
        expected = {HTTP_STATUS[code], 413} if code is grpc.StatusCode.RESOURCE_EXHAUSTED else {HTTP_STATUS[code]}
        assert status in expected, f"HTTP {status} for {code.name}; Google's mapping says {HTTP_STATUS[code]}"
        return HttpRpcError(code, body.get("message", ""), status, body)

    @staticmethod
    def _stream(raw: bytes, output: Any) -> Iterator[Message]:
        for line in raw.splitlines():
            item = json.loads(line)
            if set(item) == {"error"}:  # the whole call failed after some answers
                status = HTTP_STATUS[CODE_OF_NUMBER[item["error"]["code"]]]
                raise HttpStub._error(status, json.dumps(item["error"]).encode())
            yield json_format.ParseDict(item, output())
