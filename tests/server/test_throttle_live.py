"""Throttled subscriptions (`max_hz`) over a real server and a real Redis: the pace, the latest
state, the skipped seqs accounted for exactly, every trade, and a conflated resume."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import orjson
import pytest

from tickwire.core.channels import Channel
from tickwire.core.config import PublisherConfig
from tickwire.core.events import encode_body
from tickwire.core.redis_process import RedisProcess
from tickwire.core.redis_wire import RedisConnection
from tickwire.feeds.publisher import Publisher
from tickwire.server.app import TickwireServer

from .conftest import Recorder, recorder, server_config
from .test_faults import T, trades_of

QA = Channel.parse("quotes:AAPL")
QB = Channel.parse("quotes:MSFT")
HZ = 4


def quotes_of(channel: Channel, start: int, n: int) -> list[bytes]:
    """Quotes whose `bid_size` is their index: the i-th published gets seq i + 1."""
    return [
        encode_body(
            "quote",
            channel.symbol,
            i,
            0,
            {"bid": 1.5, "bid_size": i, "ask": 1.75, "ask_size": 1},
        )
        for i in range(start, start + n)
    ]


@pytest.fixture
async def live(
    redis_server: RedisProcess, redis: RedisConnection
) -> AsyncIterator[tuple[TickwireServer, Publisher]]:
    async with (
        TickwireServer(server_config(redis_server)) as srv,
        Publisher(PublisherConfig(redis_url=redis_server.url)) as pub,
    ):
        yield srv, pub


def frames_of(c: Recorder, channel: Channel) -> int:
    return sum(1 for m in c.messages if m.get("type") == "events" and m["ch"] == channel.name)


async def test_a_throttled_client_gets_at_most_max_hz_the_latest_and_every_trade(
    live: tuple[TickwireServer, Publisher],
) -> None:
    srv, pub = live
    # Something stored first, so that every channel has a position at the subscribe.
    await pub.publish({QA: quotes_of(QA, 0, 1), QB: quotes_of(QB, 0, 1), T: trades_of(T, 0, 1)})
    await pub.flush()
    async with recorder(srv.url) as slow, recorder(srv.url) as fast:
        ack = await slow.request("subscribe", channels=["quotes:*", T.name], max_hz=HZ)
        assert ack["type"] == "subscribed", ack
        await fast.request("subscribe", channels=["quotes:*", T.name])
        started = time.monotonic()
        # ~2 s of a feed far faster than 4 Hz: 10 quotes of each symbol and 5 trades every 10 ms.
        n = 200
        for i in range(n):
            await pub.publish(
                {
                    QA: quotes_of(QA, 1 + 10 * i, 10),
                    QB: quotes_of(QB, 1 + 10 * i, 10),
                    T: trades_of(T, 1 + 5 * i, 5),
                }
            )
            await pub.flush()
            await asyncio.sleep(0.01)  # the feed's pace, not a wait for anything
        last_quote, last_trade = 1 + 10 * n, 1 + 5 * n
        for c in (slow, fast):
            await c.wait_until(
                lambda c=c: (
                    c.last_seq(QA.name) == last_quote  # type: ignore[misc]
                    and c.last_seq(QB.name) == last_quote
                    and c.last_seq(T.name) == last_trade
                ),
                timeout=20,
            )
        elapsed = time.monotonic() - started

    for c in (slow, fast):
        assert c.checker.ok, c.checker.violations[:5]
        assert c.checker.gaps_announced == 0
        # Every trade, in order, once.
        assert [e["trade_id"] for e in c.events(T.name)] == list(range(1, last_trade))
    assert fast.checker.skipped == 0
    for channel in (QA, QB, T):
        # At most max_hz frames a second per channel (one more for the slot that opened it).
        assert frames_of(slow, channel) <= HZ * elapsed + 2, (channel, elapsed)
        assert frames_of(fast, channel) > frames_of(slow, channel)
    for channel in (QA, QB):
        quotes = [e for e in slow.events(channel.name)]
        # The latest state, one quote per frame, and the skipped seqs are exactly the holes
        # (the checker compared each `skipped` with the hole before its frame).
        assert quotes[-1]["bid_size"] == last_quote - 1
        frames = [m for m in slow.messages if m.get("type") == "events" and m["ch"] == channel.name]
        assert all(len(m["events"]) == 1 for m in frames)
        # Every seq after where the client stood is either delivered or skipped. A channel
        # of the wildcard the server did not know yet at the ack has no position: its first
        # events are the client's first, owing nothing before them.
        since = ack["positions"].get(channel.name, {"seq": frames[0]["events"][0]["seq"] - 1})
        skipped = sum(m.get("skipped", 0) for m in frames)
        assert skipped + len(quotes) == last_quote - since["seq"]
    assert slow.checker.skipped > 0


async def test_a_throttled_resume_replays_the_latest_quote_and_every_trade(
    live: tuple[TickwireServer, Publisher],
) -> None:
    srv, pub = live
    await pub.publish({QA: quotes_of(QA, 0, 2500), T: trades_of(T, 0, 2500)})
    await pub.flush()
    async with recorder(srv.url) as c:
        positions = await _positions(c)
        resume = {ch.name: {"epoch": positions[ch.name]["epoch"], "seq": 10} for ch in (QA, T)}
        for name, pos in resume.items():
            c.checker.expect_from(name, str(pos["epoch"]), 10)
        await c.request("subscribe", channels=[QA.name, T.name], max_hz=HZ, resume=resume)
        await c.wait_until(
            lambda: c.last_seq(QA.name) == 2500 and c.last_seq(T.name) == 2500, timeout=20
        )
    assert c.checker.ok, c.checker.violations[:5]
    assert c.checker.gaps_announced == 0
    # History is read in pages: each page gives its latest quote, saying what it skipped.
    assert len(c.events(QA.name)) <= 2500 // 1000 + 1
    assert [e["seq"] for e in c.events(T.name)] == list(range(11, 2501))


async def test_a_bad_max_hz_is_refused_and_nothing_is_subscribed(
    live: tuple[TickwireServer, Publisher],
) -> None:
    srv, _ = live
    async with recorder(srv.url) as c:
        for i, bad in enumerate((0, -1, 5000, "4", True)):
            await c.send_raw(
                orjson.dumps(
                    {"op": "subscribe", "id": 100 + i, "channels": ["quotes:*"], "max_hz": bad}
                )
            )
            err = await c.wait_for(lambda m, i=i: m.get("id") == 100 + i)  # type: ignore[misc]
            assert err["type"] == "error" and err["code"] == "bad_request", err
            assert "max_hz" in err["message"]
        ok = await c.request("subscribe", channels=["quotes:*"], max_hz=0.5)
        assert ok["type"] == "subscribed" and ok["channels"] == ["quotes:*"]


async def _positions(c: Recorder) -> dict[str, dict[str, object]]:
    """Where each channel stands now (a plain subscribe's ack, undone at once)."""
    ack = await c.request("subscribe", channels=[QA.name, T.name])
    await c.request("unsubscribe", channels=[QA.name, T.name])
    positions: dict[str, dict[str, object]] = ack["positions"]
    return positions
