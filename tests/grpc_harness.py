"""A real RaeeServer on a free localhost port, run by an event loop in a background thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import grpc

from raee_server.core.engine import Engine
from raee_server.protos.raee.v1 import raee_pb2_grpc as pb_grpc
from raee_server.serving.server import RaeeServer
from raee_server.settings import Settings


class ServerThread:
    def __init__(self, settings: Settings, engine_factory: Callable[[], Engine]) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self.run(self._make(settings, engine_factory))
        self.port = self.run(self.server.start())
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.RaeeServiceStub(self.channel)

    @staticmethod
    async def _make(settings: Settings, factory: Callable[[], Engine]) -> RaeeServer:
        return RaeeServer(settings, factory)

    def run(self, coro: Any, timeout: float = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro: Any) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def wait_ready(self, timeout: float = 900) -> None:
        # An upper bound: the first real-model server of a fresh machine converts the weights first.
        self.run(self.server.wait_ready(), timeout)

    def stop(self, grace: float = 5.0) -> None:
        self.channel.close()
        self.run(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
