"""The real server, spoken to over a real WebSocket: every frame it sends matches the contract."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect

from tests.conftest import timeout
from tests.contract.schemas import validate_client_message, validate_server_frame
from tests.contract.serving import serving
from tickwire.core.config import PublisherConfig, ServerConfig
from tickwire.core.redis_process import RedisProcess
from tickwire.core.redis_wire import RedisConnection


class Conversation:
    """A client connection whose every received frame is validated; messages kept in order."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.messages: list[dict[str, Any]] = []
        self.frames = 0

    async def send(self, request: dict[str, Any], *, valid: bool = True) -> None:
        if valid:
            validate_client_message(request)
        await self.ws.send(orjson.dumps(request).decode())

    async def until(self, what: str, match: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """Read frames until a message matches; returns it."""
        seen = len(self.messages)
        async with asyncio.timeout(timeout(10)):
            while True:
                for msg in self.messages[seen:]:
                    if match(msg):
                        return msg
                seen = len(self.messages)
                frame = await self.ws.recv()
                self.frames += 1
                assert isinstance(frame, str), "server frames must be text"
                self.messages.extend(validate_server_frame(frame))
        raise AssertionError(f"no {what}")  # pragma: no cover - the timeout raises first

    async def reply(self, request_id: int, type_: str) -> dict[str, Any]:
        msg = await self.until(f"reply to {request_id}", lambda m: m.get("id") == request_id)
        assert msg["type"] == type_, msg
        return msg


async def test_server_messages_match_the_contract(
    redis: RedisConnection, redis_server: RedisProcess
) -> None:
    from tickwire.feeds.publisher import Publisher
    from tickwire.feeds.runner import run_simulator
    from tickwire.feeds.simulator import MarketSimulator, make_instruments

    sim = MarketSimulator(make_instruments(["BTC-USD", "AAPL"], seed=3), rate=1000.0, seed=3)
    async with Publisher(PublisherConfig(redis_url=redis_server.url)) as pub:
        await run_simulator(pub, sim, count=200, throttle=False)
        config = ServerConfig(redis_url=redis_server.url, port=0, heartbeat_ms=300)
        async with serving(config) as srv, connect(srv.url) as ws:
            talk = Conversation(ws)
            welcome = await talk.until("welcome", lambda m: True)
            assert welcome["type"] == "welcome" and welcome["protocol"] == 1

            await talk.send({"op": "list", "id": 1})
            listing = await talk.reply(1, "channels")
            assert "trades:BTC-USD" in listing["channels"]

            await talk.send(
                {"op": "subscribe", "id": 2, "channels": ["quotes:*", "trades:*"], "snapshot": True}
            )
            await talk.reply(2, "subscribed")
            await talk.until("events", lambda m: m["type"] == "events")

            await talk.send({"op": "ping", "id": "p"})
            await talk.reply("p", "pong")  # type: ignore[arg-type]

            await run_simulator(pub, sim, count=200, throttle=False)
            await talk.until("live events", lambda m: m["type"] == "events")

            await talk.send({"op": "nope", "id": 3}, valid=False)
            assert (await talk.reply(3, "error"))["code"] == "unknown_op"
            await talk.send({"op": "subscribe", "id": 4, "channels": ["candles:X"]}, valid=False)
            assert (await talk.reply(4, "error"))["code"] == "unknown_channel"
            await ws.send("{not json")
            bad = await talk.until(
                "an error for bad JSON", lambda m: m["type"] == "error" and m.get("id") is None
            )
            assert bad["code"] == "bad_request"

            await talk.send({"op": "unsubscribe", "id": 5, "channels": ["quotes:*", "trades:*"]})
            assert (await talk.reply(5, "unsubscribed"))["channels"] == []
            # A projected subscription: its events have only the fields asked for (and the
            # common ones), and still match the contract.
            await talk.send(
                {
                    "op": "subscribe",
                    "id": 6,
                    "channels": ["quotes:*"],
                    "fields": ["bid", "ask"],
                    "snapshot": True,
                }
            )
            await talk.reply(6, "subscribed")
            projected = await talk.until("projected events", lambda m: m["type"] == "events")
            assert {k for e in projected["events"] for k in e} == {
                "v", "type", "sym", "ts", "pt", "bid", "ask", "epoch", "seq"
            }  # fmt: skip
            await talk.send(
                {"op": "subscribe", "id": 7, "channels": ["trades:*"], "fields": ["bid"]}
            )
            assert (await talk.reply(7, "error"))["code"] == "bad_request"
            # A throttled subscription: its frames say what they skipped, and match too.
            await talk.send({"op": "subscribe", "id": 8, "channels": ["trades:*"], "max_hz": 1000})
            await talk.reply(8, "subscribed")
            await talk.send({"op": "unsubscribe", "id": 9, "channels": ["quotes:*"]})
            await talk.reply(9, "unsubscribed")
            await talk.send({"op": "subscribe", "id": 10, "channels": ["quotes:*"], "max_hz": 2})
            await talk.reply(10, "subscribed")
            await run_simulator(pub, sim, count=400, throttle=False)
            throttled = await talk.until(
                "throttled quotes", lambda m: m["type"] == "events" and "skipped" in m
            )
            assert throttled["skipped"] >= 1 and len(throttled["events"]) == 1
            await talk.send(
                {"op": "subscribe", "id": 11, "channels": ["quotes:*"], "max_hz": 0}, valid=False
            )
            assert (await talk.reply(11, "error"))["code"] == "bad_request"
            await talk.until("a heartbeat", lambda m: m["type"] == "heartbeat")
            assert talk.frames > 5
