"""The client against the real server, real Redis and real sockets, with a TCP proxy in between
that cuts connections (as a network would) or refuses them (as a dead server would)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tickwire.clients import (
    Backoff,
    Disconnected,
    EventBatch,
    Feed,
    Gap,
    Received,
    Reconnected,
    Reset,
    connect,
)
from tickwire.core.channels import Channel
from tickwire.core.config import Limits, PublisherConfig, ServerConfig
from tickwire.core.events import Quote, Trade, encode_body
from tickwire.core.redis_process import RedisProcess
from tickwire.core.redis_wire import RedisConnection
from tickwire.feeds.publisher import Publisher
from tickwire.server.app import TickwireServer

TIMEOUT_FACTOR = float(os.environ.get("TICKWIRE_TIMEOUT_FACTOR", "1"))
AAA = Channel.parse("trades:AAA")
BBB = Channel.parse("trades:BBB")
QQQ = Channel.parse("quotes:QQQ")


def timeout(seconds: float) -> float:
    return seconds * TIMEOUT_FACTOR


# --- helpers -----------------------------------------------------------------------------------


class TcpProxy:
    """Forwards TCP to the server's port; can cut every live connection, or refuse new ones."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.refuse = False
        self.accepted: list[float] = []  # monotonic time of every accepted connection
        self._pipes: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._changed = asyncio.Condition()
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def __aenter__(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted.append(time.monotonic())
        if self.refuse:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer, up_writer)
        async with self._changed:
            self._pipes.add(pair)
            self._changed.notify_all()
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer)),
            asyncio.create_task(self._pump(up_reader, writer)),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._pipes.discard(pair)
            writer.transport.abort()
            up_writer.transport.abort()

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()

    def cut(self) -> int:
        """Abort every live connection, both ways, with no close handshake; returns how many."""
        pipes = list(self._pipes)
        for a, b in pipes:
            a.transport.abort()
            b.transport.abort()
        self._pipes.clear()
        return len(pipes)

    async def wait_connected(self, timeout_s: float = 10.0) -> None:
        async with asyncio.timeout(timeout(timeout_s)), self._changed:
            await self._changed.wait_for(lambda: bool(self._pipes))


class Collector:
    """Reads a feed in the background and keeps what it delivered, per channel."""

    def __init__(self, feed: Feed) -> None:
        self.feed = feed
        self.seqs: dict[str, list[tuple[str, int]]] = {}
        self.gaps: list[Gap] = []
        self.resets: list[Reset] = []
        self.notices: list[Any] = []
        self._changed = asyncio.Condition()
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for batch in self.feed.batches():
            async with self._changed:
                if isinstance(batch, Gap):
                    self.gaps.append(batch)
                elif isinstance(batch, Reset):
                    self.resets.append(batch)
                elif isinstance(batch, Disconnected | Reconnected):
                    self.notices.append(batch)
                elif isinstance(batch, EventBatch):
                    for item in batch:
                        self.seqs.setdefault(item.channel, []).append((item.epoch, item.seq))
                self._changed.notify_all()

    def last(self, channel: Channel) -> int:
        got = self.seqs.get(channel.name)
        return got[-1][1] if got else 0

    def only_seqs(self, channel: Channel) -> list[int]:
        return [s for _, s in self.seqs.get(channel.name, [])]

    async def wait(self, cond: Callable[[], bool], timeout_s: float = 20.0) -> None:
        async with asyncio.timeout(timeout(timeout_s)), self._changed:
            await self._changed.wait_for(cond)

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def server_config(redis: RedisProcess, port: int = 0) -> ServerConfig:
    return ServerConfig(
        redis_url=redis.url,
        port=port,
        registry_poll_s=0.05,
        meta_recheck_s=0.05,
        heartbeat_ms=300,
        # Big enough that the server never sheds for this client: any gap would be a bug.
        limits=Limits(outbox_bytes=256 * 1024 * 1024, slow_grace_s=60.0),
    )


@contextlib.asynccontextmanager
async def publisher(redis: RedisProcess) -> AsyncIterator[Publisher]:
    async with Publisher(PublisherConfig(redis_url=redis.url)) as pub:
        yield pub


