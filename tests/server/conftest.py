"""Real-socket helpers for server tests: a recording WebSocket client and a running server."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from tests.contract.schemas import validate_client_message, validate_server_message
from tickwire.bench.invariant import InvariantChecker
from tickwire.core.config import Limits, ServerConfig
from tickwire.core.redis_process import RedisProcess
from tickwire.server.app import TickwireServer

Message = dict[str, Any]


class Recorder:
    """A raw WebSocket client that records every server message (arrays flattened)."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.messages: list[Message] = []
        self.checker = InvariantChecker()
        self._new = asyncio.Condition()
        self._task = asyncio.create_task(self._read())
        self.closed: tuple[int | None, str | None] | None = None
        self.contract_errors: list[str] = []
        self._events_checked = 0
        self._id = 0

    async def _read(self) -> None:
        try:
            async for frame in self.ws:
                doc = orjson.loads(frame)
                async with self._new:
                    for m in doc if isinstance(doc, list) else [doc]:
                        self._check_contract(m)
                        self.messages.append(m)
                        self.checker.feed(m)
                    self._new.notify_all()
        except websockets.ConnectionClosed:
            pass
        finally:
            self.closed = (self.ws.close_code, self.ws.close_reason)
            async with self._new:
                self._new.notify_all()

    def _check_contract(self, message: Message) -> None:
        """Check server messages against docs/asyncapi.yaml: every message but `events`, and
        the first `events` messages of each connection (jsonschema over every event of the
        load tests would make them 40 times slower; the invariant checker sees every event)."""
        if message.get("type") == "events":
            self._events_checked += 1
            if self._events_checked > 2:
                return
        try:
            validate_server_message(message)
        except AssertionError as exc:
            self.contract_errors.append(str(exc))

    async def request(self, op: str, **fields: Any) -> Message:
        self._id += 1
        rid = self._id
        request = {"op": op, "id": rid, **fields}
        validate_client_message(request)
        await self.ws.send(orjson.dumps(request).decode())
        return await self.wait_for(lambda m: m.get("id") == rid and m.get("type") != "events")

    async def send_raw(self, data: str | bytes) -> None:
        await self.ws.send(data)

    async def wait_for(
        self, pred: Callable[[Message], bool], timeout: float = 10.0, start: int = 0
    ) -> Message:
        async def find() -> Message:
            seen = start
            async with self._new:
                while True:
                    for m in self.messages[seen:]:
                        if pred(m):
                            return m
                    seen = len(self.messages)
                    if self.closed is not None:
                        raise AssertionError(
                            f"connection closed {self.closed} before the message came"
                        )
                    await self._new.wait()

        return await asyncio.wait_for(find(), timeout)

    async def wait_until(self, cond: Callable[[], bool], timeout: float = 10.0) -> None:
        async def loop() -> None:
            async with self._new:
                while not cond():
                    if self.closed is not None:
                        raise AssertionError(f"connection closed {self.closed}")
                    await self._new.wait()

        await asyncio.wait_for(loop(), timeout)

    def events(self, channel: str | None = None) -> list[Message]:
        out = []
        for m in self.messages:
            if m.get("type") == "events" and (channel is None or m["ch"] == channel):
                out.extend(m["events"])
        return out

    def last_seq(self, channel: str) -> int:
        """Seq of the last event received on `channel` (0 if none)."""
        events = self.events(channel)
        return int(events[-1]["seq"]) if events else 0

    def of_type(self, kind: str) -> list[Message]:
        return [m for m in self.messages if m.get("type") == kind]

    async def close(self) -> None:
        await self.ws.close()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@contextlib.asynccontextmanager
async def recorder(url: str, **connect: Any) -> AsyncIterator[Recorder]:
    """A recording client on `url`, once welcomed; `connect` goes to websockets' connect (an
    `ssl` context, `additional_headers`)."""
    ws = await websockets.connect(url, compression=None, max_size=None, **connect)
    rec = Recorder(ws)
    await rec.wait_for(lambda m: m.get("type") == "welcome")
    try:
        yield rec
    finally:
        await rec.close()
    assert not rec.contract_errors, rec.contract_errors[:3]


def server_config(redis: RedisProcess, **limits: Any) -> ServerConfig:
    return ServerConfig(
        redis_url=redis.url,
        port=0,
        registry_poll_s=0.05,
        meta_recheck_s=0.05,
        heartbeat_ms=60_000,
        limits=Limits(**limits),
    )


@pytest.fixture
async def server(redis_server: RedisProcess, redis: Any) -> AsyncIterator[TickwireServer]:
    async with TickwireServer(server_config(redis_server)) as srv:
        yield srv


async def http_get(port: int, path: str) -> tuple[int, bytes, float]:
    """A plain HTTP GET on loopback: status, body, and how long it took."""
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body, time.monotonic() - t0
