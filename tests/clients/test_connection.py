"""The asyncio feed against small scripted WebSocket servers: reconnect, resume, refusals, backoff.

The scripted servers speak just enough protocol v1 to put the client in each situation; the real
server is exercised in test_integration.py.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from tickwire.clients import (
    AuthenticationFailed,
    Backoff,
    ClientConfig,
    ConnectFailed,
    Disconnected,
    Feed,
    FeedClosed,
    FeedMessage,
    Position,
    Received,
    Reconnected,
    ServerError,
    connect,
)
from tickwire.core.redis_process import free_port

CH = "trades:BTC-USD"
WELCOME = {"type": "welcome", "protocol": 1, "server": "fake", "heartbeat_ms": 5000, "limits": {}}

Handler = Callable[[ServerConnection, int], Awaitable[None]]


def trade(seq: int, epoch: str = "e1") -> dict[str, Any]:
    return {
        "v": 1,
        "type": "trade",
        "sym": "BTC-USD",
        "ts": 1,
        "pt": 1,
        "price": 2.5,
        "size": 1.0,
        "side": "buy",
        "trade_id": seq,
        "epoch": epoch,
        "seq": seq,
    }


def events(seqs: range | list[int], epoch: str = "e1") -> bytes:
    msg = {"type": "events", "ch": CH, "epoch": epoch, "events": [trade(s, epoch) for s in seqs]}
    return orjson.dumps(msg)


class ScriptedServer:
    """Runs `handler(ws, n)` for the n-th connection (0-based); records requests and headers."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[list[dict[str, Any]]] = []
        self.headers: list[Headers] = []
        self.url = ""
        self._arrived = asyncio.Condition()

    async def _handle(self, ws: ServerConnection) -> None:
        n = self.connections
        self.requests.append([])
        assert ws.request is not None
        self.headers.append(ws.request.headers)
        async with self._arrived:
            self.connections += 1
            self._arrived.notify_all()
        await ws.send(orjson.dumps(WELCOME))
        await self.handler(ws, n)

    async def wait_connections(self, n: int, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout), self._arrived:
            await self._arrived.wait_for(lambda: self.connections >= n)

    async def recv(self, ws: ServerConnection) -> dict[str, Any]:
        doc: dict[str, Any] = orjson.loads(await ws.recv())
        self.requests[-1].append(doc)
        return doc

    async def ack(self, ws: ServerConnection) -> dict[str, Any]:
        """Receive a subscribe request and acknowledge it."""
        req = await self.recv(ws)
        assert req["op"] == "subscribe", req
        await ws.send(orjson.dumps({"type": "subscribed", "id": req["id"], "channels": [CH]}))
        return req


@asynccontextmanager
async def scripted(
    handler: Handler,
    process_request: Callable[[ServerConnection, Request], Response | None] | None = None,
) -> AsyncIterator[ScriptedServer]:
    server = ScriptedServer(handler)
    async with serve(server._handle, "127.0.0.1", 0, process_request=process_request) as srv:
        port = next(iter(srv.sockets)).getsockname()[1]
        server.url = f"ws://127.0.0.1:{port}/ws"
        yield server


