"""The RabbitMQ bridge against a private RabbitMQ node (one per session) and Redis."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import aio_pika
import aio_pika.abc
import orjson
import pytest

from tests.bridges.conftest import (
    expected,
    pauses_while_redis_is_down,
    running_bridge,
    start_bridge,
    stored,
    trade_ids,
    wait_stored,
    with_tls,
    write_map,
)
from tests.conftest import eventually, timeout
from tickwire.bench.brokers import RabbitProcess
from tickwire.core.channels import Channel
from tickwire.core.errors import ConfigError
from tickwire.core.redis_process import RedisProcess, TlsFiles
from tickwire.core.redis_wire import RedisConnection
from tickwire.feeds.bridges.mapping import load_bridge_map
from tickwire.feeds.bridges.rabbitmq_source import RabbitSource

MAP = """
[bridge]
name = "rb"
dead_letter = "{uid}-dead"
batch = 20

[rabbitmq]
declare = true
exchange = "{uid}-md"

[[route]]
queue = "{uid}-trades"
routing_key = "trades.{{symbol}}"
channel = "trades"
fields = {{ price = "p", size = "q", trade_id = "t" }}
ts_field = "T"
ts_unit = "s"
"""
SYMBOLS = ("BTC-USD", "ETH-USD", "AAPL")
CHANNELS = [Channel("trades", s) for s in SYMBOLS]


def trade(n: int) -> tuple[str, bytes]:
    body = {"p": 1 + n, "q": 3, "side": "buy", "t": n, "T": 1_700_000_000.5 + n}
    return f"trades.{SYMBOLS[n % 3]}", orjson.dumps(body)


async def declare(url: str, uid: str) -> None:
    """What the bridge declares, declared first (for a test that publishes before it runs)."""
    conn = await aio_pika.connect(url)
    ch = await conn.channel()
    ex = await ch.declare_exchange(f"{uid}-md", aio_pika.ExchangeType.TOPIC, durable=True)
    q = await ch.declare_queue(f"{uid}-trades", durable=True)
    await q.bind(ex, "trades.*")
    await ch.declare_queue(f"{uid}-dead", durable=True)
    await conn.close()


async def publish(url: str, uid: str, messages: list[tuple[str, bytes]], first_id: int) -> None:
    conn = await aio_pika.connect(url)
    ch = await conn.channel()  # publisher confirms: each publish returns once RabbitMQ has it
    ex = await ch.get_exchange(f"{uid}-md")
    for i, (key, body) in enumerate(messages, first_id):
        msg = aio_pika.Message(
            body, message_id=f"m{i}", delivery_mode=aio_pika.DeliveryMode.PERSISTENT
        )
        await ex.publish(msg, routing_key=key)
    await conn.close()


async def test_rabbitmq_bridge_orders_per_symbol_and_dead_letters_what_does_not_map(
    rabbitmq: RabbitProcess, redis: RedisConnection, redis_server: RedisProcess, tmp_path: Path
) -> None:
    uid = secrets.token_hex(4)
    map_path = write_map(tmp_path, MAP.format(uid=uid))
    async with running_bridge("rabbitmq", rabbitmq.url, redis_server.url, map_path) as stats:
        await declare(rabbitmq.url, uid)
        bad = [("trades.BTC-USD", b"[1, 2]"), ("trades.BAD SYMBOL", trade(1)[1])]
        await publish(rabbitmq.url, uid, [trade(n) for n in range(1, 91)] + bad, 1)
        await wait_stored(redis, CHANNELS, 90)
        await eventually(lambda: stats.received == 92, "the bad ones handled too", limit=15)
    assert await trade_ids(redis, SYMBOLS) == expected(SYMBOLS, 90)
    assert (await stored(redis, CHANNELS[1]))[0]["ts"] == 1_700_000_001_500_000_000
    assert (stats.unmapped, stats.dead_lettered) == (2, 2)
    conn = await aio_pika.connect(rabbitmq.url)
    ch = await conn.channel()
    dead = await ch.get_queue(f"{uid}-dead")
    got: list[aio_pika.abc.AbstractIncomingMessage] = []
    async with asyncio.timeout(timeout(15)):
        while len(got) < 2:
            m = await dead.get(fail=False)
            if m is None:
                await asyncio.sleep(0.02)
                continue
            got.append(m)
            await m.ack()
    assert [m.body for m in got] == [b"[1, 2]", trade(1)[1]]
    assert "not a JSON object" in str(got[0].headers["tickwire-reason"])
    assert got[1].headers["tickwire-routing-key"] == "trades.BAD SYMBOL"
    # Nothing left unacknowledged in the source queue.
    q = await ch.declare_queue(f"{uid}-trades", durable=True, passive=True)
    assert q.declaration_result.message_count == 0
    await conn.close()


async def test_rabbitmq_bridge_takes_no_more_than_its_prefetch_while_redis_is_down(
    rabbitmq: RabbitProcess, fresh_redis: RedisProcess, tmp_path: Path
) -> None:
    uid = secrets.token_hex(4)
    text = MAP.format(uid=uid).replace("batch = 20", "batch = 10\nmax_in_flight = 20")
    bridge_map = load_bridge_map(write_map(tmp_path, text), "rabbitmq")
    await declare(rabbitmq.url, uid)

    async def send() -> None:
        await publish(rabbitmq.url, uid, [trade(n) for n in range(1, 101)], 1)

    # The window is the prefetch; RabbitMQ keeps the rest.
    source = RabbitSource(rabbitmq.url, bridge_map)
    await pauses_while_redis_is_down(source, bridge_map, fresh_redis, send, 100, 20, SYMBOLS)


def test_rabbitmq_bridge_killed_between_store_and_ack_stores_each_event_once(
    rabbitmq: RabbitProcess, redis_server: RedisProcess, tmp_path: Path
) -> None:
    asyncio.run(killed_between_store_and_ack(rabbitmq, redis_server, tmp_path))


async def killed_between_store_and_ack(
    rabbitmq: RabbitProcess, redis_server: RedisProcess, tmp_path: Path
) -> None:
    uid = secrets.token_hex(4)
    map_path = write_map(tmp_path, MAP.format(uid=uid))
    conn = await RedisConnection.open(redis_server.url)
    await conn.execute("FLUSHALL")
    await declare(rabbitmq.url, uid)
    await publish(rabbitmq.url, uid, [trade(n) for n in range(1, 101)], 1)
    first = start_bridge("rabbitmq", rabbitmq.url, redis_server.url, map_path, crash_after_round=1)
    assert await asyncio.to_thread(first.proc.wait, timeout(20)) == -9, first.log()
    before = sum(map(len, (await trade_ids(conn, SYMBOLS)).values()))
    assert before >= 1
    second = start_bridge("rabbitmq", rabbitmq.url, redis_server.url, map_path)
    try:
        await wait_stored(conn, CHANNELS, 100, second)
    finally:
        second.stop()
    assert second.stopped_cleanly(), second.log()
    assert await trade_ids(conn, SYMBOLS) == expected(SYMBOLS, 100)
    # RabbitMQ requeued the dead bridge's unacknowledged round in place: redelivered first,
    # and dropped by message id.
    assert f"{100 - before} stored, {before} duplicates dropped" in second.log()
    conn.close()


def test_rabbitmq_bridge_rides_out_a_broker_restart(
    rabbitmq: RabbitProcess, redis_server: RedisProcess, tmp_path: Path
) -> None:
    # Once, on one event loop: a restart of RabbitMQ takes seconds.
    asyncio.run(broker_restart(rabbitmq, redis_server, tmp_path))


async def broker_restart(
    rabbitmq: RabbitProcess, redis_server: RedisProcess, tmp_path: Path
) -> None:
    redis = await RedisConnection.open(redis_server.url)
    await redis.execute("FLUSHALL")
    uid = secrets.token_hex(4)
    map_path = write_map(tmp_path, MAP.format(uid=uid))
    await declare(rabbitmq.url, uid)
    async with running_bridge("rabbitmq", rabbitmq.url, redis_server.url, map_path) as stats:
        await publish(rabbitmq.url, uid, [trade(n) for n in range(1, 31)], 1)
        await wait_stored(redis, CHANNELS, 30)
        await asyncio.to_thread(rabbitmq.restart)
        await publish(rabbitmq.url, uid, [trade(n) for n in range(31, 61)], 31)
        await wait_stored(redis, CHANNELS, 60, limit=30)
    assert await trade_ids(redis, SYMBOLS) == expected(SYMBOLS, 60)
    assert stats.received == stats.stored + stats.duplicates
    redis.close()


async def test_rabbitmq_bridge_consumes_over_amqps_trusting_the_maps_ca(
    rabbitmq: RabbitProcess,
    redis: RedisConnection,
    redis_server: RedisProcess,
    tmp_path: Path,
    tls_files: TlsFiles,
) -> None:
    uid = secrets.token_hex(4)
    map_path = write_map(tmp_path, with_tls(MAP.format(uid=uid), "rabbitmq", tls_files))
    async with running_bridge("rabbitmq", rabbitmq.tls_url, redis_server.url, map_path):
        await declare(rabbitmq.url, uid)
        await publish(rabbitmq.url, uid, [trade(n) for n in range(1, 31)], 1)
        await wait_stored(redis, CHANNELS, 30)
    assert await trade_ids(redis, SYMBOLS) == expected(SYMBOLS, 30)
    with pytest.raises(ConfigError, match="need an amqps:// URL"):
        RabbitSource(rabbitmq.url, load_bridge_map(map_path, "rabbitmq"))
