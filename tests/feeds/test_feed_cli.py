"""The feeds' command lines: options out of bounds refused by name, and what the release tick
bounds."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest

from tests.conftest import timeout
from tickwire.cli import build_parser, main
from tickwire.core.channels import Channel
from tickwire.core.config import PublisherConfig, RetentionConfig
from tickwire.core.errors import ConfigError
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


def test_replay_speeds_ports_and_retention_out_of_bounds_are_refused_by_name(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parse = build_parser().parse_args
    assert parse(["feed", "replay", "f", "--speed", "max"]).speed is None
    assert parse(["feed", "replay", "f", "--speed", "0.5"]).speed == 0.5
    assert parse(["feed", "replay", "f"]).speed == 1.0
    assert parse(["serve", "--port", "0"]).port == 0
    for argv, says in (
        (["feed", "replay", "f", "--speed", "0"], "'0': a positive factor"),
        (["feed", "replay", "f", "--speed", "fast"], "'fast': a positive factor"),
        (["serve", "--port", "-1"], "-1: a port is 0 to 65535"),
        (["demo", "--port", "99999"], "99999: a port is 0 to 65535"),
        (["feed", "sim", "--trade-maxlen", "0"], "--trade-maxlen: 0: at least 1"),
        (["bars", "--bar-maxlen", "-3"], "--bar-maxlen: -3: at least 1"),
    ):
        with pytest.raises(SystemExit):
            parse(argv)
        assert says in capsys.readouterr().err, argv
    # The same for the library: a stream kept at 0 events would refuse every append.
    with pytest.raises(ConfigError, match="retention of trades: 0 events"):
        RetentionConfig(trades=0)


def test_replaying_a_file_that_cannot_be_read_says_so_before_connecting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Redis on port 1 would refuse: the file is checked first.
    for path, says in ((tmp_path / "none.ndjson", "No such file"), (tmp_path, "Is a directory")):
        assert main(["feed", "replay", str(path), "--redis", "redis://127.0.0.1:1/0"]) == 1
        assert f"cannot read {path}: {says}" in capsys.readouterr().err


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


async def test_a_run_ends_though_redis_refuses_at_its_end_and_the_publisher_keeps_the_rest(
    redis: RedisConnection, redis_server: RedisProcess
) -> None:
    cfg = PublisherConfig(redis_url=redis_server.url, backoff_initial_s=0.01, backoff_max_s=0.05)
    sim = MarketSimulator(make_instruments(3, 1), rate=1000, seed=1, start_ns=time.time_ns())
    async with Publisher(cfg) as pub:
        await redis.execute("CONFIG", "SET", "maxmemory", 1)  # every write: OOM
        try:
            run = run_simulator(pub, sim, count=200, throttle=False, flush_timeout_s=0.3)
            report = await asyncio.wait_for(run, timeout(10))
            assert report.events == 200
            assert pub.pending_events == 200 and pub.stats.published == 0
            assert "OOM" in (pub.stats.last_error or "")
        finally:
            await redis.execute("CONFIG", "SET", "maxmemory", 0)
        # Nothing was given up: once Redis takes writes again, all of it goes in.
        await asyncio.wait_for(pub.flush(), timeout(10))
        assert pub.pending_events == 0 and pub.stats.published == 200


def test_the_feed_never_shows_its_redis_password(
    fresh_redis: RedisProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    async def protect() -> None:
        admin = await RedisConnection.open(fresh_redis.url)
        await admin.execute("CONFIG", "SET", "requirepass", "s3cret")
        admin.close()

    asyncio.run(protect())
    where = f"127.0.0.1:{fresh_redis.port}/0"
    argv = ["feed", "sim", "--symbols", "2", "--duration", "1.3", "--redis"]
    assert main([*argv, f"redis://:s3cret@{where}"]) == 0
    err = capsys.readouterr().err
    assert f"into redis://:***@{where}" in err and "s3cret" not in err
    # The progress line (once a second) says how many Redis has stored, not only sent.
    progress = re.search(r"\r([\d,]+) events \(([\d,]+) stored\), [\d,]+/s", err)
    assert progress is not None, err
    sent, stored = (int(n.replace(",", "")) for n in progress.groups())
    assert 0 < stored <= sent
    # Refused: the error names the server, not the password tried.
    assert main([*argv, f"redis://:wr0ng@{where}"]) == 1
    err = capsys.readouterr().err
    assert "WRONGPASS" in err and "wr0ng" not in err
