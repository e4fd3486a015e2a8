"""Sentinel over TLS (`rediss+sentinel://`): the Sentinels asked over TLS, with a password of
their own, name the primary's TLS port, a feed and a server run through it, and after a
failover the promoted replica's TLS port."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.server.conftest import recorder
from tickwire.core.redis_process import RedisSentinelSet, TlsFiles
from tickwire.core.redis_target import open_redis
from tickwire.core.redis_wire import RedisConnection
from tickwire.feeds.publisher import Publisher
from tickwire.server.app import TickwireServer

from .conftest import (
    check_feed_and_server,
    publish_trades,
    publisher_config,
    server_config,
    until,
)
from .test_failover import tagged

pytestmark = pytest.mark.uvloop_only


@pytest.fixture(scope="module")
def tls_sentinels(tls_files: TlsFiles) -> Iterator[RedisSentinelSet]:
    with RedisSentinelSet(replicas=1, password="sentinel-pw", tls=tls_files) as s:
        yield s


async def test_the_primary_is_found_and_used_over_tls(tls_sentinels: RedisSentinelSet) -> None:
    url = tls_sentinels.url
    assert url.startswith("rediss+sentinel://")
    conn = await open_redis(url)
    assert isinstance(conn, RedisConnection)
    try:
        assert (await conn.execute("ROLE"))[0] == b"master"
        port = int((await conn.execute("CONFIG", "GET", "tls-port"))[1])
    finally:
        conn.close()
    assert port == tls_sentinels.primary.tls_port
    await check_feed_and_server(url, ["SEC"])


async def test_after_a_failover_the_sentinels_name_the_replicas_tls_port(
    tls_sentinels: RedisSentinelSet,
) -> None:
    """The promoted replica is reached over TLS too: it told its primary its TLS port
    (`tls-replication yes`), and that is the address the Sentinels give. Last in the module:
    the primary stays dead."""
    url = tls_sentinels.url
    replica = tls_sentinels.replicas[0]
    async with TickwireServer(server_config(url)) as srv, recorder(srv.url) as rec:
        await rec.request("subscribe", channels=["trades:FO"])
        async with Publisher(publisher_config(url)) as pub:
            await publish_trades(pub, ["FO"], 3, "before")
        await rec.wait_until(lambda: tagged(rec, "trades:FO", "before") == 3, timeout=20)
        tls_sentinels.primary.kill()
        await until(lambda: tls_sentinels.primary_port() == replica.tls_port, "the failover", 60)
        async with Publisher(publisher_config(url)) as pub:
            await publish_trades(pub, ["FO"], 3, "after")
        await rec.wait_until(lambda: tagged(rec, "trades:FO", "after") == 3, timeout=60)
        assert not rec.checker.violations, rec.checker.violations[:5]
    conn = await open_redis(url)
    try:
        assert int((await conn.execute("CONFIG", "GET", "tls-port"))[1]) == replica.tls_port
    finally:
        conn.close()
