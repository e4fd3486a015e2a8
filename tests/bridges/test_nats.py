"""The NATS JetStream bridge against a private nats-server and Redis."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from pathlib import Path

import nats
import orjson
import pytest

from tests.bridges.conftest import (
    expected,
    running_bridge,
    start_bridge,
    trade_ids,
    wait_stored,
    with_tls,
    write_map,
)
from tests.conftest import eventually, timeout
from tickwire.bench.brokers import NatsProcess
from tickwire.core.channels import Channel
from tickwire.core.redis_process import RedisProcess, TlsFiles
from tickwire.core.redis_wire import RedisConnection
from tickwire.core.tls import client_context

MAP = """
[bridge]
name = "nt"
dead_letter = "dead.md"
batch = {batch}

[nats]
stream = "MD"
# A fetch in flight when the server dies ends only at its timeout: keep the restart test short.
fetch_timeout_s = 0.5

[[route]]
subject = "md.trades.{{symbol}}"
channel = "trades"
fields = {{ price = "p", size = "q", trade_id = "t" }}
ts_field = "T"
ts_unit = "ms"
"""
SYMBOLS = ("BTC-USD", "ETH-USD", "SOL-USD")
CHANNELS = [Channel("trades", s) for s in SYMBOLS]


def trade(n: int) -> tuple[str, bytes]:
    sym = SYMBOLS[n % 3]
    body = {"p": 100.5 + n, "q": 1, "side": "sell" if n % 2 else "buy", "t": n, "T": 1_000 + n}
    return f"md.trades.{sym}", orjson.dumps(body)


async def publish(
    url: str, messages: list[tuple[str, bytes]], tls: ssl.SSLContext | None = None
) -> None:
    nc = await nats.connect(url, tls=tls)
    js = nc.jetstream()
    with contextlib.suppress(Exception):
        await js.add_stream(name="MD", subjects=["md.>"])
        await js.add_stream(name="DEAD", subjects=["dead.>"])
    for subject, data in messages:
        await js.publish(subject, data)
    await nc.close()


async def test_nats_bridge_orders_per_symbol_and_dead_letters_what_does_not_map(
    nats_server: NatsProcess, redis: RedisConnection, redis_server: RedisProcess, tmp_path: Path
) -> None:
    map_path = write_map(tmp_path, MAP.format(batch=50))
    bad = [("md.trades.BTC-USD", b"{oops"), ("md.trades.ETH-USD", b'{"p": 1}')]
    await publish(nats_server.url, [trade(n) for n in range(1, 101)] + bad)
    await publish(nats_server.url, [trade(n) for n in range(101, 201)])
    async with running_bridge("nats", nats_server.url, redis_server.url, map_path) as stats:
        await eventually(lambda: stats.received == 202, "every message received", limit=15)
        await eventually(lambda: stats.rounds > 0 and stats.stored == 200, "stored", limit=15)
    assert await trade_ids(redis, SYMBOLS) == expected(SYMBOLS, 200)
    assert (stats.unmapped, stats.dead_lettered, stats.duplicates) == (2, 2, 0)
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    dead = await js.pull_subscribe("dead.md", durable="check", stream="DEAD")
    msgs = await dead.fetch(2, timeout=timeout(15))
    assert [m.data for m in msgs] == [b"{oops", b'{"p": 1}']
    assert "not valid JSON" in (msgs[0].headers or {})["Tickwire-Reason"]
    assert (msgs[1].headers or {})["Tickwire-Subject"] == "md.trades.ETH-USD"
    # Everything was acknowledged (after the append): nothing left for a redelivery.
    info = await js.consumer_info("MD", "nt")
    assert info.num_ack_pending == 0
    assert info.ack_floor is not None and info.ack_floor.stream_seq == 202
    await nc.close()


async def test_nats_bridge_rides_out_a_broker_restart(
    nats_server: NatsProcess, redis: RedisConnection, redis_server: RedisProcess, tmp_path: Path
) -> None:
    map_path = write_map(tmp_path, MAP.format(batch=50))
    await publish(nats_server.url, [trade(n) for n in range(1, 51)])
    async with running_bridge("nats", nats_server.url, redis_server.url, map_path) as stats:
        await eventually(lambda: stats.stored == 50, "first half stored", limit=15)
        nats_server.kill()
        nats_server.start()
        await publish(nats_server.url, [trade(n) for n in range(51, 101)])
        await eventually(lambda: stats.stored == 100, "second half stored", limit=20)
    assert await trade_ids(redis, SYMBOLS) == expected(SYMBOLS, 100)


async def test_nats_bridge_stops_consuming_while_redis_is_down(
    nats_server: NatsProcess, fresh_redis: RedisProcess, tmp_path: Path
) -> None:
    text = MAP.format(batch=10).replace("[nats]", "max_in_flight = 20\n\n[nats]")
    map_path = write_map(tmp_path, text)
    await publish(nats_server.url, [trade(n) for n in range(1, 11)])
    conn = await RedisConnection.open(fresh_redis.url)
    async with running_bridge("nats", nats_server.url, fresh_redis.url, map_path) as stats:
        await wait_stored(conn, CHANNELS, 10)
        conn.close()
        fresh_redis.kill()
        await publish(nats_server.url, [trade(n) for n in range(11, 101)])
        await eventually(
            lambda: stats.redis_retries >= 3, "retries against the dead Redis", limit=15
        )
        nc = await nats.connect(nats_server.url)
        info = await nc.jetstream().consumer_info("MD", "nt")
        # The bridge holds one round; JetStream keeps the rest (at most max_in_flight out).
        assert info.num_ack_pending is not None and 0 < info.num_ack_pending <= 20
        assert info.num_pending is not None and info.num_pending >= 70
        await nc.close()
        fresh_redis.start()
        conn = await RedisConnection.open(fresh_redis.url)
        await wait_stored(conn, CHANNELS, 100)
    assert await trade_ids(conn, SYMBOLS) == expected(SYMBOLS, 100)
    conn.close()


def test_nats_bridge_killed_between_store_and_ack_stores_each_event_once(
    nats_server: NatsProcess, redis_server: RedisProcess, tmp_path: Path
) -> None:
    asyncio.run(killed_between_store_and_ack(nats_server, redis_server, tmp_path))


async def killed_between_store_and_ack(
    nats_server: NatsProcess, redis_server: RedisProcess, tmp_path: Path
) -> None:
    map_path = write_map(tmp_path, MAP.format(batch=20))
    conn = await RedisConnection.open(redis_server.url)
    await conn.execute("FLUSHALL")
    await publish(nats_server.url, [trade(n) for n in range(1, 101)])
    # The first bridge stores a round of 20 and dies (SIGKILL) before acknowledging it.
    first = start_bridge("nats", nats_server.url, redis_server.url, map_path, crash_after_round=1)
    assert await asyncio.to_thread(first.proc.wait, timeout(20)) == -9, first.log()
    assert sum(map(len, (await trade_ids(conn, SYMBOLS)).values())) == 20
    second = start_bridge("nats", nats_server.url, redis_server.url, map_path)
    try:
        await wait_stored(conn, CHANNELS, 100, second)
    finally:
        second.stop()
    assert second.stopped_cleanly(), second.log()
    assert await trade_ids(conn, SYMBOLS) == expected(SYMBOLS, 100)
    text = second.log()
    # Redelivered first (the consumer restarted from its ack floor), dropped as duplicates.
    assert "restarting it after stream seq 0" in text
    assert "80 stored, 20 duplicates dropped" in text, text
    conn.close()


def test_the_stream_sequence_is_read_off_either_form_of_reply_subject() -> None:
    from nats.aio.msg import Msg
    from nats.errors import NotJSMessageError

    from tickwire.feeds.bridges.nats_source import stream_sequence

    first = "$JS.ACK.MD.nt.1.4242.17.1700000000000000000.5"
    later = "$JS.ACK._.ACCHASH.MD.nt.2.99.7.1700000000000000000.0.tok"
    for reply in (first, later, later.rpartition(".")[0]):
        assert stream_sequence(reply) == Msg.Metadata._from_reply(reply).sequence.stream
    assert [stream_sequence(first), stream_sequence(later)] == [4242, 99]
    for bad in ("_INBOX.abc", "$JS.ACK.MD.nt.1", "$JS.NAK.MD.nt.1.4242.17.1700000000000000000.5"):
        with pytest.raises(NotJSMessageError):
            stream_sequence(bad)


async def test_nats_bridge_consumes_from_a_server_that_requires_tls(
    redis: RedisConnection, redis_server: RedisProcess, tmp_path: Path, tls_files: TlsFiles
) -> None:
    with NatsProcess(tls=tls_files) as server:
        await publish(
            server.tls_url, [trade(n) for n in range(1, 31)], client_context(str(tls_files.ca))
        )
        map_path = write_map(tmp_path, with_tls(MAP.format(batch=50), "nats", tls_files))
        async with running_bridge("nats", server.tls_url, redis_server.url, map_path) as stats:
            await eventually(lambda: stats.stored == 30, "stored", limit=15)
        assert await trade_ids(redis, SYMBOLS) == expected(SYMBOLS, 30)
