"""Redis Cluster and Sentinel fixtures (one per test module: a cluster takes ~2 s to build) and
helpers to read what is stored and to check what clients saw against it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import orjson
import pytest

from tests.server.conftest import Recorder, recorder
from tickwire.bench.failover import symbols_per_master
from tickwire.core.channels import Channel
from tickwire.core.config import PublisherConfig, ServerConfig
from tickwire.core.events import encode_body
from tickwire.core.redis_cluster import ClusterConnection
from tickwire.core.redis_process import (
    RedisCluster,
    RedisProcess,
    RedisSentinelSet,
    pending_to_replicas,
)
from tickwire.core.redis_slots import key_slot
from tickwire.core.redis_target import RedisLink, open_redis
from tickwire.feeds.publisher import Publisher
from tickwire.server.app import TickwireServer


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
    defaults: dict[str, Any] = {
        "registry_poll_s": 0.05,
        "meta_recheck_s": 0.5,
        "heartbeat_ms": 60_000,
    }
    return ServerConfig(redis_url=url, port=0, **(defaults | fields))


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


async def check_feed_and_server(
    url: str,
    symbols: list[str],
    rounds: int = 5,
    while_connected: Callable[[], None] | None = None,
) -> None:
    """Run a server and a publisher on `url`, publish `rounds` trades to each symbol and check
    that a subscriber gets seqs 1..rounds of each, in order; `while_connected` is called while
    both hold their Redis connections."""
    async with TickwireServer(server_config(url)) as srv, recorder(srv.url) as rec:
        await rec.request("subscribe", channels=[f"trades:{s}" for s in symbols])
        async with Publisher(publisher_config(url)) as pub:
            await publish_trades(pub, symbols, rounds)
            if while_connected is not None:
                while_connected()
        await rec.wait_until(
            lambda: all(rec.last_seq(f"trades:{s}") == rounds for s in symbols), timeout=30
        )
        for s in symbols:
            assert [e["seq"] for e in rec.events(f"trades:{s}")] == list(range(1, rounds + 1))
        assert not rec.checker.violations, rec.checker.violations[:5]


def split(
    cluster: RedisCluster,
    conn: ClusterConnection,
    symbols: list[str],
    victim: tuple[str, int] | None = None,
) -> tuple[RedisProcess, list[str], list[str]]:
    """The master to kill (by default the first symbol's), its symbols, and the others'."""
    owner_of = {s: conn.slots.owners[key_slot(f"{{{s}}}")] for s in symbols}
    victim = victim or owner_of[symbols[0]]
    doomed = [s for s in symbols if owner_of[s] == victim]
    return cluster.node_at(victim[1]), doomed, [s for s in symbols if s not in doomed]


def symbols_on_each_master(conn: ClusterConnection, per_master: int) -> list[str]:
    """Symbols chosen so that every master owns `per_master` of them."""
    return list(symbols_per_master(conn.slots, per_master, "S"))


async def kill_with_replica_behind(
    pub: Publisher,
    rec: Recorder,
    primary: RedisProcess,
    replica: RedisProcess,
    symbols: list[str],
    sent: int,
) -> int:
    """Stop `replica`, publish to `symbols` until `primary` holds data its replica never took
    (that is what dies with it), let the client have all of it, kill `primary` (SIGKILL) and
    resume `replica`. `sent`: events per channel so far; returns the new count."""
    replica.pause()
    try:
        while pending_to_replicas(primary.port) < 1 << 20:
            await publish_trades(pub, symbols, 500, "doomed")
            sent += 500
        await rec.wait_until(
            lambda: all(rec.last_seq(f"trades:{s}") == sent for s in symbols), timeout=60
        )
        primary.kill()
    finally:
        replica.resume()
    return sent


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
