"""The broker-independent bridge against real Redis, with an in-memory broker."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import orjson

from tests.bridges.conftest import stored
from tests.conftest import eventually
from tickwire.core.channels import REGISTRY_KEY, Channel
from tickwire.core.config import PublisherConfig
from tickwire.core.redis_process import RedisProcess
from tickwire.core.redis_wire import RedisConnection
from tickwire.feeds.bridges.core import (
    BridgeStats,
    BridgeStore,
    Delivery,
    bridge_round,
    run_bridge,
    seen_key,
)
from tickwire.feeds.bridges.mapping import BridgeMapper, parse_bridge_map

MAP = {
    "bridge": {"name": "t", "dead_letter": "dead", "dedupe_window": 50, "batch": 10},
    "route": [
        {
            "channel": "trades",
            "subject": "md.trades.{symbol}",
            "fields": {"price": "p", "size": "q", "trade_id": "t"},
            "ts_field": "T",
            "ts_unit": "ms",
        }
    ],
}
BTC = Channel("trades", "BTC-USD")
ETH = Channel("trades", "ETH-USD")


def trade(n: int, sym: str = "BTC-USD", msg_id: str | None = None) -> Delivery:
    body = {"p": 100 + n, "q": "0.5", "side": "buy", "t": n, "T": 1_700_000_000_000 + n}
    return Delivery(
        f"md.trades.{sym}", orjson.dumps(body), msg_id if msg_id is not None else str(n)
    )


class MemorySource:
    """A broker in memory: hands out what was put in, records acks and dead letters."""

    def __init__(self, deliveries: Sequence[Delivery] = ()) -> None:
        self.queue: asyncio.Queue[Delivery] = asyncio.Queue()
        for d in deliveries:
            self.queue.put_nowait(d)
        self.acked: list[Delivery] = []
        self.dead: list[tuple[Delivery, str]] = []
        self.receives = 0
        self.cancelled = 0
        self.held = 0

    async def receive(self, limit: int) -> list[Delivery]:
        self.receives += 1
        try:
            out = [await self.queue.get()]
        except asyncio.CancelledError:
            # A real broker's receive may have taken messages when it is cancelled.
            self.cancelled += 1
            raise
        while len(out) < limit and not self.queue.empty():
            out.append(self.queue.get_nowait())
        return out

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        self.acked += deliveries

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        self.dead.append((delivery, reason))

    async def hold(self, deliveries: Sequence[Delivery]) -> None:
        self.held += 1


def parts(url: str, **bridge: object) -> tuple[BridgeMapper, BridgeStore]:
    m = parse_bridge_map({**MAP, "bridge": {**MAP["bridge"], **bridge}}, "nats")  # type: ignore[dict-item]
    return BridgeMapper(m), BridgeStore(PublisherConfig(redis_url=url), m.options)


async def test_store_redelivered_ids_are_stored_once(
    redis: RedisConnection, redis_server: RedisProcess
) -> None:
    mapper, store = parts(redis_server.url)
    stats = BridgeStats()
    source = MemorySource()
    await bridge_round(source, mapper, store, [trade(i) for i in range(1, 6)], stats, 1)
    # A redelivery of 3..5 beside new 6..7, and 7 twice in one round.
    again = [trade(i) for i in (3, 4, 5, 6, 7, 7)]
    await bridge_round(source, mapper, store, again, stats, 2)
    events = await stored(redis, BTC)
    assert [e["trade_id"] for e in events] == [1, 2, 3, 4, 5, 6, 7]
    assert (stats.stored, stats.duplicates) == (7, 4)
    # The ids sit beside the channel, each with the seq it was stored under.
    seen = await redis.execute("ZRANGE", seen_key(BTC, "t"), 0, -1, "WITHSCORES")
    assert seen[:4] == [b"1", b"1", b"2", b"2"]
    # No writer mark is left in the meta hash (the ids guard retries instead).
    assert not [f for f in await redis.execute("HKEYS", BTC.meta_key) if f.startswith(b"w:")]
    assert await redis.execute("SISMEMBER", REGISTRY_KEY, BTC.name) == 1
    store.close()


async def test_store_one_call_per_symbol_stores_the_same(
    redis: RedisConnection, redis_server: RedisProcess
) -> None:
    m = parse_bridge_map(MAP, "nats")
    config = PublisherConfig(redis_url=redis_server.url, one_call_per_symbol=True)
    store = BridgeStore(config, m.options)
    stats = BridgeStats()
    round_ = [trade(i, "BTC-USD" if i % 2 else "ETH-USD") for i in range(1, 9)]
    await bridge_round(MemorySource(), BridgeMapper(m), store, round_, stats, 1)
    await bridge_round(MemorySource(), BridgeMapper(m), store, round_[4:], stats, 2)
    assert [e["trade_id"] for e in await stored(redis, BTC)] == [1, 3, 5, 7]
    assert [e["trade_id"] for e in await stored(redis, ETH)] == [2, 4, 6, 8]
    assert (stats.stored, stats.duplicates) == (8, 4)
    store.close()


async def test_store_keeps_a_bounded_window_of_ids(
    redis: RedisConnection, redis_server: RedisProcess
) -> None:
    mapper, store = parts(redis_server.url, dedupe_window=5)
    stats = BridgeStats()
    await bridge_round(MemorySource(), mapper, store, [trade(i) for i in range(1, 13)], stats, 1)
    assert await redis.execute("ZCARD", seen_key(BTC, "t")) == 5
    assert await redis.execute("ZRANGE", seen_key(BTC, "t"), 0, -1) == [
        str(i).encode() for i in range(8, 13)
    ]
    store.close()


async def test_store_a_new_epoch_keeps_only_its_own_ids(
    redis: RedisConnection, redis_server: RedisProcess
) -> None:
    mapper, store = parts(redis_server.url)
    stats = BridgeStats()
    await bridge_round(MemorySource(), mapper, store, [trade(1), trade(2)], stats, 1)
    # The stream is removed by hand: the next append starts a new epoch. Id 2 was stored
    # (in the history now gone) and is not stored again; the record then holds the new
    # epoch's ids only, scored by their seqs in it, so the window trims the oldest first.
    await redis.execute("DEL", BTC.stream_key)
    await bridge_round(MemorySource(), mapper, store, [trade(2), trade(3)], stats, 2)
    events = await stored(redis, BTC)
    assert [(e["trade_id"], e["seq"]) for e in events] == [(3, 1)]
    assert stats.duplicates == 1
    assert await redis.execute("ZRANGE", seen_key(BTC, "t"), 0, -1, "WITHSCORES") == [b"3", b"1"]
    store.close()


async def test_run_orders_per_symbol_and_acks_after_storing(
    redis: RedisConnection, redis_server: RedisProcess
) -> None:
    mapper, store = parts(redis_server.url)
    deliveries = [trade(i, "BTC-USD" if i % 3 else "ETH-USD") for i in range(1, 61)]
    source = MemorySource(deliveries)
    stop = asyncio.Event()
    acked_when_stored: list[bool] = []

    def after_store(rounds: int) -> None:
        # Between the write and the ack: nothing of this round is acknowledged yet.
        acked_when_stored.append(len(source.acked) == (rounds - 1) * 10)

    task = asyncio.create_task(
        run_bridge(source, mapper, store, stop=stop, after_store=after_store)
    )
    await eventually(lambda: len(source.acked) == 60, "all acknowledged", limit=15)
    stop.set()
    stats = await task
    btc, eth = await stored(redis, BTC), await stored(redis, ETH)
    assert [e["trade_id"] for e in btc] == [i for i in range(1, 61) if i % 3]
    assert [e["trade_id"] for e in eth] == [i for i in range(1, 61) if not i % 3]
    assert btc[0]["ts"] == 1_700_000_000_001 * 1_000_000
    assert btc[0]["size"] == 0.5
    assert acked_when_stored == [True] * 6
    assert stats.stored == 60
    store.close()


async def test_run_counts_and_dead_letters_what_does_not_map(
    redis: RedisConnection, redis_server: RedisProcess
) -> None:
    mapper, store = parts(redis_server.url)
    bad = [
        Delivery("md.trades.BTC-USD", b"{not json", "b1"),
        Delivery("md.quotes.BTC-USD", orjson.dumps({"p": 1}), "b2"),
        Delivery("md.trades.btc usd", trade(1).payload, "b3"),
        Delivery(
            "md.trades.BTC-USD",
            orjson.dumps({"p": "x", "q": 1, "side": "buy", "t": 1, "T": 1}),
            "b4",
        ),
    ]
    source = MemorySource([trade(1), *bad, trade(2)])
    stats = BridgeStats()
    stop = asyncio.Event()
    task = asyncio.create_task(run_bridge(source, mapper, store, stats=stats, stop=stop))
    await eventually(lambda: len(source.acked) == 6, "all acknowledged", limit=15)
    stop.set()
    await task
    assert [e["trade_id"] for e in await stored(redis, BTC)] == [1, 2]
    assert (stats.unmapped, stats.dead_lettered) == (4, 4)
    assert stats.unmapped_reasons["not valid JSON"] == 1
    assert sum(stats.unmapped_reasons.values()) == 4
    reasons = [r for _, r in source.dead]
    assert "not valid JSON" in reasons[0]
    assert "no route matches" in reasons[1]
    assert "invalid symbol" in reasons[2]
    assert "price is not a number" in reasons[3]
    store.close()


async def test_run_skips_unmapped_when_told(
    redis: RedisConnection, redis_server: RedisProcess
) -> None:
    mapper, store = parts(redis_server.url, on_unmapped="skip")
    source = MemorySource([Delivery("md.trades.BTC-USD", b"[]", "x"), trade(1)])
    stats = BridgeStats()
    await bridge_round(source, mapper, store, await source.receive(10), stats, 1)
    assert (stats.unmapped, stats.dead_lettered, stats.stored) == (1, 0, 1)
    assert source.dead == []
    store.close()


async def test_redis_down_pauses_consuming_and_loses_nothing(fresh_redis: RedisProcess) -> None:
    mapper, store = parts(fresh_redis.url)
    await store.start()
    source = MemorySource([trade(i) for i in range(1, 11)])
    stop = asyncio.Event()
    task = asyncio.create_task(run_bridge(source, mapper, store, stop=stop))
    await eventually(lambda: len(source.acked) == 10, "first round acknowledged", limit=15)
    fresh_redis.kill()
    for i in range(11, 41):
        source.queue.put_nowait(trade(i))
    # One round is taken and held, unacknowledged; nothing more is asked of the broker.
    await eventually(lambda: store.retries >= 3, "retries against the dead Redis", limit=15)
    receives = source.receives
    assert len(source.acked) == 10
    assert source.queue.qsize() == 20
    assert source.held >= 3
    fresh_redis.start()
    await eventually(lambda: len(source.acked) == 40, "everything acknowledged", limit=20)
    assert source.receives > receives
    stop.set()
    await task
    conn = await RedisConnection.open(fresh_redis.url)
    assert [e["trade_id"] for e in await stored(conn, BTC)] == list(range(1, 41))
    conn.close()
    store.close()


async def test_a_stream_someone_overwrote_dead_letters_its_events_and_stores_the_others(
    redis: RedisConnection, redis_server: RedisProcess
) -> None:
    mapper, store = parts(redis_server.url)
    await redis.execute("SET", ETH.stream_key, "someone else's")
    stats = BridgeStats()
    source = MemorySource()
    round_ = [trade(i, "BTC-USD" if i % 2 else "ETH-USD") for i in range(1, 7)]
    # Redis refuses ETH's batch: the round is not retried (it never would succeed), BTC's
    # events are stored and ETH's go the unmapped way, with the reason.
    await asyncio.wait_for(bridge_round(source, mapper, store, round_, stats, 1), 10)
    assert [e["trade_id"] for e in await stored(redis, BTC)] == [1, 3, 5]
    assert await redis.execute("GET", ETH.stream_key) == b"someone else's"
    assert [d.broker_id for d, _ in source.dead] == ["2", "4", "6"]
    assert all("Redis refused trades:ETH-USD" in r and "WRONGTYPE" in r for _, r in source.dead)
    assert (stats.stored, stats.refused, stats.dead_lettered, store.retries) == (3, 3, 3, 0)
    assert store.refused == {ETH}
    # Once the key is gone the channel stores again; BTC's redelivered ids stay stored once.
    await redis.execute("DEL", ETH.stream_key)
    again = [trade(i, "BTC-USD" if i % 2 else "ETH-USD") for i in range(5, 9)]
    await asyncio.wait_for(bridge_round(source, mapper, store, again, stats, 1), 10)
    assert [e["trade_id"] for e in await stored(redis, BTC)] == [1, 3, 5, 7]
    assert [e["trade_id"] for e in await stored(redis, ETH)] == [6, 8]
    assert (stats.stored, stats.duplicates, stats.refused) == (6, 1, 3)
    assert stats.received == stats.stored + stats.duplicates + stats.unmapped + stats.refused
    assert store.refused == set()
    store.close()


async def test_a_refused_channel_is_skipped_when_told(
    redis: RedisConnection, redis_server: RedisProcess
) -> None:
    mapper, store = parts(redis_server.url, on_unmapped="skip")
    # The meta and the id set are checked by the bridge's own prelude, before the append.
    await redis.execute("SET", BTC.meta_key, "not a hash")
    await redis.execute("SET", seen_key(ETH, "t"), "not a sorted set")
    stats = BridgeStats()
    source = MemorySource()
    round_ = [trade(1), trade(2, "ETH-USD"), trade(3, "SOL-USD")]
    await asyncio.wait_for(bridge_round(source, mapper, store, round_, stats, 1), 10)
    assert source.dead == []
    assert (stats.stored, stats.refused, stats.dead_lettered) == (1, 2, 0)
    assert store.refused == {BTC, ETH}
    assert [e["trade_id"] for e in await stored(redis, Channel("trades", "SOL-USD"))] == [3]
    assert await redis.execute("EXISTS", ETH.stream_key) == 0
    store.close()
