"""Sentinels with a password (or an ACL user) of their own, and a Sentinel that hangs: the
primary is still found, at once, and a wrong or missing password says where it goes."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from urllib.parse import quote

import pytest

from tickwire.core.errors import ConfigError, RedisUnavailable
from tickwire.core.redis_process import RedisSentinelSet
from tickwire.core.redis_target import RedisTarget, open_redis
from tickwire.core.redis_wire import RedisConnection

from .conftest import check_feed_and_server

pytestmark = pytest.mark.uvloop_only

PASSWORD = "s3nt&nel"  # a character a URL must escape
APP_PASSWORD = "app-pw"


@pytest.fixture(scope="module")
def guarded() -> Iterator[RedisSentinelSet]:
    # The least a Sentinel user needs for tickwire: the one question it asks.
    user = f"user app on >{APP_PASSWORD} +sentinel|get-master-addr-by-name"
    with RedisSentinelSet(replicas=0, password=PASSWORD, sentinel_conf=(user,)) as s:
        yield s


def without_query(url: str) -> str:
    return url.partition("?")[0]


async def primary_port(url: str, timeout: float = 2.0) -> int:
    conn = await open_redis(url, timeout)
    assert isinstance(conn, RedisConnection)
    try:
        assert (await conn.execute("ROLE"))[0] == b"master"
        return int((await conn.execute("CONFIG", "GET", "port"))[1])
    finally:
        conn.close()


def test_a_sentinel_url_takes_the_sentinels_credentials_apart_from_the_data_nodes() -> None:
    t = RedisTarget.parse(
        "redis+sentinel://:data@s1,s2:26380/tw/1?sentinel_username=app&sentinel_password=a%26b"
    )
    assert (t.sentinel_username, t.sentinel_password) == ("app", "a&b")
    assert [(a.port, a.password) for a in t.seeds] == [(26379, "data"), (26380, "data")]
    assert "a&b" not in str(t) and "data" not in str(t)
    plain = RedisTarget.parse("redis+sentinel://s1/tw")
    assert (plain.sentinel_username, plain.sentinel_password) == (None, None)


def test_an_unknown_option_in_a_sentinel_url_is_refused_without_showing_the_password() -> None:
    with pytest.raises(ConfigError, match=r"sentinel_passwd.*sentinel_password") as caught:
        RedisTarget.parse("redis+sentinel://:data@s1/tw?sentinel_passwd=oops")
    assert "data" not in str(caught.value)


async def test_sentinels_with_a_password_name_the_primary(guarded: RedisSentinelSet) -> None:
    assert "sentinel_password=" in guarded.url
    assert await primary_port(guarded.url) == guarded.primary.port


async def test_an_acl_user_of_the_sentinels_is_taken_too(guarded: RedisSentinelSet) -> None:
    url = f"{without_query(guarded.url)}?sentinel_username=app&sentinel_password={APP_PASSWORD}"
    assert await primary_port(url) == guarded.primary.port


@pytest.mark.parametrize("query", ["", "?sentinel_password=wrong", "?sentinel_username=app"])
async def test_a_missing_or_wrong_sentinel_password_says_where_it_goes(
    guarded: RedisSentinelSet, query: str
) -> None:
    # The data nodes' password in user:password@ is not the Sentinels': the usual mistake.
    hosts = without_query(guarded.url).removeprefix("redis+sentinel://")
    url = f"redis+sentinel://:{quote(PASSWORD)}@{hosts}{query}"
    with pytest.raises(RedisUnavailable) as caught:
        await open_redis(url)
    said = str(caught.value)
    assert "no Sentinel named the primary" in said
    assert said.count("?sentinel_password=") == len(guarded.sentinel_ports), said
    assert PASSWORD not in said and "wrong" not in said


async def test_a_hung_sentinel_is_passed_over_at_once(guarded: RedisSentinelSet) -> None:
    """The first Sentinel takes connections and answers nothing: the next is asked a moment
    later, not after the whole timeout (120 s here), at every connect."""
    guarded.pause_sentinel(0)
    try:
        async with asyncio.timeout(10):
            for _ in range(3):
                assert await primary_port(guarded.url, timeout=120) == guarded.primary.port
    finally:
        guarded.resume_sentinel(0)


async def test_a_feed_and_a_server_run_through_sentinels_with_a_password(
    guarded: RedisSentinelSet,
) -> None:
    await check_feed_and_server(guarded.url, ["AAA"])
