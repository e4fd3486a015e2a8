"""The simulator feed's command line: its options' bounds, and what the release tick bounds."""

from __future__ import annotations

import time

import pytest

from tickwire.cli import build_parser
from tickwire.core.channels import Channel
from tickwire.core.config import PublisherConfig
from tickwire.core.redis_process import RedisProcess
from tickwire.core.redis_wire import RedisConnection
from tickwire.feeds.publisher import Publisher
from tickwire.feeds.runner import run_simulator
from tickwire.feeds.simulator import MarketSimulator, make_instruments


def test_the_tick_is_a_millisecond_unless_told_and_never_under_one() -> None:
    parse = build_parser().parse_args
    assert parse(["feed", "sim"]).tick_ms == 1.0
    assert parse(["feed", "sim", "--tick-ms", "2.5"]).tick_ms == 2.5
    for bad in ("0.5", "0", "-1", "nan", "2000", "soon"):
        with pytest.raises(SystemExit):
            parse(["feed", "sim", "--tick-ms", bad])


def test_rates_and_symbols_out_of_bounds_are_refused_by_name_not_with_a_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parse = build_parser().parse_args
    assert parse(["feed", "sim", "--rate", "2.5e4"]).rate == 25_000
    assert parse(["feed", "sim", "--symbols", "BTC-USD, AAPL"]).symbols == ["BTC-USD", "AAPL"]
    assert parse(["demo", "--symbols", "3"]).symbols == 3
    for argv, says in (
        (["feed", "sim", "--rate", "-5"], "-5 events/s: a positive number"),
        (["feed", "sim", "--rate", "0"], "0 events/s: a positive number"),
        (["feed", "sim", "--rate", "inf"], "inf events/s: a positive number"),
        (["demo", "--rate", "fast"], "not a number of events/s"),
        (["feed", "sim", "--symbols", "0"], "0: at least 1"),
        (["feed", "sim", "--symbols", ", ,"], "no symbols"),
        (["feed", "sim", "--symbols", "BTC-USD,bad!"], "invalid symbol 'bad!'"),
        (["demo", "--symbols", "0"], "0: at least 1"),
    ):
        with pytest.raises(SystemExit):
            parse(argv)
        assert says in capsys.readouterr().err, argv


async def test_a_longer_tick_releases_at_most_once_per_tick_and_loses_nothing(
    redis: RedisConnection, redis_server: RedisProcess
) -> None:
    tick_s, duration = 0.02, 1.0
    sim = MarketSimulator(make_instruments(4, 3), rate=5000, seed=3, start_ns=time.time_ns())
    async with Publisher(PublisherConfig(redis_url=redis_server.url)) as pub:
        report = await run_simulator(
            pub, sim, duration=duration, tick_s=tick_s, venue_clock_ns=time.time_ns
        )
        flushes = pub.stats.flushes
    # Each release is one publish, written as one flush or merged into the next: never more
    # flushes than ticks in the run (and the first release, at once).
    assert 1 < flushes <= duration / tick_s + 1
    stored = 0
    for inst in sim.instruments:
        for kind in ("quotes", "trades"):
            stored += await redis.execute("XLEN", Channel(kind, inst.symbol).stream_key)
    assert stored == report.events > 0
