"""The reader's registry poll and meta recheck against a real Redis: cheap while nothing changes."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

from tests.conftest import eventually, timeout
from tickwire.core.channels import REGISTRY_KEY, Channel
from tickwire.core.redis_process import RedisProcess
from tickwire.core.redis_wire import RedisConnection
from tickwire.server.app import TickwireServer

from .conftest import recorder, server_config

T = Channel.parse("trades:BTC-USD")


async def calls(redis: RedisConnection) -> dict[str, int]:
    """Commands Redis has run since its stats were reset, by name."""
    info = (await redis.execute("INFO", "commandstats")).decode()
    out = {}
    for line in info.splitlines():
        if line.startswith("cmdstat_"):
            name, stats = line[len("cmdstat_") :].split(":", 1)
            out[name] = int(stats.split(",", 1)[0].removeprefix("calls="))
    return out


async def until(redis: RedisConnection, command: str, n: int) -> dict[str, int]:
    """Poll the stats until Redis has run `command` `n` times; returns them then."""
    deadline = time.monotonic() + timeout(10)
    while True:
        seen = await calls(redis)
        if seen.get(command, 0) >= n:
            return seen
        assert time.monotonic() < deadline, f"Redis ran {command} {seen.get(command, 0)} times"
        await asyncio.sleep(0.01)


async def test_polls_read_the_registry_whole_only_when_it_grew_and_recheck_metas_seldom(
    fresh_redis: RedisProcess,
) -> None:
    redis = await RedisConnection.open(fresh_redis.url)
    cfg = replace(server_config(fresh_redis), registry_poll_s=0.01, meta_recheck_s=3600)
    try:
        await redis.execute("SADD", REGISTRY_KEY, T.name)
        async with TickwireServer(cfg) as srv, recorder(srv.url) as c:
            await c.request("subscribe", channels=[T.name])
            await redis.execute("CONFIG", "RESETSTAT")
            # Twenty polls of an unchanged registry: its size each time, nothing more, and no
            # meta read of the followed channel.
            seen = await until(redis, "scard", 20)
            assert seen.get("smembers", 0) == 0 and seen.get("hmget", 0) == 0
            # It grows: read whole once, and the new channel is known.
            new = Channel.parse("trades:NEW-COIN")
            await redis.execute("SADD", REGISTRY_KEY, new.name)
            await eventually(lambda: new in srv.hub.known, "the new channel to be known")
            seen = await until(redis, "scard", seen["scard"] + 20)
            assert seen.get("smembers", 0) == 1 and seen.get("hmget", 0) == 0
        # With a recheck due every 50 ms, the followed channel's meta is read again and again.
        async with (
            TickwireServer(replace(cfg, meta_recheck_s=0.05)) as srv,
            recorder(srv.url) as c,
        ):
            await c.request("subscribe", channels=[T.name])
            await redis.execute("CONFIG", "RESETSTAT")
            await until(redis, "hmget", 3)
    finally:
        redis.close()
