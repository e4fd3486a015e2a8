"""Faults survived: Redis paused, the Redis connection black-holed, a reconnect storm."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson

from tests.conftest import eventually, timeout
from tickwire.bench.proxy import Proxy
from tickwire.core.channels import REGISTRY_KEY, Channel
from tickwire.core.config import PublisherConfig, ServerConfig
from tickwire.core.events import encode_body
from tickwire.core.redis_process import RedisProcess
from tickwire.core.redis_wire import RedisConnection
from tickwire.feeds.publisher import Publisher
from tickwire.server.app import TickwireServer

from .conftest import Recorder, http_get, recorder, server_config

T = Channel.parse("trades:BTC-USD")
E = Channel.parse("trades:ETH-USD")
Maker = Callable[[int, int], list[bytes]]


def trades_of(channel: Channel, start: int, n: int) -> list[bytes]:
    """Trades whose `trade_id` is their index: the i-th event published gets seq i + 1."""
    return [
        encode_body(
            "trade", channel.symbol, i, 0, {"price": 1.5, "size": 1, "side": "buy", "trade_id": i}
        )
        for i in range(start, start + n)
    ]


def trades(start: int, n: int) -> list[bytes]:
    return trades_of(T, start, n)


def eth(start: int, n: int) -> list[bytes]:
    return trades_of(E, start, n)


def assert_own_events(c: Recorder, channel: Channel, first: int, last: int) -> None:
    """Exactly seqs first..last of `channel`, each carrying its own content (a reply read for
    another request would show as a wrong symbol or trade id)."""
    events = c.events(channel.name)
    assert [e["seq"] for e in events] == list(range(first, last + 1))
    assert all(e["sym"] == channel.symbol and e["trade_id"] == e["seq"] - 1 for e in events)


async def reach(c: Recorder, seq: int, timeout: float = 20) -> None:
    await c.wait_until(lambda: c.last_seq(T.name) >= seq, timeout)


def through(proxy: Proxy, redis: RedisProcess) -> ServerConfig:
    """The test server's config with its Redis connections going through `proxy`, finding a
    link that stopped answering after 1.5 s (the proxy delays by 0.2 s at most)."""
    return dataclasses.replace(
        server_config(redis),
        redis_url=f"redis://127.0.0.1:{proxy.port}/0",
        redis_reply_timeout_s=1.5,
    )


@contextlib.asynccontextmanager
async def proxied(
    redis_server: RedisProcess,
) -> AsyncIterator[tuple[Proxy, TickwireServer, Recorder, Publisher]]:
    """A server whose Redis connections go through a proxy, a client of it, and a publisher
    straight to Redis."""
    async with (
        Proxy(redis_server.port) as proxy,
        TickwireServer(through(proxy, redis_server)) as srv,
        recorder(srv.url) as c,
        Publisher(PublisherConfig(redis_url=redis_server.url)) as pub,
    ):
        yield proxy, srv, c, pub


async def first_events(pub: Publisher, c: Recorder, channel: Channel, make: Maker) -> int:
    """Publish small batches until the client has events of `channel`; the next index to use."""
    i = 0
    while not c.last_seq(channel.name):
        await pub.publish({channel: make(i, 10)})
        await pub.flush()
        i += 10
        with contextlib.suppress(TimeoutError):
            await c.wait_until(lambda: c.last_seq(channel.name) > 0, timeout=0.2)
    return i


async def test_redis_paused_health_and_pings_answer_and_reading_resumes(
    fresh_redis: RedisProcess,
) -> None:
    async with TickwireServer(server_config(fresh_redis)) as srv, recorder(srv.url) as c:
        pub = Publisher(PublisherConfig(redis_url=fresh_redis.url))
        await pub.start()
        try:
            await c.request("subscribe", channels=[T.name])
            await pub.publish({T: trades(0, 10)})
            await c.wait_until(lambda: c.last_seq(T.name) == 10)
            fresh_redis.pause()
            try:
                await pub.publish({T: trades(10, 10)})  # queued in the publisher meanwhile
                for _ in range(10):
                    status, body, took = await http_get(srv.port, "/healthz")
                    # Answered without waiting on Redis, whose timeouts are seconds (0.1 s was
                    # a speed figure a busy machine could miss).
                    assert status in (200, 503) and took < timeout(1.0), took
                    assert orjson.loads(body)["connections"] == 1
                    assert (await c.request("ping"))["type"] == "pong"
                    await asyncio.sleep(0.2)
            finally:
                fresh_redis.resume()
            await c.wait_until(lambda: c.last_seq(T.name) == 20, timeout=15)
            assert c.checker.ok and c.checker.delivered == 20
        finally:
            await pub.close()


async def test_blackholed_redis_connection_recovers_without_crossed_replies(
    redis_server: RedisProcess, redis: RedisConnection
) -> None:
    async with proxied(redis_server) as (proxy, _, c, pub):
        await c.request("subscribe", channels=[T.name])
        for i in range(0, 100, 10):
            await pub.publish({T: trades(i, 10)})
            await pub.flush()
            if c.last_seq(T.name):
                break
            await asyncio.sleep(0.05)
        await c.wait_until(lambda: c.last_seq(T.name) > 0)
        proxy.blackhole()
        await pub.publish({T: trades(100, 50)})
        await pub.flush()
        await c.wait_for(lambda m: m == {"type": "status", "redis": "down"}, timeout=15)
        proxy.pass_through()
        final = pub.positions[T][1]
        await c.wait_until(lambda: c.last_seq(T.name) == final, timeout=15)
        assert c.checker.ok, c.checker.violations
        # Every event arrived once; the replies of the dropped connection went nowhere.
        assert c.checker.duplicates == 0 and c.checker.lost == 0


async def test_a_redis_link_that_stops_answering_is_announced_though_a_new_one_works(
    redis_server: RedisProcess, redis: RedisConnection
) -> None:
    # The server's connections go silent (their state lost in a middlebox) while Redis is
    # fine and new connections get through: the reader finds out by a timeout, seconds
    # after the last event came. Reconnecting unannounced would hide that stall from clients.
    async with proxied(redis_server) as (proxy, _, c, pub):
        await c.request("subscribe", channels=[T.name])
        i = await first_events(pub, c, T, trades)
        proxy.blackhole(existing_only=True)
        await pub.publish({T: trades(i, 50)})  # stored, and pushed into the black hole
        await pub.flush()
        down = await c.wait_for(lambda m: m == {"type": "status", "redis": "down"}, 20)
        await c.wait_for(
            lambda m: m == {"type": "status", "redis": "up"}, 15, start=c.messages.index(down)
        )
        await pub.publish({T: trades(i + 50, 20)})
        await pub.flush()
        final = pub.positions[T][1]
        await c.wait_until(lambda: c.last_seq(T.name) == final, timeout=15)
        assert c.checker.ok, c.checker.violations
        assert c.checker.duplicates == 0 and c.checker.lost == 0
        assert_own_events(c, T, c.events(T.name)[0]["seq"], final)


async def test_reconnect_storm_a_third_of_clients_resume_without_loss(
    redis_server: RedisProcess, redis: RedisConnection
) -> None:
    n_clients, n_drop = 60, 20
    stop = asyncio.Event()
    async with (
        TickwireServer(server_config(redis_server)) as srv,
        Publisher(PublisherConfig(redis_url=redis_server.url)) as pub,
    ):
        await pub.publish({T: trades(0, 1)})
        await pub.flush()

        async def flow() -> None:
            i = 1
            while not stop.is_set():
                await pub.publish({T: trades(i, 20)})
                i += 20
                await asyncio.sleep(0.005)

        managers = [recorder(srv.url) for _ in range(n_clients)]
        clients: list[Recorder] = [await m.__aenter__() for m in managers]
        for c in clients:
            await c.request("subscribe", channels=[T.name], snapshot=True)
        feeder = asyncio.create_task(flow())
        await asyncio.gather(*(reach(c, 51) for c in clients))
        # A third drop at once, then come back resuming from what each had.
        positions = []
        for m in managers[:n_drop]:
            rec = clients[managers.index(m)]
            positions.append(
                {"epoch": rec.events(T.name)[-1]["epoch"], "seq": rec.last_seq(T.name)}
            )
            await m.__aexit__(None, None, None)
        back = [recorder(srv.url) for _ in range(n_drop)]
        resumed = [await m.__aenter__() for m in back]
        for rec, pos in zip(resumed, positions, strict=True):
            rec.checker.expect_from(T.name, pos["epoch"], pos["seq"])
            await rec.request("subscribe", channels=[T.name], resume={T.name: pos})
        stop.set()
        await feeder
        await pub.flush()
        final = pub.positions[T][1]
        everyone = clients[n_drop:] + resumed
        await asyncio.gather(*(reach(c, final) for c in everyone))
        for c in everyone:
            assert c.checker.ok, c.checker.violations
        for rec, pos in zip(resumed, positions, strict=True):
            assert [e["seq"] for e in rec.events(T.name)] == list(range(pos["seq"] + 1, final + 1))
        for m in managers[n_drop:] + back:
            await m.__aexit__(None, None, None)


async def test_delayed_redis_connections_deliver_every_event_once_in_order(
    redis_server: RedisProcess, redis: RedisConnection
) -> None:
    async with Proxy(redis_server.port) as proxy:
        # 50-200 ms each way on every Redis connection: the server's and the publisher's.
        proxy.delay(0.05, jitter_s=0.15)
        url = f"redis://127.0.0.1:{proxy.port}/0"
        async with (
            TickwireServer(through(proxy, redis_server)) as srv,
            recorder(srv.url) as c,
            Publisher(PublisherConfig(redis_url=url)) as pub,
        ):
            await c.request("subscribe", channels=[T.name, E.name])
            i = await first_events(pub, c, T, trades)
            j = await first_events(pub, c, E, eth)
            for _ in range(20):
                await pub.publish({T: trades(i, 7), E: eth(j, 5)})
                i, j = i + 7, j + 5
            await pub.flush()
            await c.wait_until(
                lambda: c.last_seq(T.name) == i and c.last_seq(E.name) == j, timeout=30
            )
            assert c.checker.ok, c.checker.violations
            assert c.checker.duplicates == 0 and c.checker.lost == 0
            assert_own_events(c, T, c.events(T.name)[0]["seq"], i)
            assert_own_events(c, E, c.events(E.name)[0]["seq"], j)
            assert proxy.stats.bytes_forwarded > 0 and proxy.stats.resets == 0


async def test_reset_redis_connections_status_down_up_and_no_reply_crosses_requests(
    redis_server: RedisProcess, redis: RedisConnection
) -> None:
    # On uvloop (what `tickwire serve` runs on) a write to a connection the peer has reset
    # raises RuntimeError instead of being dropped: nothing may escape to the loop either.
    errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, ctx: errors.append(ctx))
    await reset_mid_stream(redis_server)
    assert not errors, f"event loop reported unhandled errors: {errors}"


async def reset_mid_stream(redis_server: RedisProcess) -> None:
    async with proxied(redis_server) as (proxy, srv, c, pub):
        await c.request("subscribe", channels=[T.name, E.name])
        i = await first_events(pub, c, T, trades)
        j = await first_events(pub, c, E, eth)
        # Mid-stream: every Redis connection of the server is reset, and so are its
        # reconnection attempts until the proxy lets them through again.
        assert proxy.reset(refuse_new=True) >= 2  # the reader's and the control connection
        down = await c.wait_for(lambda m: m == {"type": "status", "redis": "down"}, 15)
        await pub.publish({T: trades(i, 50), E: eth(j, 30)})
        await pub.flush()
        i, j = i + 50, j + 30
        async with asyncio.timeout(15):
            await proxy.wait_until(lambda s: s.refused >= 2)
        proxy.pass_through()
        await c.wait_for(
            lambda m: m == {"type": "status", "redis": "up"},
            15,
            start=c.messages.index(down),
        )
        await c.wait_until(lambda: c.last_seq(T.name) == i and c.last_seq(E.name) == j, timeout=15)
        # History reads on the new control connection: a resume and the channel list.
        epoch = c.events(T.name)[-1]["epoch"]
        async with recorder(srv.url) as late:
            late.checker.expect_from(T.name, epoch, 3)
            await late.request(
                "subscribe", channels=[T.name], resume={T.name: {"epoch": epoch, "seq": 3}}
            )
            listed = await late.request("list")
            await late.wait_until(lambda: late.last_seq(T.name) == i)
            assert late.checker.ok, late.checker.violations
            assert_own_events(late, T, 4, i)
        assert listed["type"] == "channels" and set(listed["channels"]) >= {T.name, E.name}
        assert c.checker.ok, c.checker.violations
        assert c.checker.duplicates == 0 and c.checker.lost == 0
        assert_own_events(c, T, c.events(T.name)[0]["seq"], i)
        assert_own_events(c, E, c.events(E.name)[0]["seq"], j)


@contextlib.asynccontextmanager
async def following_ten(
    redis: RedisProcess,
) -> AsyncIterator[tuple[TickwireServer, Recorder, Publisher]]:
    """A server, a client of it on `T` and a publisher, the first 10 events delivered."""
    async with (
        TickwireServer(server_config(redis)) as srv,
        recorder(srv.url) as c,
        Publisher(PublisherConfig(redis_url=redis.url)) as pub,
    ):
        await c.request("subscribe", channels=[T.name])
        await pub.publish({T: trades(0, 10)})
        await reach(c, 10)
        yield srv, c, pub


async def test_a_registry_someone_overwrote_stops_reading_only_until_it_is_mended(
    fresh_redis: RedisProcess,
) -> None:
    """An error reply to the registry's read (here WRONGTYPE; CLUSTERDOWN during a failover)
    is Redis refusing for now, not a crash of the reader: it backs off, clients are told, and
    it goes on once Redis answers again."""
    conn = await RedisConnection.open(fresh_redis.url)
    async with following_ten(fresh_redis) as (srv, c, pub):
        await conn.execute("RENAME", REGISTRY_KEY, "saved")
        await conn.execute("SET", REGISTRY_KEY, "someone else's")
        # The reader's subscription dropped: it reconnects and reads the registry again.
        await conn.execute("CLIENT", "KILL", "TYPE", "pubsub")
        await c.wait_for(lambda m: m.get("type") == "status" and m["redis"] == "down")
        await conn.execute("RENAME", "saved", REGISTRY_KEY)
        await pub.publish({T: trades(10, 10)})
        await reach(c, 20)
        assert_own_events(c, T, 1, 20)
        assert c.checker.ok
        assert any(m.get("redis") == "up" for m in c.of_type("status"))
        assert not srv._tasks[0].done()
    conn.close()


async def test_a_reader_that_fails_unexpectedly_starts_again_and_loses_nothing(
    redis_server: RedisProcess, redis: RedisConnection
) -> None:
    async with following_ten(redis_server) as (srv, c, pub):
        # A stand-in for a bug in the reader: its next push fails to parse, once.
        follower = srv.reader.follower
        take = follower.take_pushes

        def fail_once(messages: list[Any]) -> Any:
            follower.take_pushes = take  # type: ignore[method-assign]
            raise TypeError("a bug")

        follower.take_pushes = fail_once  # type: ignore[method-assign]
        await pub.publish({T: trades(10, 10)})
        await pub.publish({T: trades(20, 10)})
        await reach(c, 30)
        assert_own_events(c, T, 1, 30)
        assert c.checker.ok
        assert follower.take_pushes == take
        assert not srv._tasks[0].done()


async def test_a_connection_whose_delivery_raises_is_closed_and_the_others_get_every_event(
    redis_server: RedisProcess, redis: RedisConnection
) -> None:
    async with following_ten(redis_server) as (srv, c, pub), recorder(srv.url) as d:
        await d.request("subscribe", channels=[T.name])
        # A stand-in for a bug in one connection's writing: its next write raises.
        bad = next(iter(srv.connections))

        def broken(message: bytes, frame: bytes) -> bool:
            raise TypeError("a bug")

        def broken_flush() -> None:
            raise TypeError("a bug")

        bad.sub.write_now, bad.sub.flush = broken, broken_flush
        await pub.publish({T: trades(10, 10)})
        await eventually(lambda: c.closed is not None or d.closed is not None, "one closed")
        closed, good = (c, d) if c.closed is not None else (d, c)
        assert closed.closed is not None and closed.closed[0] == 1011
        await pub.publish({T: trades(20, 10)})
        await reach(good, 30)
        assert_own_events(good, T, good.events(T.name)[0]["seq"], 30)
        # The reader went on: no restart, no status told.
        assert good.checker.ok and good.of_type("status") == [] and good.closed is None
        assert not srv._tasks[0].done()


async def test_a_catch_up_that_fails_unexpectedly_closes_its_connection_only(
    redis_server: RedisProcess, redis: RedisConnection
) -> None:
    """Its subscribe would never be acknowledged: the client is told by the close (1011), and
    reconnects; the others go on."""
    async with following_ten(redis_server) as (srv, c, pub), recorder(srv.url) as d:
        history = srv.history
        read = history.range

        async def fail_once(*args: Any, **kwargs: Any) -> Any:
            history.range = read  # type: ignore[method-assign]
            raise TypeError("a bug")

        history.range = fail_once  # type: ignore[method-assign]
        await d.ws.send(
            orjson.dumps({"op": "subscribe", "id": 1, "channels": [T.name], "snapshot": True})
        )
        await d.wait_until(lambda: d.closed is not None)
        assert d.closed is not None and d.closed[0] == 1011
        await pub.publish({T: trades(10, 10)})
        await reach(c, 20)
        assert_own_events(c, T, 1, 20)
        assert c.checker.ok and c.closed is None and c.of_type("status") == []
        async with recorder(srv.url) as again:
            ack = await again.request("subscribe", channels=[T.name], snapshot=True)
            assert ack["type"] == "subscribed"
            await again.wait_until(lambda: again.last_seq(T.name) == 20)