def bodies(channel: Channel, start: int, n: int) -> list[bytes]:
    now = time.time_ns()
    if channel.kind == "quotes":
        return [
            encode_body(
                "quote",
                channel.symbol,
                now,
                now,
                {"bid": 100.0 + i % 7, "bid_size": 1.0, "ask": 101.0 + i % 7, "ask_size": 2.0},
            )
            for i in range(start, start + n)
        ]
    return [
        encode_body(
            "trade",
            channel.symbol,
            now,
            now,
            {"price": 10.5, "size": 1.0, "side": "buy", "trade_id": i},
        )
        for i in range(start, start + n)
    ]


async def publish(pub: Publisher, channel: Channel, n: int, start: int = 0) -> None:
    await pub.publish({channel: bodies(channel, start, n)})
    await pub.flush()


async def wait_known(feed: Feed, channels: list[Channel]) -> None:
    """Until the server has seen these channels in Redis (it polls its registry)."""
    names = {c.name for c in channels}
    async with asyncio.timeout(timeout(10)):
        while True:
            if names <= set(await feed.list_channels()):
                return
            await asyncio.sleep(0.02)  # the server polls its registry; ask again


def fast_backoff(**extra: Any) -> dict[str, Any]:
    return {"backoff_initial_s": 0.01, "backoff_max_s": 0.1, "rng": random.Random(1), **extra}


# --- tests -------------------------------------------------------------------------------------


async def test_exactly_once_in_order_across_twenty_forced_disconnects(
    redis_server: RedisProcess, redis: RedisConnection
) -> None:
    rng = random.Random(20251127)
    channels = [AAA, BBB, QQQ]
    async with (
        TickwireServer(server_config(redis_server)) as srv,
        TcpProxy(srv.port) as proxy,
        publisher(redis_server) as pub,
        connect(proxy.url, **fast_backoff()) as feed,
    ):
        for ch in channels:
            await publish(pub, ch, 1)
        await wait_known(feed, channels)
        got = Collector(feed)
        # A wildcard (resumed by naming the channels seen under it) and a concrete channel.
        await feed.subscribe("trades:*", QQQ.name, snapshot=True)
        await got.wait(lambda: all(got.last(ch) == 1 for ch in channels))  # the snapshots

        chaos_over = asyncio.Event()

        async def produce() -> int:
            sent = 1  # published per channel so far
            while not chaos_over.is_set():
                await pub.publish({ch: bodies(ch, sent, 25) for ch in channels})
                sent += 25
                await asyncio.sleep(0.002)  # pacing: some 10-30 k events/s in all
            # And a tail after the last cut, so the end needs the last reconnection too.
            await pub.publish({ch: bodies(ch, sent, 25) for ch in channels})
            await pub.flush()
            return sent + 25  # events per channel in all

        producer = asyncio.create_task(produce())
        cuts = 0
        while cuts < 24:
            await proxy.wait_connected()
            await asyncio.sleep(rng.uniform(0.005, 0.08))  # a random point in the stream
            cuts += proxy.cut() > 0
        chaos_over.set()
        per_channel = await producer
        await got.wait(lambda: all(got.last(ch) == per_channel for ch in channels), 60)
        await got.stop()

        for ch in channels:
            assert got.only_seqs(ch) == list(range(1, per_channel + 1)), ch
            assert len({e for e, _ in got.seqs[ch.name]}) == 1
        assert got.gaps == [] and got.resets == []
        assert feed.stats.connects >= 25
        assert sum(isinstance(n, Reconnected) for n in got.notices) >= 20
        assert set(feed.positions) == {c.name for c in channels}


