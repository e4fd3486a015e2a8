"""Sentinel: the primary found through the Sentinels, and the failover guarantees of a cluster
(a primary killed while its replica is behind: no reused seq, every lost event followed by
`reset`)."""

from __future__ import annotations

import pytest

from tests.server.conftest import recorder
from tickwire.core.redis_process import RedisSentinelSet
from tickwire.core.redis_target import RedisTarget, open_redis
from tickwire.core.redis_wire import RedisConnection
from tickwire.feeds.publisher import Publisher
from tickwire.server.app import TickwireServer

from .conftest import (
    kill_with_replica_behind,
    publish_trades,
    publisher_config,
    server_config,
    until,
)
from .test_failover import check_no_reuse_and_resets, tagged

pytestmark = pytest.mark.uvloop_only

SYMBOLS = ["AAA", "BBB"]


def test_the_sentinel_url_names_the_sentinels_the_service_and_the_db() -> None:
    t = RedisTarget.parse("redis+sentinel://:pw@127.0.0.1:26379,127.0.0.1:26380/tw/2")
    assert t.service == "tw" and t.db == 2
    assert [(a.port, a.password) for a in t.seeds] == [(26379, "pw"), (26380, "pw")]
    assert str(t) == "redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/tw/2"  # no password


async def test_a_primary_killed_with_its_replica_behind_never_reuses_a_seq(
    sentinel_set: RedisSentinelSet,
) -> None:
    url = sentinel_set.url
    first = sentinel_set.primary
    conn = await open_redis(url)
    assert isinstance(conn, RedisConnection)
    assert (await conn.execute("ROLE"))[0] == b"master"
    conn.close()
    async with TickwireServer(server_config(url)) as srv, recorder(srv.url) as rec:
        await rec.request("subscribe", channels=["trades:*"])
        pub = Publisher(publisher_config(url))
        await pub.start()
        await publish_trades(pub, SYMBOLS, 20, "before")
        replica = sentinel_set.replicas[0]
        await kill_with_replica_behind(pub, rec, first, replica, SYMBOLS, 20)
        await pub.close()
        await until(lambda: sentinel_set.primary_port() == replica.port, "the failover", 60)
        async with Publisher(publisher_config(url)) as fresh:
            await publish_trades(fresh, SYMBOLS, 10, "after")
        await rec.wait_until(
            lambda: all(tagged(rec, f"trades:{s}", "after") == 10 for s in SYMBOLS), timeout=60
        )
        assert not rec.checker.violations, rec.checker.violations[:5]
    lost = await check_no_reuse_and_resets(url, rec, SYMBOLS)
    assert all(lost[f"trades:{s}"] for s in SYMBOLS), "the test meant to lose writes"
    assert {m["ch"] for m in rec.of_type("reset")} == {f"trades:{s}" for s in SYMBOLS}
