"""The lean Redis connection: replies in order, and any failure while replies are owed closes it."""

from __future__ import annotations

import asyncio

import pytest

from tickwire.core.commands import RedisReplyError
from tickwire.core.errors import RedisUnavailable
from tickwire.core.redis_process import RedisProcess
from tickwire.core.redis_wire import RedisConnection


async def test_pipelined_replies_come_back_in_order_with_errors_in_place(
    redis: RedisConnection,
) -> None:
    replies = await redis.pipeline(
        [["SET", "k", "v"], ["INCR", "k"], ["GET", "k"], ["LPUSH", "l", *map(str, range(1000))]]
    )
    assert replies[0] == b"OK"
    assert isinstance(replies[1], RedisReplyError)
    assert replies[2:] == [b"v", 1000]


async def test_replies_already_in_are_taken_without_waiting(redis: RedisConnection) -> None:
    seen: list[int] = []
    both_in = asyncio.Event()

    def listener() -> None:
        seen.append(redis.ready)
        if redis.ready == 2:
            both_in.set()

    redis.listen(listener)
    redis.send([["PING"], ["ECHO", "x"]])
    await asyncio.wait_for(both_in.wait(), 5)
    assert seen[-1] == 2
    assert redis.peek(1) == [b"PONG"]
    # No await inside: the coroutine finishes on its first step.
    coro = redis.replies(2, timeout=1.0)
    with pytest.raises(StopIteration) as done:
        coro.send(None)
    assert done.value.value == [b"PONG", b"x"]
    assert redis.ready == 0


async def test_a_timeout_closes_the_connection(redis_server: RedisProcess) -> None:
    conn = await RedisConnection.open(redis_server.url)
    conn.send([["BLPOP", "nothing-here", "5"]])
    with pytest.raises(RedisUnavailable, match=r"no reply from Redis within 0\.05 s"):
        await conn.replies(1, timeout=0.05)
    assert conn.closed
    with pytest.raises(RedisUnavailable, match="closed"):
        conn.send([["PING"]])


async def test_a_cancelled_wait_closes_the_connection(redis_server: RedisProcess) -> None:
    conn = await RedisConnection.open(redis_server.url)
    task = asyncio.create_task(conn.pipeline([["BLPOP", "nothing-here", "5"]]))
    await asyncio.sleep(0)  # one turn: the task sends, then waits for the reply
    assert conn._protocol.waiter is not None
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # A late reply could otherwise reach the next caller.
    assert conn.closed


async def test_redis_going_away_while_replies_are_owed_is_redis_unavailable(
    fresh_redis: RedisProcess,
) -> None:
    conn = await RedisConnection.open(fresh_redis.url)
    ended: list[bool] = []
    conn.listen(lambda: ended.append(conn.closed))
    conn.send([["BLPOP", "nothing-here", "5"]])
    waiting = asyncio.create_task(conn.replies(1, timeout=5.0))
    await asyncio.sleep(0)
    fresh_redis.kill()
    with pytest.raises(RedisUnavailable, match="lost connection to Redis"):
        await waiting
    assert conn.closed
    assert ended and ended[-1] is True