class FakeSleep:
    """Records backoff delays instead of waiting them."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await asyncio.sleep(0)


async def take(feed: Feed, n: int, timeout: float = 5.0) -> list[FeedMessage]:
    out: list[FeedMessage] = []
    async with asyncio.timeout(timeout):
        while len(out) < n:
            out.append(await feed.recv())
    return out


class MaxRandom(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return b


def test_backoff_is_full_jitter_exponential_and_capped() -> None:
    b = Backoff(0.1, 1.0, 2.0, MaxRandom())
    ceilings = [b.next_delay() for _ in range(6)]
    assert ceilings == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    b.reset()
    assert b.next_delay() == pytest.approx(0.1)
    jittered = Backoff(0.1, 1.0, 2.0, random.Random(7))
    delays = [jittered.next_delay() for _ in range(200)]
    assert all(0 <= d <= 1.0 for d in delays)
    assert len(set(delays)) == 200  # jittered, not a fixed schedule
    assert max(delays[:1]) <= 0.1 and max(delays[10:]) > 0.5


async def test_unreachable_server_fails_fast_with_one_clear_error() -> None:
    url = f"ws://127.0.0.1:{free_port()}/ws"
    with pytest.raises(
        ConnectFailed, match=r"cannot connect to ws://127\.0\.0\.1:\d+/ws: .*refused"
    ):
        async with asyncio.timeout(5):
            await connect(url)


@pytest.mark.parametrize("status", [401, 403])
async def test_http_401_or_403_is_an_authentication_failure(status: int) -> None:
    def refuse(conn: ServerConnection, request: Request) -> Response:
        return conn.respond(status, "no\n")

    async def never(ws: ServerConnection, n: int) -> None:
        raise AssertionError("handshake should have been refused")

    async with scripted(never, refuse) as server:
        with pytest.raises(AuthenticationFailed, match=f"HTTP {status}"):
            await connect(server.url, token="bad")


async def test_close_code_4001_ends_the_feed_without_retrying() -> None:
    async def handler(ws: ServerConnection, n: int) -> None:
        await ws.close(4001, "token expired")

    sleep = FakeSleep()
    async with scripted(handler) as server, connect(server.url, sleep=sleep) as feed:
        with pytest.raises(AuthenticationFailed, match="4001 token expired"):
            async with asyncio.timeout(5):
                async for _ in feed:
                    pass
        assert server.connections == 1
        assert sleep.delays == []
        with pytest.raises(FeedClosed):
            await feed.subscribe(CH)


async def test_token_is_sent_as_a_bearer_header() -> None:
    async def handler(ws: ServerConnection, n: int) -> None:
        await ws.wait_closed()

    async with scripted(handler) as server:
        async with connect(server.url, token="s3cret"):
            pass
        assert server.headers[0]["Authorization"] == "Bearer s3cret"


async def test_drop_reconnects_resumes_and_delivers_each_event_once() -> None:
    async def handler(ws: ServerConnection, n: int) -> None:
        req = await server.ack(ws)
        if n == 0:
            assert "resume" not in req
            await ws.send(events(range(1, 4)))
            ws.transport.abort()  # the network fails
            return
        # Resumed: the server replays from a little earlier than asked (overlap).
        assert req["resume"] == {CH: {"epoch": "e1", "seq": 3}}
        await ws.send(events(range(2, 6)))
        await ws.wait_closed()

    sleep = FakeSleep()
    rng = MaxRandom()
    async with scripted(handler) as server:
        async with connect(server.url, sleep=sleep, rng=rng, backoff_initial_s=0.25) as feed:
            await feed.subscribe(CH)
            got = await take(feed, 7)
            assert feed.positions == {CH: Position("e1", 5)}
        assert [m.seq for m in got if isinstance(m, Received)] == [1, 2, 3, 4, 5]
        notices = [m for m in got if not isinstance(m, Received)]
        assert notices == [Disconnected("connection lost", 0.25, 1), Reconnected(server.url, 1)]
        assert sleep.delays == [0.25]
        assert server.connections == 2


async def test_heartbeat_ahead_of_delivery_makes_the_feed_resume() -> None:
    async def handler(ws: ServerConnection, n: int) -> None:
        req = await server.ack(ws)
        if n == 0:
            await ws.send(events([1]))
            # Seqs 2-3 "were sent" but never arrive.
            await ws.send(orjson.dumps({"type": "heartbeat", "ts": 1, "last": {CH: 3}}))
            await ws.wait_closed()
            return
        assert req["resume"] == {CH: {"epoch": "e1", "seq": 1}}
        await ws.send(events([2, 3]))
        await ws.wait_closed()

    async with scripted(handler) as server:
        async with connect(server.url, sleep=FakeSleep()) as feed:
            await feed.subscribe(CH)
            got = await take(feed, 5)
            assert feed.stats.resumes_asked == 1
        assert [m.seq for m in got if isinstance(m, Received)] == [1, 2, 3]
        assert server.connections == 2


async def test_subscribe_while_disconnected_completes_after_reconnect() -> None:
    gate = asyncio.Event()

    async def handler(ws: ServerConnection, n: int) -> None:
        if n == 0:
            ws.transport.abort()
            return
        await gate.wait()
        await server.ack(ws)
        await ws.send(events([1]))
        await ws.wait_closed()

    async def slow_sleep(delay: float) -> None:
        await asyncio.sleep(0.05)

    async with scripted(handler) as server:
        async with connect(server.url, sleep=slow_sleep) as feed:
            (lost,) = await take(feed, 1)
            assert isinstance(lost, Disconnected)
            sub = asyncio.create_task(feed.subscribe(CH))
            await asyncio.sleep(0)
            assert not sub.done()
            gate.set()
            ack = await asyncio.wait_for(sub, 5)
            assert ack.channels == (CH,)
            reconnected, item = await take(feed, 2)
            assert isinstance(reconnected, Reconnected)
            assert isinstance(item, Received) and item.seq == 1
        assert server.requests[1][0]["channels"] == [CH]


async def test_refused_subscribe_raises_server_error_and_is_not_kept() -> None:
    async def handler(ws: ServerConnection, n: int) -> None:
        req = await server.recv(ws)
        err = {"type": "error", "id": req["id"], "code": "unknown_channel", "message": "nope"}
        await ws.send(orjson.dumps(err))
        await ws.wait_closed()

    async with scripted(handler) as server, connect(server.url) as feed:
        with pytest.raises(ServerError) as info:
            await feed.subscribe("quotes:*")
        assert (info.value.code, info.value.message) == ("unknown_channel", "nope")
        assert feed.subscriptions == ()


async def test_ping_and_list_channels() -> None:
    async def handler(ws: ServerConnection, n: int) -> None:
        while True:
            req = await server.recv(ws)
            if req["op"] == "ping":
                await ws.send(orjson.dumps({"type": "pong", "id": req["id"], "ts": 1}))
            else:
                await ws.send(orjson.dumps({"type": "channels", "id": req["id"], "channels": [CH]}))

    async with scripted(handler) as server, connect(server.url) as feed:
        assert 0 < await feed.ping() < 5
        assert await feed.list_channels() == [CH]


async def test_silent_connection_is_replaced_after_missed_heartbeats() -> None:
    async def handler(ws: ServerConnection, n: int) -> None:
        if n == 0:
            # Welcome promised heartbeats every 50 ms; then nothing, not even on close.
            await ws.send(orjson.dumps({**WELCOME, "heartbeat_ms": 50}))
        await ws.wait_closed()

    async with scripted(handler) as server, connect(server.url, sleep=FakeSleep()) as feed:
        (notice,) = await take(feed, 1)
        assert isinstance(notice, Disconnected)
        assert notice.reason == "nothing received for 0.5 s"
        await server.wait_connections(2)


async def test_close_ends_iteration_and_pending_requests() -> None:
    asked = asyncio.Event()

    async def handler(ws: ServerConnection, n: int) -> None:
        await server.recv(ws)  # never answered
        asked.set()
        await ws.wait_closed()

    async with scripted(handler) as server:
        feed = await connect(server.url)
        pending = asyncio.create_task(feed.subscribe(CH))
        consumer = asyncio.create_task(take(feed, 1))
        await asyncio.wait_for(asked.wait(), 5)
        await feed.close()
        with pytest.raises(FeedClosed):
            await pending
        with pytest.raises(FeedClosed):
            await consumer
        assert [m async for m in feed] == []


async def test_gives_up_after_max_attempts() -> None:
    async def handler(ws: ServerConnection, n: int) -> None:
        ws.transport.abort()

    sleep = FakeSleep()
    async with scripted(handler) as server:
        url = server.url
    # The server is gone for good now.
    feed = Feed(url, config=ClientConfig(max_attempts=3, wait_for_server=True), sleep=sleep)
    with pytest.raises(ConnectFailed, match="after 3 attempts"):
        await feed.start()
    assert len(sleep.delays) == 3
