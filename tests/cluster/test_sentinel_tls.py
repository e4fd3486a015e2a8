"""Sentinel over TLS (`rediss+sentinel://`): the Sentinels asked over TLS, with a password of
their own, name the primary's TLS port, and a feed and a server run through it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tickwire.core.redis_process import RedisSentinelSet, TlsFiles
from tickwire.core.redis_target import open_redis
from tickwire.core.redis_wire import RedisConnection

from .conftest import check_feed_and_server

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
