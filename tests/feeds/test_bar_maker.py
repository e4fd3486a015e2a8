"""`tickwire bars` against a real Redis: demand, leases, exact bars from the stored trades."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import timeout
from tests.feeds.conftest import stored_events
from tests.feeds.test_trade_bars import reference_bars
from tickwire.core.channels import BAR_DEMAND_KEY, Channel, bar_writer_key
from tickwire.core.config import PublisherConfig
from tickwire.core.events import encode_body
from tickwire.core.redis_process import RedisProcess
from tickwire.core.redis_wire import RedisConnection
from tickwire.feeds.bar_maker import BarMaker, BarMakerConfig
from tickwire.feeds.publisher import Publisher

MS = 1_000_000
S = 1_000 * MS
T0 = 1_764_230_400 * S


class Clock:
    """The makers' wall clock, moved by the test."""

    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


@pytest.fixture
async def publisher(redis: RedisConnection, redis_server: RedisProcess) -> AsyncIterator[Publisher]:
    async with Publisher(PublisherConfig(redis_url=redis_server.url)) as pub:
        yield pub


def maker(url: str, pub: Publisher, clock: Clock, name: str = "m1") -> BarMaker:
    cfg = BarMakerConfig(redis_url=url, close_delay_s=0.05, lease_s=5.0)
    return BarMaker(cfg, pub, clock_ns=clock, maker_id=name)


async def publish_trades(
    pub: Publisher, symbol: str, trades: Sequence[tuple[int, float, float]], lag: int = MS
) -> None:
    """Trades (ts, price, size), each published `lag` after its venue time."""
    bodies = [
        encode_body(
            "trade",
            symbol,
            ts,
            ts + lag,
            {"price": p, "size": s, "side": "buy", "trade_id": n},
        )
        for n, (ts, p, s) in enumerate(trades)
    ]
    await pub.publish({Channel("trades", symbol): bodies})
    await pub.flush()


