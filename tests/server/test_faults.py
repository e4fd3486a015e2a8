"""Faults survived: Redis paused, the Redis connection black-holed, a reconnect storm."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator

import orjson

from tickwire.core.channels import Channel
from tickwire.core.config import PublisherConfig
from tickwire.core.events import encode_body
from tickwire.core.redis_process import RedisProcess
from tickwire.core.redis_wire import RedisConnection
from tickwire.feeds.publisher import Publisher
from tickwire.server.app import TickwireServer

from .conftest import Recorder, recorder, server_config

T = Channel.parse("trades:BTC-USD")


def trades(start: int, n: int) -> list[bytes]:
    return [
        encode_body(
            "trade", T.symbol, i, 0, {"price": 1.5, "size": 1, "side": "buy", "trade_id": i}
        )
        for i in range(start, start + n)
    ]


async def reach(c: Recorder, seq: int, timeout: float = 20) -> None:
    await c.wait_until(lambda: c.last_seq(T.name) >= seq, timeout)


class Proxy:
    """A TCP proxy that can black-hole traffic (packets vanish, connections stay open)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.blackhole = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [writer, up_w]

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await r.read(65536):
                    if not self.blackhole:
                        w.write(data)
            w.close()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))

    async def close(self) -> None:
        for w in self._writers:
            w.close()
        if self._server is not None:
            self._server.close()


@contextlib.asynccontextmanager
async def proxy_to(redis: RedisProcess) -> AsyncIterator[Proxy]:
    proxy = Proxy(redis.port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


async def http_get(port: int, path: str) -> tuple[int, bytes, float]:
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body, time.monotonic() - t0


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
                    assert status in (200, 503) and took < 0.1, took
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
    async with proxy_to(redis_server) as proxy:
        url = f"redis://127.0.0.1:{proxy.port}/0"
        cfg = server_config(redis_server)
        cfg = dataclasses.replace(cfg, redis_url=url)
        async with (
            TickwireServer(cfg) as srv,
            recorder(srv.url) as c,
            Publisher(PublisherConfig(redis_url=redis_server.url)) as pub,
        ):
            await c.request("subscribe", channels=[T.name])
            for i in range(0, 100, 10):
                await pub.publish({T: trades(i, 10)})
                await pub.flush()
                if c.last_seq(T.name):
                    break
                await asyncio.sleep(0.05)
            await c.wait_until(lambda: c.last_seq(T.name) > 0)
            proxy.blackhole = True
            await pub.publish({T: trades(100, 50)})
            await pub.flush()
            await c.wait_for(lambda m: m == {"type": "status", "redis": "down"}, timeout=15)
            proxy.blackhole = False
            final = pub.positions[T][1]
            await c.wait_until(lambda: c.last_seq(T.name) == final, timeout=15)
            assert c.checker.ok, c.checker.violations
            # Every event arrived once; the replies of the dropped connection went nowhere.
            assert c.checker.duplicates == 0 and c.checker.lost == 0


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
