"""Redis Cluster and Sentinel fixtures (one per test module: a cluster takes ~2 s to build) and
helpers to read what is stored and to check what clients saw against it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson
import pytest

from tickwire.core.channels import Channel
from tickwire.core.config import PublisherConfig, ServerConfig
from tickwire.core.events import encode_body
from tickwire.core.redis_cluster import ClusterConnection
from tickwire.core.redis_process import RedisCluster, RedisSentinelSet
from tickwire.core.redis_slots import key_slot
from tickwire.core.redis_target import RedisLink, open_redis
from tickwire.feeds.publisher import Publisher


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    with RedisCluster(masters=3, replicas=1) as c:
        yield c


@pytest.fixture(scope="module")
def sentinel_set() -> Iterator[RedisSentinelSet]:
    with RedisSentinelSet(replicas=1, sentinels=3) as s:
        yield s


@pytest.fixture
async def cluster_conn(cluster: RedisCluster) -> AsyncIterator[ClusterConnection]:
    """A connection to every master, the cluster emptied first."""
    cluster.wait_ok()
    conn = await open_redis(cluster.url)
    assert isinstance(conn, ClusterConnection)
    await conn.execute_on_all("FLUSHALL")
    yield conn
    conn.close()


def trade(symbol: str, n: int, tag: str = "") -> bytes:
    return encode_body(
        "trade",
        symbol,
        n,
        0,
        {"price": 100.0 + n % 7, "size": 1, "side": "buy", "trade_id": n, "tag": tag},
    )


def publisher_config(url: str) -> PublisherConfig:
    return PublisherConfig(redis_url=url, backoff_initial_s=0.02, backoff_max_s=0.2)


def server_config(url: str, **fields: Any) -> ServerConfig:
    return ServerConfig(
        redis_url=url,
        port=0,
        registry_poll_s=0.05,
        meta_recheck_s=0.5,
        heartbeat_ms=60_000,
        **fields,
    )


async def publish_trades(pub: Publisher, symbols: list[str], rounds: int, tag: str = "") -> None:
    for i in range(rounds):
        await pub.publish({Channel("trades", s): [trade(s, i, tag)] for s in symbols})
    await pub.flush()


async def stored(conn: RedisLink, channel: Channel) -> dict[tuple[str, int], bytes]:
    """Every stored event of `channel` by (epoch, seq)."""
    entries = await conn.execute("XRANGE", channel.stream_key, "-", "+")
    out = {}
    for _id, fields in entries:
        doc = orjson.loads(fields[1])
        out[(doc["epoch"], doc["seq"])] = fields[1]
    return out


def symbols_on_each_master(conn: ClusterConnection, per_master: int) -> list[str]:
    """Symbols chosen so that every master owns `per_master` of them."""
    want = {m: per_master for m in conn.slots.masters}
    out = []
    i = 0
    while any(want.values()):
        s = f"S{i}"
        owner = conn.slots.owners[key_slot(Channel("trades", s).stream_key)]
        if want[owner]:
            want[owner] -= 1
            out.append(s)
        i += 1
    return out


async def until(cond: Any, what: str, limit: float = 20.0) -> None:
    """Poll an async or plain condition until it holds; fail after `limit` seconds."""
    deadline = asyncio.get_running_loop().time() + limit
    while True:
        got = cond()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)