async def test_resume_after_server_restart(
    redis_server: RedisProcess, redis: RedisConnection
) -> None:
    async with publisher(redis_server) as pub:
        await publish(pub, AAA, 1)
        first = TickwireServer(server_config(redis_server))
        await first.start()
        async with TcpProxy(first.port) as proxy, connect(proxy.url, **fast_backoff()) as feed:
            got = Collector(feed)
            await feed.subscribe(AAA.name, snapshot=True)
            await publish(pub, AAA, 99, 1)
            await got.wait(lambda: got.last(AAA) == 100)

            await first.close()  # clients get 1001, then nothing listens
            await got.wait(lambda: any(isinstance(n, Disconnected) for n in got.notices))
            assert got.notices[0] == Disconnected(
                "server closed the connection: 1001 server shutting down",
                got.notices[0].retry_in_s,
                1,
            )
            await publish(pub, AAA, 100, 100)  # while no server runs

            async with TickwireServer(server_config(redis_server)) as second:
                proxy.target_port = second.port
                await got.wait(lambda: got.last(AAA) == 200)
                await publish(pub, AAA, 50, 200)
                await got.wait(lambda: got.last(AAA) == 250)
            await got.stop()
    assert got.only_seqs(AAA) == list(range(1, 251))
    assert got.gaps == [] and got.resets == []
    assert any(isinstance(n, Reconnected) for n in got.notices)


async def test_gap_is_surfaced_when_history_was_trimmed_while_away(
    redis_server: RedisProcess, redis: RedisConnection
) -> None:
    async with (
        TickwireServer(server_config(redis_server)) as srv,
        TcpProxy(srv.port) as proxy,
        publisher(redis_server) as pub,
        connect(proxy.url, **fast_backoff()) as feed,
    ):
        await publish(pub, AAA, 1)
        await wait_known(feed, [AAA])
        got = Collector(feed)
        await feed.subscribe(AAA.name, snapshot=True)
        await publish(pub, AAA, 49, 1)
        await got.wait(lambda: got.last(AAA) == 50)

        proxy.refuse = True
        assert proxy.cut() == 1
        await publish(pub, AAA, 150, 50)  # seqs 51..200
        await redis.execute("XTRIM", AAA.stream_key, "MAXLEN", "20")  # keep 181..200
        proxy.refuse = False

        await got.wait(lambda: got.last(AAA) == 200)
        await got.stop()
    assert got.gaps == [Gap(AAA.name, 51, 180, "trimmed")]
    assert got.only_seqs(AAA) == [*range(1, 51), *range(181, 201)]
    assert got.resets == []


async def test_reset_when_the_stream_was_recreated_while_away(
    redis_server: RedisProcess, redis: RedisConnection
) -> None:
    async with (
        TickwireServer(server_config(redis_server)) as srv,
        TcpProxy(srv.port) as proxy,
        publisher(redis_server) as pub,
        connect(proxy.url, **fast_backoff()) as feed,
    ):
        await publish(pub, AAA, 1)
        await wait_known(feed, [AAA])
        got = Collector(feed)
        await feed.subscribe(AAA.name, snapshot=True)
        await publish(pub, AAA, 29, 1)
        await got.wait(lambda: got.last(AAA) == 30)
        old_epoch = pub.positions[AAA][0]

        proxy.refuse = True
        proxy.cut()
        await redis.execute("DEL", AAA.stream_key)
        await publish(pub, AAA, 10, 1000)  # a new epoch, seqs 1..10
        new_epoch = pub.positions[AAA][0]
        assert new_epoch != old_epoch
        proxy.refuse = False

        await got.wait(lambda: got.seqs[AAA.name][-1] == (new_epoch, 10))
        await got.stop()
    assert got.resets == [Reset(AAA.name, new_epoch)]
    assert got.seqs[AAA.name] == [
        *((old_epoch, s) for s in range(1, 31)),
        *((new_epoch, s) for s in range(1, 11)),
    ]
    assert got.gaps == []
    assert feed.positions[AAA.name].epoch == new_epoch


