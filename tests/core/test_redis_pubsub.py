"""The pub/sub connection against a real redis-server: order, nothing lost, bounded buffering."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.conftest import eventually
from tickwire.core.errors import ConfigError, RedisUnavailable
from tickwire.core.redis_process import RedisProcess
from tickwire.core.redis_pubsub import RedisSubscription
from tickwire.core.redis_wire import RedisAddress, RedisConnection

CH = "tw:live:test"


async def take_until(sub: RedisSubscription, n: int, limit: float = 10.0) -> list[bytes]:
    """Payloads of the next `n` messages or more (what the last take brought)."""
    got: list[bytes] = []
    async with asyncio.timeout(limit):
        while len(got) < n:
            got += [m[2] for m in sub.take() if m[0] == b"message"]
            if len(got) < n:
                await sub.wait(1.0)
    return got


async def test_messages_arrive_in_order_including_those_sent_with_the_confirmation(
    redis_server: RedisProcess, redis: RedisConnection
) -> None:
    # Published from inside the same pipeline as a command that runs before the subscriber's
    # confirmation is read: the first messages may share a read with the confirmation.
    sub = await RedisSubscription.open(redis_server.url, [CH])
    try:
        await redis.pipeline([["PUBLISH", CH, b"m%d" % i] for i in range(500)])
        assert await take_until(sub, 500) == [b"m%d" % i for i in range(500)]
        assert sub.take() == []
    finally:
        sub.close()


async def test_early_messages_after_the_confirmation_are_kept(redis_server: RedisProcess) -> None:
    publisher = await RedisConnection.open(redis_server.url)
    stop = asyncio.Event()

    async def flood() -> int:
        n = 0
        while not stop.is_set():
            await publisher.execute("PUBLISH", CH, b"%d" % n)
            n += 1
        return n

    task = asyncio.create_task(flood())
    try:
        sub = await RedisSubscription.open(redis_server.url, [CH])
        got = await take_until(sub, 50)  # at least 50: a take may bring more
        # Consecutive from wherever the subscription began: nothing after it is dropped.
        first = int(got[0])
        assert got == [b"%d" % i for i in range(first, first + len(got))]
        sub.close()
    finally:
        stop.set()
        await task
        publisher.close()


async def test_wait_times_out_when_quiet_and_wake_ends_it(redis_server: RedisProcess) -> None:
    sub = await RedisSubscription.open(redis_server.url, [CH])
    try:
        assert await sub.wait(0.05) is False
        asyncio.get_running_loop().call_soon(sub.wake)
        assert await sub.wait(10.0) is True
        sub.ping()
        assert await sub.wait(10.0) is True
        assert sub.take() == [[b"pong", b""]]
    finally:
        sub.close()


async def test_buffer_past_the_bound_pauses_reading_and_loses_nothing(
    redis_server: RedisProcess, redis: RedisConnection
) -> None:
    sub = await RedisSubscription.open(redis_server.url, [CH], max_buffer=64 << 10)
    try:
        payload = b"x" * 1000
        await redis.pipeline([["PUBLISH", CH, payload + b"%d" % i] for i in range(1000)])
        # Nothing is taken yet: reading stops past the bound, and Redis holds the rest.
        await eventually(lambda: sub._protocol.paused, "reading paused")
        assert sub._protocol.buffered <= (64 << 10) + (256 << 10)  # bound + one socket read
        got = await take_until(sub, 1000)
        assert got == [payload + b"%d" % i for i in range(1000)]
        assert not sub._protocol.paused
    finally:
        sub.close()


async def test_a_killed_subscription_raises_after_what_arrived_is_taken(
    redis_server: RedisProcess, redis: RedisConnection
) -> None:
    sub = await RedisSubscription.open(redis_server.url, [CH])
    try:
        await redis.execute("PUBLISH", CH, b"last words")
        await redis.execute("CLIENT", "KILL", "TYPE", "pubsub")
        await eventually(lambda: sub._protocol.lost is not None, "the loss noticed")
        assert [m[2] for m in sub.take()] == [b"last words"]
        with pytest.raises(RedisUnavailable):
            sub.take()
    finally:
        sub.close()


async def test_no_redis_is_a_clear_error() -> None:
    from tickwire.core.redis_process import free_port

    with pytest.raises(RedisUnavailable, match="cannot connect"):
        await RedisSubscription.open(f"redis://127.0.0.1:{free_port()}", [CH])


async def test_password_and_acl_user_from_the_url(fresh_redis: RedisProcess) -> None:
    admin = await RedisConnection.open(fresh_redis.url)
    await admin.execute("ACL", "SETUSER", "feed", "on", ">pw2", "~*", "&*", "+@all")
    await admin.execute("CONFIG", "SET", "requirepass", "s3cret")
    admin.close()
    base = f"127.0.0.1:{fresh_redis.port}/0"
    for url in (f"redis://:s3cret@{base}", f"redis://feed:pw2@{base}"):
        sub = await RedisSubscription.open(url, [CH])
        conn = await RedisConnection.open(url)
        assert await conn.execute("PUBLISH", CH, b"hi") == 1
        assert await take_until(sub, 1) == [b"hi"]
        sub.close()
        conn.close()
    for opener in (
        lambda: RedisSubscription.open(f"redis://:wrong@{base}", [CH]),
        lambda: RedisConnection.open(f"redis://:wrong@{base}"),
    ):
        with pytest.raises(RedisUnavailable, match="refused"):
            await opener()


async def test_a_unix_socket_url_reaches_the_same_redis_with_its_db_and_password(
    fresh_redis: RedisProcess,
) -> None:
    admin = await RedisConnection.open(fresh_redis.url)
    await admin.execute("CONFIG", "SET", "requirepass", "s3cret")
    url = f"unix://:s3cret@{fresh_redis.socket_path}?db=3"
    sub = await RedisSubscription.open(url, [CH])
    conn = await RedisConnection.open(url)
    try:
        await conn.execute("SET", "k", "over the socket")
        assert await conn.execute("PUBLISH", CH, b"hi") == 1
        assert await take_until(sub, 1) == [b"hi"]
        await admin.execute("AUTH", "s3cret")
        await admin.execute("SELECT", 3)
        assert await admin.execute("GET", "k") == b"over the socket"
        with pytest.raises(RedisUnavailable, match="refused"):
            await RedisConnection.open(f"unix://:wrong@{fresh_redis.socket_path}")
    finally:
        sub.close()
        conn.close()
        admin.close()


async def test_a_missing_unix_socket_is_a_clear_error(tmp_path: Path) -> None:
    url = f"unix://{tmp_path / 'none.sock'}"
    with pytest.raises(RedisUnavailable, match=r"cannot connect to unix://.*none\.sock\?db=0"):
        await RedisConnection.open(url)
    with pytest.raises(RedisUnavailable, match="cannot connect"):
        await RedisSubscription.open(url, [CH])


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("redis://127.0.0.1:6380/2", RedisAddress("127.0.0.1", 6380, 2)),
        ("redis://u:p%40ss@h", RedisAddress("h", 6379, 0, "u", "p@ss")),
        ("unix:///run/redis.sock", RedisAddress("127.0.0.1", 0, 0, path="/run/redis.sock")),
        (
            "unix://:pw@/run/redis.sock?db=4",
            RedisAddress("127.0.0.1", 0, 4, password="pw", path="/run/redis.sock"),
        ),
    ],
)
def test_redis_urls_parse(url: str, address: RedisAddress) -> None:
    assert RedisAddress.parse(url) == address
    assert "p@ss" not in str(address) and "pw" not in str(address)


@pytest.mark.parametrize(
    "url", ["http://h:1/0", "redis://h:1/x", "unix://", "unix:///run/redis.sock?db=x"]
)
def test_bad_redis_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError, match="Redis URL"):
        RedisAddress.parse(url)


@pytest.mark.parametrize("sharded", [False, True])
async def test_subscribing_to_thousands_while_the_first_are_busy_keeps_their_messages(
    redis_server: RedisProcess, redis: RedisConnection, sharded: bool
) -> None:
    # A server subscribes to every slot's channel of a cluster master in one write; pushes on
    # the channels confirmed first come between the later confirmations (seen in
    # `tickwire bench failover`: the reader could not subscribe again while events flowed).
    busy = f"{CH}:busy"
    channels = [busy, *(f"{CH}:{i}" for i in range(3000))]
    publish = "SPUBLISH" if sharded else "PUBLISH"
    stop = asyncio.Event()
    sent = 0

    async def flood() -> None:
        nonlocal sent
        while not stop.is_set():
            await redis.pipeline([[publish, busy, b"%d" % (sent + i)] for i in range(50)])
            sent += 50

    flooding = asyncio.create_task(flood())
    try:
        await eventually(lambda: sent >= 500, "the flood under way")
        sub = await RedisSubscription.open(redis_server.url, channels, sharded=sharded)
    finally:
        stop.set()
        await flooding
    try:
        kind = b"smessage" if sharded else b"message"
        got: list[int] = []
        async with asyncio.timeout(10):
            while not got or got[-1] != sent - 1:
                got += [int(m[2]) for m in sub.take() if m[0] == kind]
                if not got or got[-1] != sent - 1:
                    await sub.wait(1.0)
        # Whatever came after the subscription took effect, in order, with no hole.
        assert got == list(range(got[0], sent))
        assert got[0] < sent - 1  # some arrived between the confirmations
    finally:
        sub.close()
