"""On-demand bars end to end: WebSocket subscribers, the server's demand, `tickwire bars`, Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import orjson
import pytest

import tickwire.clients
from tests.conftest import eventually, timeout
from tests.feeds.test_bar_maker import decimal_bars, publish_trades
from tests.feeds.test_trade_bars import reference_bars
from tickwire.core.channels import BAR_DEMAND_KEY, Channel, ChannelPattern
from tickwire.core.config import PublisherConfig
from tickwire.core.events import Bar
from tickwire.core.redis_process import RedisProcess
from tickwire.core.redis_wire import RedisConnection
from tickwire.feeds.bar_maker import BarMaker, BarMakerConfig
from tickwire.feeds.publisher import Publisher
from tickwire.server.app import TickwireServer

from .conftest import recorder, server_config

MS = 1_000_000
S = 1_000 * MS
RETENTION_S = 30.0


class Clock:
    """One wall clock for the server's demand (s) and the bar maker (ns), moved by the test."""

    def __init__(self) -> None:
        self.ns = time.time_ns() // S * S

    def seconds(self) -> float:
        return self.ns / 1e9

    def __call__(self) -> int:
        return self.ns


Setup = tuple[TickwireServer, BarMaker, Publisher, Clock]


@pytest.fixture
async def setup(redis_server: RedisProcess, redis: RedisConnection) -> AsyncIterator[Setup]:
    clock = Clock()
    cfg = replace(server_config(redis_server), bar_retention_s=RETENTION_S)
    async with (
        TickwireServer(cfg, demand_clock=clock.seconds) as srv,
        Publisher(PublisherConfig(redis_url=redis_server.url)) as pub,
    ):
        maker = BarMaker(
            BarMakerConfig(redis_url=redis_server.url, close_delay_s=0.05),
            pub,
            clock_ns=clock,
            maker_id="maker",
        )
        try:
            yield srv, maker, pub, clock
        finally:
            await maker.close()


async def test_subscribers_get_bars_computed_exactly_from_the_stored_trades(
    setup: Setup, redis: RedisConnection
) -> None:
    srv, maker, pub, clock = setup
    t0 = clock.ns
    channel = Channel("bars.250ms", "BTC-USD")
    async with recorder(srv.url) as one, recorder(srv.url) as every:
        ack = await one.request("subscribe", channels=[channel.name])
        assert ack["type"] == "subscribed"
        await every.request("subscribe", channels=["bars.250ms:*"])
        wanted = {ChannelPattern.parse(channel.name), ChannelPattern.parse("bars.250ms:*")}
        await eventually(lambda: srv.demand.recorded == wanted, "demand recorded")
        await maker.step()
        assert set(maker.jobs) == {channel}  # the wildcard's symbols: those with trades
        trades = [
            (t0 + 10 * MS, 64123.5, 0.0123),
            (t0 + 120 * MS, 64125.25, 0.75),
            (t0 + 130 * MS, 64120.0, 0.1),
            (t0 + 300 * MS, 64119.75, 2.0),
        ]
        await publish_trades(pub, "BTC-USD", trades)
        clock.ns = t0 + 600 * MS
        assert len(await maker.step()) == 2
        await pub.flush()
        for client in (one, every):
            await client.wait_until(lambda c=client: len(c.events(channel.name)) == 2)  # type: ignore[misc]
        entries = await redis.execute("XRANGE", Channel("trades", "BTC-USD").stream_key, "-", "+")
        stored = [orjson.loads(fields[1]) for _, fields in entries]
        expected = reference_bars(
            "BTC-USD", "250ms", 250 * MS, [(e["ts"], e["price"], e["size"]) for e in stored]
        )
        assert decimal_bars(one.events(channel.name)) == expected
        assert one.events(channel.name) == every.events(channel.name)
        assert [e["seq"] for e in one.events(channel.name)] == [1, 2]
        assert one.checker.ok and every.checker.ok
        # Like any channel: a snapshot gives the latest bar.
        async with recorder(srv.url) as late:
            await late.request("subscribe", channels=[channel.name], snapshot=True)
            await late.wait_until(lambda: len(late.events(channel.name)) == 1)
            assert late.events(channel.name)[0]["start"] == t0 + 250 * MS


async def test_demand_lapses_a_retention_after_the_last_subscriber_leaves(
    setup: Setup, redis: RedisConnection
) -> None:
    srv, maker, _, clock = setup
    t0 = clock.ns
    channel = Channel("bars.5s", "AAPL")
    pattern = ChannelPattern.parse(channel.name)
    async with recorder(srv.url) as client:
        await client.request("subscribe", channels=[channel.name])
        await eventually(lambda: srv.demand.recorded == {pattern}, "demand recorded")
        await maker.step()
        assert set(maker.jobs) == {channel}
        clock.ns = t0 + 10 * S  # subscribers renew: the server's pass at 10 s
        passes = srv.demand.passes
        srv.demand.changed([pattern])
        await eventually(lambda: srv.demand.passes > passes, "a renewal")
        await client.request("unsubscribe", channels=[channel.name])
        await eventually(lambda: srv.demand.recorded == frozenset(), "demand dropped")
    until = await redis.execute("ZSCORE", BAR_DEMAND_KEY, channel.name)
    assert int(until) == (t0 + 10 * S) // MS + RETENTION_S * 1000
    clock.ns = t0 + 10 * S + int(RETENTION_S * S) - MS
    await maker.step()
    assert set(maker.jobs) == {channel}
    clock.ns += 2 * MS
    await maker.step()
    assert maker.jobs == {}
    assert maker.stats.stopped == 1