async def test_reset_when_the_stream_is_recreated_while_connected(
    redis_server: RedisProcess, redis: RedisConnection
) -> None:
    async with (
        TickwireServer(server_config(redis_server)) as srv,
        publisher(redis_server) as pub,
        connect(srv.url) as feed,
    ):
        await publish(pub, AAA, 1)
        await wait_known(feed, [AAA])
        got = Collector(feed)
        await feed.subscribe(AAA.name, snapshot=True)
        await publish(pub, AAA, 9, 1)
        await got.wait(lambda: got.last(AAA) == 10)
        await redis.execute("DEL", AAA.stream_key)
        await publish(pub, AAA, 5, 100)
        new_epoch = pub.positions[AAA][0]
        await got.wait(lambda: got.seqs[AAA.name][-1] == (new_epoch, 5))
        await got.stop()
    assert got.resets == [Reset(AAA.name, new_epoch)]
    assert got.only_seqs(AAA) == [*range(1, 11), *range(1, 6)]
    assert got.gaps == []


async def test_backoff_does_not_hammer_a_dead_server(
    redis_server: RedisProcess, redis: RedisConnection
) -> None:
    initial, cap, window = 0.02, 0.32, 2.0
    async with (
        TickwireServer(server_config(redis_server)) as srv,
        TcpProxy(srv.port) as proxy,
        publisher(redis_server) as pub,
        connect(
            proxy.url, backoff_initial_s=initial, backoff_max_s=cap, rng=random.Random(3)
        ) as feed,
    ):
        await publish(pub, AAA, 1)
        await wait_known(feed, [AAA])
        got = Collector(feed)
        await feed.subscribe(AAA.name, snapshot=True)
        await got.wait(lambda: got.last(AAA) == 1)

        proxy.refuse = True  # every attempt is accepted and dropped at once, and counted
        proxy.cut()
        down_at = time.monotonic()
        await asyncio.sleep(window)  # the interval being measured, not a synchronisation
        attempts = [t for t in proxy.accepted if t >= down_at]

        # The same jitter sequence tells how many attempts at most fit in the window.
        model = Backoff(initial, cap, 2.0, random.Random(3))
        elapsed, allowed = 0.0, 0
        while elapsed <= window:
            elapsed += model.next_delay()
            allowed += 1
        assert 3 <= len(attempts) <= allowed
        spacing = [b - a for a, b in itertools.pairwise(attempts)]
        assert max(spacing) > initial  # it backs off rather than retrying at a fixed pace

        # And it has not given up: the server is back, so is the feed.
        proxy.refuse = False
        await publish(pub, AAA, 5, 1)
        await got.wait(lambda: got.last(AAA) == 6)
        await got.stop()
    assert got.only_seqs(AAA) == list(range(1, 7))


async def test_quiet_feed_is_kept_alive_by_heartbeats_that_match_what_was_delivered(
    redis_server: RedisProcess, redis: RedisConnection
) -> None:
    async with (
        TickwireServer(server_config(redis_server)) as srv,  # heartbeat every 300 ms when idle
        publisher(redis_server) as pub,
        connect(srv.url) as feed,
    ):
        await publish(pub, AAA, 1)
        await wait_known(feed, [AAA])
        got = Collector(feed)
        await feed.subscribe(AAA.name, snapshot=True)
        await publish(pub, AAA, 4, 1)
        await got.wait(lambda: got.last(AAA) == 5)
        # Quiet for more than the client's idle limit (3 heartbeat intervals = 0.9 s).
        await asyncio.sleep(1.5)  # the interval being observed, not a synchronisation
        assert feed.stats.heartbeats >= 2
        assert feed.stats.connects == 1  # heartbeats count as life
        assert feed.stats.resumes_asked == 0  # and their `last` agrees with what we got
        await got.stop()


@pytest.mark.parametrize("token", [None, "t0ken"])
async def test_ping_list_and_latency_against_the_real_server(
    redis_server: RedisProcess, redis: RedisConnection, token: str | None
) -> None:
    async with (
        TickwireServer(server_config(redis_server)) as srv,
        publisher(redis_server) as pub,
        connect(srv.url, token) as feed,
    ):
        assert feed.welcome is not None and feed.welcome.protocol == 1
        assert 0 < await feed.ping() < timeout(5)
        await publish(pub, BBB, 3)
        await wait_known(feed, [BBB])
        await feed.subscribe(BBB.name, snapshot=True)
        await publish(pub, BBB, 2, 3)
        items: list[Received] = []
        async with asyncio.timeout(timeout(10)):
            async for msg in feed:
                if isinstance(msg, Received):
                    items.append(msg)
                    if msg.seq == 5:
                        break
    assert [i.seq for i in items] == [3, 4, 5]  # snapshot (latest), then live
    assert all(0 < i.latency_ns < 10 * 10**9 for i in items)


