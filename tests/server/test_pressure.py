"""A client that does not read: what it can make the server hold is bounded, and when it stays
over its limit it is closed at `slow_grace_s`, however often it reads a little."""

from __future__ import annotations

import asyncio
import contextlib
import time

from tests.conftest import eventually, timeout
from tickwire.core.channels import REGISTRY_KEY
from tickwire.core.redis_process import RedisProcess
from tickwire.core.redis_wire import RedisConnection
from tickwire.server.app import TickwireServer
from tickwire.server.connection import WRITE_HIGH

from .conftest import server_config
from .test_abuse import PING, frame, raw_ws

OUTBOX = 64 * 1024


async def test_a_ping_flood_from_a_client_that_never_reads_is_not_buffered_without_bound(
    redis_server: RedisProcess, redis: RedisConnection
) -> None:
    async with (
        TickwireServer(server_config(redis_server, outbox_bytes=OUTBOX)) as srv,
        raw_ws(srv.port, rcvbuf=4096) as ws,
    ):
        (conn,) = srv.connections
        pings = frame(PING, b"p" * 125) * 1000  # 131 KB of pings, each owed a pong

        async def flood() -> None:
            for _ in range(400):  # 52 MB: far more than any buffer on the way holds
                ws.writer.write(pings)
                await ws.writer.drain()

        flooding = asyncio.create_task(flood())
        try:
            # The server stops reading the client once its unsent pongs pass the bound...
            wire = conn.wire
            assert wire.transport is not None
            await eventually(lambda: wire.reading_held, "the server to stop reading", 20)
            bound = OUTBOX + WRITE_HIGH + 256 * 1024  # + the pongs of one read
            assert wire.transport.get_write_buffer_size() <= bound
            # ...and then the flood stalls in the client's own buffers, not the server's.
            await eventually(
                lambda: ws.writer.transport.get_write_buffer_size() > 0, "the client to stall"
            )
            assert wire.transport.get_write_buffer_size() <= bound
            assert not flooding.done()
        finally:
            flooding.cancel()


async def test_a_client_that_stays_over_its_limit_is_closed_at_slow_grace_however_it_reads(
    redis_server: RedisProcess, redis: RedisConnection
) -> None:
    """It reads all that is queued now and then, so each wait for its socket ends; but between
    its reads it asks for more (channel lists of ~340 KB, whose replies are never shed) than
    `outbox_bytes`, so what is queued for it is over the limit all along."""
    names = [f"trades:SYM{i:05d}" for i in range(20_000)]
    await redis.execute("SADD", REGISTRY_KEY, *names)
    cfg = server_config(redis_server, outbox_bytes=OUTBOX, slow_grace_s=1.0)
    async with TickwireServer(cfg) as srv, raw_ws(srv.port, rcvbuf=4096) as ws:
        (conn,) = srv.connections
        t0 = time.monotonic()
        request = 0
        drains = srv.metrics.slow_disconnects
        while not conn.closing:
            assert time.monotonic() - t0 < timeout(8), "not closed while over its limit"
            for _ in range(16):
                request += 1
                ws.writer.write(frame(1, b'{"op":"list","id":%d}' % request))
            await asyncio.sleep(0.4)  # reads nothing for a while...
            end = time.monotonic() + 0.3
            while time.monotonic() < end:  # ...then all it can
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ws.reader.read(1 << 20), 0.02)
        closed_after = time.monotonic() - t0
        assert 1.0 <= closed_after < timeout(4)
        assert srv.metrics.slow_disconnects == drains + 1


async def test_replies_to_a_client_that_never_reads_count_against_its_limit(
    redis_server: RedisProcess, redis: RedisConnection
) -> None:
    """Channel lists (~340 KB each, never shed) asked at the allowed burst by a client that
    reads nothing: the server stops answering once it is over `outbox_bytes`, so its queue
    holds a few replies, not the hundred it was asked for."""
    names = [f"trades:SYM{i:05d}" for i in range(20_000)]
    await redis.execute("SADD", REGISTRY_KEY, *names)
    cfg = server_config(redis_server, outbox_bytes=OUTBOX, slow_grace_s=3.0)
    async with TickwireServer(cfg) as srv, raw_ws(srv.port, rcvbuf=4096) as ws:
        (conn,) = srv.connections
        reply_size = 20_000 * len('"trades:SYM00000",')
        ws.writer.write(b"".join(frame(1, b'{"op":"list","id":%d}' % i) for i in range(100)))
        most = 0
        while not conn.closing:
            most = max(most, conn.outbox.nbytes)
            await asyncio.sleep(0.005)
        assert most <= OUTBOX + 4 * reply_size, (most, reply_size)
        assert srv.metrics.slow_disconnects == 1
