"""The MQTT bridge against a private mosquitto and Redis."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiomqtt
import orjson
import pytest

from tests.bridges.conftest import (
    BridgeProcess,
    expected,
    pauses_while_redis_is_down,
    running_bridge,
    start_bridge,
    trade_ids,
    wait_stored,
    with_tls,
    write_map,
)
from tests.conftest import timeout
from tickwire.bench.brokers import MosquittoProcess
from tickwire.core.channels import Channel
from tickwire.core.errors import ConfigError
from tickwire.core.redis_process import RedisProcess, TlsFiles
from tickwire.core.redis_wire import RedisConnection
from tickwire.feeds.bridges.mapping import load_bridge_map
from tickwire.feeds.bridges.mqtt_source import MqttSource

MAP = """
[bridge]
name = "mq"
dead_letter = "dead/md"

[[route]]
topic = "md/{symbol}/trades"
channel = "trades"
id_field = "t"
fields = { price = "p", size = "q", trade_id = "t" }
ts_field = "T"
ts_unit = "us"
"""
SYMBOLS = ("BTC-USD", "ETH-USD")
CHANNELS = [Channel("trades", s) for s in SYMBOLS]


def trade(n: int) -> tuple[str, bytes]:
    body = {"p": 10 + n / 4, "q": "2", "side": "buy", "t": n, "T": 5_000 + n}
    return f"md/{SYMBOLS[n % 2]}/trades", orjson.dumps(body)


async def publish(port: int, messages: list[tuple[str, bytes]]) -> None:
    async with aiomqtt.Client("127.0.0.1", port) as client:
        for topic, payload in messages:
            await client.publish(topic, payload, qos=1)


async def test_mqtt_bridge_orders_per_symbol_and_dead_letters_what_does_not_map(
    mosquitto: MosquittoProcess, redis: RedisConnection, redis_server: RedisProcess, tmp_path: Path
) -> None:
    map_path = write_map(tmp_path, MAP)
    v5 = aiomqtt.ProtocolVersion.V5
    async with aiomqtt.Client("127.0.0.1", mosquitto.port, protocol=v5) as watcher:
        await watcher.subscribe("dead/md", qos=1)
        async with running_bridge("mqtt", mosquitto.url, redis_server.url, map_path) as stats:
            bad = [("md/BTC-USD/trades", b"not json"), ("md/ETH-USD/trades", b'{"p": 1}')]
            await publish(mosquitto.port, [trade(n) for n in range(1, 101)] + bad)
            await wait_stored(redis, CHANNELS, 100)
            async with asyncio.timeout(timeout(15)):
                dead = [await anext(watcher.messages) for _ in range(2)]
        assert await trade_ids(redis, SYMBOLS) == expected(SYMBOLS, 100)
        assert (stats.unmapped, stats.dead_lettered) == (2, 2)
        assert [m.payload for m in dead] == [b"not json", b'{"p": 1}']
        props = dict(dead[1].properties.UserProperty)  # type: ignore[union-attr]
        assert props["tickwire-topic"] == "md/ETH-USD/trades"
        assert "no 'q'" in props["tickwire-reason"]


async def test_mqtt_bridge_rides_out_a_broker_restart(
    mosquitto: MosquittoProcess, redis: RedisConnection, redis_server: RedisProcess, tmp_path: Path
) -> None:
    map_path = write_map(tmp_path, MAP)
    async with running_bridge("mqtt", mosquitto.url, redis_server.url, map_path) as stats:
        await publish(mosquitto.port, [trade(n) for n in range(1, 51)])
        await wait_stored(redis, CHANNELS, 50)
        mosquitto.restart()  # its session (subscription, queue) persists across the restart
        await publish(mosquitto.port, [trade(n) for n in range(51, 101)])
        await wait_stored(redis, CHANNELS, 100)
    assert await trade_ids(redis, SYMBOLS) == expected(SYMBOLS, 100)
    # What was stored and not yet acknowledged at the restart came again: dropped by id.
    assert stats.received == stats.stored + stats.duplicates


async def test_mqtt_bridge_takes_no_more_than_its_window_while_redis_is_down(
    mosquitto: MosquittoProcess, fresh_redis: RedisProcess, tmp_path: Path
) -> None:
    text = MAP.replace('dead_letter = "dead/md"', 'dead_letter = "dead/md"\nmax_in_flight = 20')
    bridge_map = load_bridge_map(write_map(tmp_path, text), "mqtt")

    async def send() -> None:
        await publish(mosquitto.port, [trade(n) for n in range(1, 201)])

    # The window is the receive maximum; mosquitto keeps the rest.
    source = MqttSource(mosquitto.url, bridge_map)
    await pauses_while_redis_is_down(source, bridge_map, fresh_redis, send, 200, 20, SYMBOLS)


def test_mqtt_bridge_killed_between_store_and_ack_stores_each_event_once(
    mosquitto: MosquittoProcess, redis_server: RedisProcess, tmp_path: Path
) -> None:
    asyncio.run(killed_between_store_and_ack(mosquitto, redis_server, tmp_path))


async def killed_between_store_and_ack(
    mosquitto: MosquittoProcess, redis_server: RedisProcess, tmp_path: Path
) -> None:
    map_path = write_map(tmp_path, MAP)
    conn = await RedisConnection.open(redis_server.url)
    await conn.execute("FLUSHALL")
    first = start_bridge("mqtt", mosquitto.url, redis_server.url, map_path, crash_after_round=1)
    # Once subscribed, the session queues what the bridge does not take while it is dead.
    await wait_subscribed(mosquitto, first)
    await publish(mosquitto.port, [trade(n) for n in range(1, 101)])
    assert await asyncio.to_thread(first.proc.wait, timeout(20)) == -9, first.log()
    before = sum(map(len, (await trade_ids(conn, SYMBOLS)).values()))
    assert before >= 1
    second = start_bridge("mqtt", mosquitto.url, redis_server.url, map_path)
    try:
        await wait_stored(conn, CHANNELS, 100, second)
    finally:
        second.stop()
    assert second.stopped_cleanly(), second.log()
    assert await trade_ids(conn, SYMBOLS) == expected(SYMBOLS, 100)
    # The broker resent what the dead bridge had stored and not acknowledged: dropped by id.
    assert f"{100 - before} stored, {before} duplicates dropped" in second.log()
    conn.close()


async def wait_subscribed(mosquitto: MosquittoProcess, proc: BridgeProcess) -> None:
    """Until mosquitto logs the bridge's subscription (its session exists from then on)."""
    deadline = asyncio.get_running_loop().time() + timeout(10)
    log = mosquitto.broker_log
    while not log.exists() or b"tickwire-mq 1 md/+/trades" not in log.read_bytes():
        assert asyncio.get_running_loop().time() < deadline, proc.log()
        await asyncio.sleep(0.02)