async def test_projected_subscription_keeps_its_fields_across_a_reconnect(
    redis_server: RedisProcess, redis: RedisConnection
) -> None:
    async with (
        TickwireServer(server_config(redis_server)) as srv,
        TcpProxy(srv.port) as proxy,
        publisher(redis_server) as pub,
        connect(proxy.url, **fast_backoff()) as feed,
    ):
        await publish(pub, QQQ, 5)
        await publish(pub, AAA, 5)
        await wait_known(feed, [QQQ, AAA])
        quotes: list[Quote] = []
        trades: list[Trade] = []
        changed = asyncio.Condition()

        async def read() -> None:
            async for batch in feed.batches():
                if isinstance(batch, EventBatch):
                    async with changed:
                        for item in batch:
                            event = item.event
                            if isinstance(event, Quote):
                                quotes.append(event)
                            elif isinstance(event, Trade):
                                trades.append(event)
                        changed.notify_all()

        async def until(cond: Callable[[], bool]) -> None:
            async with asyncio.timeout(timeout(20)), changed:
                await changed.wait_for(cond)

        reader = asyncio.create_task(read())
        await feed.subscribe("quotes:*", fields=["bid", "ask"], snapshot=True)
        await feed.subscribe(AAA.name, snapshot=True)
        await until(lambda: bool(quotes) and bool(trades))
        assert proxy.cut() == 1
        await publish(pub, QQQ, 10, 5)
        await publish(pub, AAA, 10, 5)
        await until(lambda: quotes[-1].seq == 15 and trades[-1].seq == 15)
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
    assert [q.seq for q in quotes] == list(range(5, 16))
    assert all(q.bid is not None and q.ask is not None for q in quotes)
    assert all(q.bid_size is None and q.ask_size is None for q in quotes)
    assert all(t.price == 10.5 and t.side == "buy" for t in trades)  # trades whole


async def test_throttled_subscription_skips_without_gaps_and_keeps_its_rate_across_a_reconnect(
    redis_server: RedisProcess, redis: RedisConnection
) -> None:
    async with (
        TickwireServer(server_config(redis_server)) as srv,
        TcpProxy(srv.port) as proxy,
        publisher(redis_server) as pub,
        connect(proxy.url, **fast_backoff()) as feed,
    ):
        await publish(pub, QQQ, 5)
        await publish(pub, AAA, 5)
        await wait_known(feed, [QQQ, AAA])
        got = Collector(feed)
        skipped: list[int] = []
        await feed.subscribe("quotes:*", "trades:*", max_hz=5, snapshot=True)
        await got.wait(lambda: got.last(QQQ) == 5 and got.last(AAA) == 5)
        # Quotes far faster than 5 a second, across a cut connection.
        for i in range(30):
            await publish(pub, QQQ, 10, 5 + 10 * i)
            await publish(pub, AAA, 2, 5 + 2 * i)
            if i == 15:
                assert proxy.cut() == 1
            await asyncio.sleep(0.01)  # the feed's pace
        await got.wait(lambda: got.last(QQQ) == 305 and got.last(AAA) == 65)
        await got.stop()
        skipped.append(feed.session.stats.skipped)
    quotes = got.only_seqs(QQQ)
    # The latest state at the end, every seq either delivered or skipped, nothing announced.
    assert quotes[-1] == 305 and len(quotes) < 100
    assert got.gaps == [] and got.resets == []
    assert quotes[0] == 5  # the snapshot: the latest when subscribing, nothing owed before it
    assert skipped[0] + len(quotes) == 305 - 4
    # Every trade, once, in order.
    assert got.only_seqs(AAA) == list(range(5, 66))
    assert any(isinstance(n, Reconnected) for n in got.notices)