async def demand(redis: RedisConnection, pattern: str, until: int) -> None:
    await redis.execute("ZADD", BAR_DEMAND_KEY, until // MS, pattern)


def decimal_bars(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keep = ("sym", "interval", "start", "end", "open", "high", "low", "close", "volume")
    out = []
    for e in events:
        doc = {k: e[k] for k in (*keep, "vwap", "trades")}
        for k in ("open", "high", "low", "close", "volume", "vwap"):
            doc[k] = Decimal(repr(doc[k]))
        out.append(doc)
    return out


async def test_bars_are_exact_against_the_stored_trades(
    redis: RedisConnection, redis_server: RedisProcess, publisher: Publisher
) -> None:
    clock = Clock(T0)
    bm = maker(redis_server.url, publisher, clock)
    await demand(redis, "bars.250ms:BTC-USD", T0 + 60 * S)
    await bm.step()
    assert set(bm.jobs) == {Channel("bars.250ms", "BTC-USD")}
    trades = [
        (T0 + 10 * MS, 64123.5, 0.0123),
        (T0 + 20 * MS, 64124.25, 0.5),
        (T0 + 240 * MS, 64120.0, 1.0),
        (T0 + 260 * MS, 64119.75, 0.1),
        (T0 + 900 * MS, 64130.0, 2.0),  # 500..750 has no trade: no bar
    ]
    await publish_trades(publisher, "BTC-USD", trades[:3])
    clock.now = T0 + 250 * MS
    assert await bm.step() == []  # not before end + close delay
    await publish_trades(publisher, "BTC-USD", trades[3:])
    clock.now = T0 + 1300 * MS
    got = await bm.step()
    assert [b.start for b in got] == [T0, T0 + 250 * MS, T0 + 750 * MS]
    await publisher.flush()
    stored = await stored_events(redis, Channel("bars.250ms", "BTC-USD"))
    assert [e["seq"] for e in stored] == [1, 2, 3]
    stored_trades = [
        (e["ts"], e["price"], e["size"])
        for e in await stored_events(redis, Channel("trades", "BTC-USD"))
    ]
    assert decimal_bars(stored) == reference_bars("BTC-USD", "250ms", 250 * MS, stored_trades)
    assert all(e["ts"] == e["end"] and e["type"] == "bar" for e in stored)


async def test_a_bar_closes_on_time_with_no_later_trade(
    redis: RedisConnection, redis_server: RedisProcess, publisher: Publisher
) -> None:
    clock = Clock(T0)
    bm = maker(redis_server.url, publisher, clock)
    await demand(redis, "bars.5s:ETH-USD", T0 + 60 * S)
    await bm.step()
    await publish_trades(publisher, "ETH-USD", [(T0 + 1 * S, 3100.05, 0.5)])
    clock.now = T0 + 5 * S + 50 * MS  # venue clock: 5.049 s, before end + delay
    assert await bm.step() == []
    assert bm.jobs[Channel("bars.5s", "ETH-USD")].bars.due_at() == T0 + 5 * S + 51 * MS
    clock.now = T0 + 5 * S + 51 * MS
    (bar,) = await bm.step()
    assert (bar.start, bar.end, bar.close, bar.trades) == (T0, T0 + 5 * S, 3100.05, 1)
    clock.now = T0 + 30 * S
    assert await bm.step() == []  # empty intervals: no bar


async def test_a_late_trade_is_left_out_and_counted(
    redis: RedisConnection, redis_server: RedisProcess, publisher: Publisher
) -> None:
    clock = Clock(T0)
    bm = maker(redis_server.url, publisher, clock)
    await demand(redis, "bars.250ms:X", T0 + 60 * S)
    await bm.step()
    await publish_trades(publisher, "X", [(T0 + 100 * MS, 10.0, 1.0)])
    clock.now = T0 + 400 * MS
    (first,) = await bm.step()
    # Stamped in the closed first interval, stored only now.
    await publish_trades(publisher, "X", [(T0 + 200 * MS, 99.0, 1.0), (T0 + 600 * MS, 11.0, 2.0)])
    clock.now = T0 + 850 * MS
    (second,) = await bm.step()
    assert (first.close, first.trades) == (10.0, 1)
    assert (second.start, second.open, second.trades) == (T0 + 500 * MS, 11.0, 1)
    assert bm.stats.late_trades == 1


async def test_demand_starts_and_a_lapsed_demand_stops_the_channel(
    redis: RedisConnection, redis_server: RedisProcess, publisher: Publisher
) -> None:
    clock = Clock(T0)
    bm = maker(redis_server.url, publisher, clock)
    channel = Channel("bars.5s", "AAPL")
    await bm.step()
    assert bm.jobs == {}
    await demand(redis, "bars.5s:AAPL", T0 + 10 * S)
    await bm.step()
    assert set(bm.jobs) == {channel}
    assert await redis.execute("GET", bar_writer_key(channel)) == b"m1"
    clock.now = T0 + 10 * S - MS
    await bm.step()
    assert set(bm.jobs) == {channel}
    clock.now = T0 + 10 * S + MS
    await bm.step()
    assert bm.jobs == {}
    assert await redis.execute("EXISTS", bar_writer_key(channel)) == 0
    assert bm.stats.stopped == 1


async def test_one_writer_per_channel_and_another_takes_over(
    redis: RedisConnection, redis_server: RedisProcess, publisher: Publisher
) -> None:
    clock = Clock(T0)
    first = maker(redis_server.url, publisher, clock, "m1")
    second = maker(redis_server.url, publisher, clock, "m2")
    await demand(redis, "bars.5s:*", T0 + 60 * S)
    await publish_trades(publisher, "A", [(T0 + 1 * S, 1.5, 1.0)])
    await publish_trades(publisher, "B", [(T0 + 1 * S, 2.5, 1.0)])
    await first.step()
    await second.step()
    assert set(first.jobs) == {Channel("bars.5s", "A"), Channel("bars.5s", "B")}
    assert second.jobs == {}
    await first.close()  # releases its leases
    await second.step()
    assert second.jobs == {}  # a lease found taken is tried again a third of a lease later
    clock.now = T0 + 2 * S
    await second.step()
    assert set(second.jobs) == set(Channel("bars.5s", s) for s in "AB")
    clock.now = T0 + 6 * S
    got = await second.step()
    assert sorted((b.symbol, b.close) for b in got) == [("A", 1.5), ("B", 2.5)]


async def test_a_maker_taking_over_continues_after_the_last_stored_bar(
    redis: RedisConnection, redis_server: RedisProcess, publisher: Publisher
) -> None:
    clock = Clock(T0)
    channel = Channel("bars.250ms", "X")
    first = maker(redis_server.url, publisher, clock, "m1")
    await demand(redis, channel.name, T0 + 60 * S)
    await first.step()
    await publish_trades(publisher, "X", [(T0 + 100 * MS, 10.0, 1.0), (T0 + 280 * MS, 11.0, 1.0)])
    clock.now = T0 + 310 * MS
    (bar,) = await first.step()
    assert bar.start == T0
    await first.close()
    await publish_trades(publisher, "X", [(T0 + 400 * MS, 12.0, 1.0)])
    # A new maker reads the open interval's trades back from the stream: its first bar is
    # whole, and it writes nothing for the interval already published.
    second = maker(redis_server.url, publisher, clock, "m2")
    clock.now = T0 + 320 * MS
    assert await second.step() == []
    clock.now = T0 + 560 * MS
    (bar,) = await second.step()
    assert (bar.start, bar.open, bar.close, bar.trades) == (T0 + 250 * MS, 11.0, 12.0, 2)
    await publisher.flush()
    stored = await stored_events(redis, channel)
    assert [(e["seq"], e["start"]) for e in stored] == [(1, T0), (2, T0 + 250 * MS)]
    assert second.stats.late_trades == 0


async def wait_for_redis(redis: RedisConnection, *command: Any, limit: float = 10.0) -> Any:
    """Poll a Redis command until its reply is truthy (a process's writes have no event)."""
    deadline = time.monotonic() + timeout(limit)
    while not (reply := await redis.execute(*command)):
        assert time.monotonic() < deadline, f"timed out waiting for {command}"
        await asyncio.sleep(0.02)
    return reply


async def test_the_bars_command_makes_bars_and_releases_its_leases_on_sigterm(
    redis: RedisConnection, redis_server: RedisProcess, publisher: Publisher
) -> None:
    """`tickwire bars` as a process, on the wall clock: a bar of trades stored now comes."""
    exe = Path(sys.executable).parent / "tickwire"
    channel = Channel("bars.100ms", "X")
    await demand(redis, channel.name, time.time_ns() + 60 * S)
    proc = await asyncio.create_subprocess_exec(
        *(str(exe), "bars", "--redis", redis_server.url, "--close-delay-ms", "20"),
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await wait_for_redis(redis, "EXISTS", bar_writer_key(channel))
        now = time.time_ns()
        await publish_trades(publisher, "X", [(now, 1.25, 2.0), (now + 1, 1.5, 2.0)], lag=0)
        (entry,) = await wait_for_redis(redis, "XRANGE", channel.stream_key, "-", "+")
        bar = orjson.loads(entry[1][1])
        assert (bar["open"], bar["close"], bar["volume"], bar["vwap"], bar["trades"]) == (
            1.25,
            1.5,
            4.0,
            1.38,  # 1.375 half-even to two decimals
            2,
        )
        assert bar["start"] <= now < bar["end"] == bar["start"] + 100 * MS
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert await redis.execute("EXISTS", bar_writer_key(channel)) == 0


async def test_trades_trimmed_before_they_were_read_are_counted(
    redis: RedisConnection, redis_server: RedisProcess, publisher: Publisher
) -> None:
    clock = Clock(T0)
    bm = maker(redis_server.url, publisher, clock)
    await demand(redis, "bars.5s:X", T0 + 60 * S)
    await bm.step()
    await publish_trades(publisher, "X", [(T0 + n * MS, 1.0, 1.0) for n in range(3)])
    await bm.step()
    await publish_trades(publisher, "X", [(T0 + n * MS, 2.0, 1.0) for n in range(3, 6)])
    await redis.execute("XTRIM", Channel("trades", "X").stream_key, "MAXLEN", 1)
    clock.now = T0 + 6 * S
    (bar,) = await bm.step()
    assert bm.stats.missed_trades == 2
    assert (bar.trades, bar.volume) == (4, 4.0)


async def test_trades_someone_else_wrote_hold_back_no_bars(
    redis: RedisConnection,
    redis_server: RedisProcess,
    publisher: Publisher,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # An entry of a trades stream that is not a trade event (JSON or not) stopped the maker
    # with a traceback; a trades key of another type had every step fail (WRONGTYPE), and so
    # every bar channel wait.
    clock = Clock(T0)
    bm = maker(redis_server.url, publisher, clock)
    await demand(redis, "bars.250ms:*", T0 + 60 * S)
    for symbol in ("AAA", "BBB", "CCC"):
        await publish_trades(publisher, symbol, [(T0 + 100 * MS, 10.0, 1.0)])
    await bm.step()
    assert len(bm.jobs) == 3
    aaa, ccc = Channel("trades", "AAA"), Channel("trades", "CCC")
    await redis.execute("XADD", aaa.stream_key, "1000", "d", "not json")
    await redis.execute("XADD", aaa.stream_key, "1001", "d", '{"type":"trade"}')
    await redis.execute("DEL", ccc.stream_key)
    await redis.execute("SET", ccc.stream_key, "someone else's")
    clock.now = T0 + 150 * MS
    assert await bm.step() == []  # reads them: the two entries are skipped, CCC waits
    assert bm.stats.foreign_entries == 2 and bm.stats.errors == 0
    for symbol in ("AAA", "BBB"):
        await publish_trades(publisher, symbol, [(T0 + 200 * MS, 11.0, 2.0)])
    clock.now = T0 + 1100 * MS
    bars = {b.channel.symbol: b for b in await bm.step()}
    assert bm.stats.errors == 0
    assert sorted(bars) == ["AAA", "BBB", "CCC"]
    assert all(
        (bars[s].trades, bars[s].close, bars[s].volume) == (2, 11.0, 3.0) for s in ("AAA", "BBB")
    )
    assert (bars["CCC"].trades, bars["CCC"].close) == (1, 10.0)  # the trade read before
    assert any("CCC" in r.getMessage() and "another type" in r.getMessage() for r in caplog.records)
    # Put right, its bars come too (trades that stream lost are lost).
    await redis.execute("DEL", ccc.stream_key)
    await publish_trades(publisher, "CCC", [(T0 + 1200 * MS, 12.0, 1.0)])
    clock.now = T0 + 2100 * MS
    (bar,) = await bm.step()
    assert (bar.channel.symbol, bar.close) == ("CCC", 12.0)


async def test_a_bar_channel_whose_keys_someone_else_wrote_waits_alone(
    redis: RedisConnection,
    redis_server: RedisProcess,
    publisher: Publisher,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Each of these failed the step (WRONGTYPE taken for Redis down: every channel waited) or
    # raised out of it (an entry that is not an event: the maker stopped).
    clock = Clock(T0)
    bm = maker(redis_server.url, publisher, clock)
    for symbol in ("AAA", "BBB", "CCC", "DDD"):
        await publish_trades(publisher, symbol, [(T0 + 100 * MS, 10.0, 1.0)])
    bars_of = {s: Channel("bars.250ms", s) for s in ("AAA", "BBB", "CCC", "DDD")}
    await redis.execute("HSET", bar_writer_key(bars_of["BBB"]), "a", "hash")
    await redis.execute("XADD", bars_of["CCC"].stream_key, "*", "d", "not json")
    await redis.execute("XADD", Channel("trades", "DDD").stream_key, "99", "d", '{"x":1}')
    await demand(redis, "bars.250ms:*", T0 + 60 * S)
    await bm.step()
    # DDD's foreign trade is skipped, as any trade read later would be; BBB and CCC wait.
    assert set(bm.jobs) == {bars_of["AAA"], bars_of["DDD"]} and bm.stats.errors == 0
    for symbol in ("BBB", "CCC"):
        assert any(f"bars.250ms:{symbol} waits" in r.getMessage() for r in caplog.records)
    # Put right, each starts at the next try (the next lease round).
    await redis.execute("DEL", bar_writer_key(bars_of["BBB"]), bars_of["CCC"].stream_key)
    clock.now = T0 + 2 * S
    await bm.step()
    assert set(bm.jobs) == set(bars_of.values()) and bm.stats.errors == 0