async def test_mqtt_bridge_consumes_over_tls_trusting_the_maps_ca(
    redis: RedisConnection, redis_server: RedisProcess, tmp_path: Path, tls_files: TlsFiles
) -> None:
    with MosquittoProcess(tls=tls_files) as broker:
        map_path = write_map(tmp_path, with_tls(MAP, "mqtt", tls_files))
        async with running_bridge("mqtt", broker.tls_url, redis_server.url, map_path):
            await publish(broker.port, [trade(n) for n in range(1, 21)])
            await wait_stored(redis, CHANNELS, 20)
        assert await trade_ids(redis, SYMBOLS) == expected(SYMBOLS, 20)
        # The system's CAs do not know the test's: the bridge does not start.
        plain_map = load_bridge_map(write_map(tmp_path, MAP), "mqtt")
        with pytest.raises(aiomqtt.MqttError, match="CERTIFICATE_VERIFY_FAILED"):
            await MqttSource(broker.tls_url, plain_map).start()


def test_mqtt_tls_keys_need_an_mqtts_url(tmp_path: Path, tls_files: TlsFiles) -> None:
    bridge_map = load_bridge_map(write_map(tmp_path, with_tls(MAP, "mqtt", tls_files)), "mqtt")
    with pytest.raises(ConfigError, match="need an mqtts:// URL"):
        MqttSource("mqtt://127.0.0.1:1883", bridge_map)
    assert MqttSource("mqtts://broker.example", bridge_map).port == 8883