@pytest.mark.parametrize(
    ("name", "code", "says"),
    [
        ("bars.50ms:BTC-USD", "bad_request", "out of bounds"),
        ("bars.2d:*", "bad_request", "out of bounds"),
        ("bars.60s:BTC-USD", "bad_request", "written '1m'"),
        ("bars.5x:BTC-USD", "bad_request", "invalid bar interval"),
        ("candles.5s:BTC-USD", "unknown_channel", "bars.<N><unit>"),
    ],
)
async def test_bad_intervals_are_refused_with_the_grammar(
    setup: Setup, name: str, code: str, says: str
) -> None:
    srv, _, _, _ = setup
    async with recorder(srv.url) as client:
        # Sent raw: the contract's channel pattern leaves some of these out already.
        await client.send_raw(orjson.dumps({"op": "subscribe", "id": 7, "channels": [name]}))
        reply = await client.wait_for(lambda m: m.get("id") == 7)
        assert reply["type"] == "error" and reply["code"] == code
        assert says in reply["message"]
    assert srv.demand.recorded == frozenset()


async def test_demand_is_shared_across_server_nodes(
    setup: Setup, redis_server: RedisProcess, redis: RedisConnection
) -> None:
    """A channel wanted on two servers is made once, until a retention after its last
    subscriber on either left."""
    first, maker, _, clock = setup
    t0 = clock.ns
    cfg = replace(server_config(redis_server), bar_retention_s=RETENTION_S)
    channel = Channel("bars.15m", "ETH-USD")
    pattern = ChannelPattern.parse(channel.name)
    async with (
        TickwireServer(cfg, demand_clock=clock.seconds) as second,
        recorder(first.url) as a,
        recorder(second.url) as b,
    ):
        await a.request("subscribe", channels=[channel.name])
        await b.request("subscribe", channels=[channel.name])
        await eventually(lambda: first.demand.recorded == {pattern}, "first server's demand")
        await eventually(lambda: second.demand.recorded == {pattern}, "second server's demand")
        await maker.step()
        assert set(maker.jobs) == {channel}  # once, for both servers' clients
        # The first server's client leaves at once, the second server's 20 s later.
        await a.request("unsubscribe", channels=[channel.name])
        await eventually(lambda: first.demand.recorded == frozenset(), "first server's leave")
        clock.ns = t0 + 20 * S
        await b.request("unsubscribe", channels=[channel.name])
        await eventually(lambda: second.demand.recorded == frozenset(), "second server's leave")
        until = await redis.execute("ZSCORE", BAR_DEMAND_KEY, channel.name)
        assert int(until) == (t0 + 20 * S) // MS + RETENTION_S * 1000
        clock.ns = t0 + 20 * S + int(RETENTION_S * S) - MS
        await maker.step()
        assert set(maker.jobs) == {channel}
        clock.ns += 2 * MS
        await maker.step()
        assert maker.jobs == {}


async def test_precomputed_intervals_are_not_demanded(setup: Setup, redis: RedisConnection) -> None:
    """bars.1s and bars.1m are the feed's: no demand is recorded, no maker writes them."""
    srv, maker, _, _ = setup
    async with recorder(srv.url) as client:
        await client.request("subscribe", channels=["bars.1s:*", "bars.1m:BTC-USD", "trades:*"])
        await client.request("subscribe", channels=["bars.5s:BTC-USD"])
        await eventually(lambda: len(srv.demand.recorded) == 1, "demand recorded")
    assert await redis.execute("ZRANGE", BAR_DEMAND_KEY, 0, -1) == [b"bars.5s:BTC-USD"]
    await redis.execute("ZADD", BAR_DEMAND_KEY, "+inf", "bars.1s:*")  # a stray writer
    await maker.step()
    assert set(maker.jobs) == {Channel("bars.5s", "BTC-USD")}


async def test_the_python_client_gets_on_demand_bars(setup: Setup) -> None:
    srv, maker, pub, clock = setup
    t0 = clock.ns
    async with tickwire.clients.connect(srv.url) as feed:
        await feed.subscribe("bars.500ms:*", "bars.500ms:SOL-USD")
        await eventually(lambda: len(srv.demand.recorded) == 2, "demand recorded")
        await maker.step()
        await publish_trades(pub, "SOL-USD", [(t0 + 100 * MS, 145.08, 3.5)])
        clock.ns = t0 + 549 * MS
        assert await maker.step() == []  # not yet due (end + 50 ms close delay)
        clock.ns = t0 + 552 * MS
        assert len(await maker.step()) == 1  # once for both patterns of the client
        await pub.flush()
        received = await asyncio.wait_for(anext(aiter(feed)), timeout(10))
    assert isinstance(received, tickwire.clients.Received)
    bar = received.event
    assert isinstance(bar, Bar)
    assert (received.channel, bar.interval, bar.start, bar.close, bar.volume) == (
        "bars.500ms:SOL-USD",
        "500ms",
        t0,
        145.08,
        3.5,
    )
