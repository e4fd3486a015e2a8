"""A closed connection is freed by reference counting alone, whatever it did: the server freezes
its long-lived objects out of the cyclic GC's sight, so a reference cycle left behind would be a
leak for the process's life."""

from __future__ import annotations

import asyncio
import gc
import types
from collections import Counter

import pytest
import websockets

from tests.conftest import eventually
from tickwire.core.redis_process import RedisProcess
from tickwire.feeds.publisher import Publisher
from tickwire.server.app import TickwireServer
from tickwire.server.catchup import CatchUp
from tickwire.server.connection import Connection
from tickwire.server.hub import Subscriber
from tickwire.server.outbox import Outbox
from tickwire.server.session import ClientSession
from tickwire.server.wire import Wire

from .conftest import recorder, server_config
from .test_abuse import raw_ws
from .test_server import Q, T, publish, publisher

PER_CONNECTION = (Wire, Connection, Subscriber, Outbox, ClientSession, CatchUp)


def alive() -> Counter[str]:
    # By exact type: `isinstance` would touch weak proxies to dead objects.
    kinds = {*PER_CONNECTION, websockets.ServerProtocol}
    return Counter(type(o).__name__ for o in gc.get_objects() if type(o) in kinds)


async def exercise(srv: TickwireServer, pub: Publisher) -> None:
    """Every way a connection lives and goes, one after the other, until no socket is left."""
    await publish(pub, T, 0, 20)
    await publish(pub, Q, 0, 5)
    # Clients that subscribe, snapshot, resume, list, unsubscribe, and close.
    for i in range(3):
        async with recorder(srv.url) as c:
            await c.request("subscribe", channels=[T.name, Q.name], snapshot=True)
            await c.wait_until(lambda c=c: bool(c.events(Q.name)))  # type: ignore[misc]
            await c.request("unsubscribe", channels=[Q.name])
            epoch = c.events(Q.name)[0]["epoch"]
            await c.request(
                "subscribe", channels=[Q.name], resume={Q.name: {"epoch": epoch, "seq": 2}}
            )
            await c.request("list")
            await publish(pub, T, 20 + 3 * i, 3)
            await c.wait_until(lambda c=c, i=i: c.last_seq(T.name) >= 23 + 3 * i)  # type: ignore[misc]
    # One closed by the server (a frame over twice the size limit: 1009).
    async with recorder(srv.url) as c:
        await c.request("subscribe", channels=["trades:*"])
        await c.send_raw("x" * 10_000)
        await c.wait_until(lambda: c.closed is not None)
    # One whose TCP connection drops without a closing handshake.
    async with raw_ws(srv.port):  # aborted on leaving
        await eventually(lambda: len(srv.connections) == 1, "the raw client to open")
    # One that never finishes its handshake.
    _reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    writer.write(b"GET /ws HTTP/1.1\r\n")
    await eventually(lambda: srv.sockets == 1, "the half handshake to be accepted")
    writer.transport.abort()
    # One HTTP exchange (not an upgrade).
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await reader.readline()).startswith(b"HTTP/1.1 200")
    writer.close()
    await eventually(lambda: srv.sockets == 0, "every socket to be gone")
    assert not srv.connections
    # Tasks a close cancelled end in the loop's next turns.
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.mark.usefixtures("no_cyclic_gc")
async def test_every_kind_of_closed_connection_is_freed_by_reference_counting(
    redis_server: RedisProcess,
) -> None:
    async with (
        publisher(redis_server) as pub,
        TickwireServer(server_config(redis_server, max_message_bytes=4096)) as srv,
    ):
        await exercise(srv, pub)
        left = alive()
        assert not left, f"left behind after close, only a cyclic GC would free: {left}"


def server_side(o: object) -> str | None:
    """What names `o` as the server's (tickwire's or websockets'), if it is."""
    kind = type(o)
    if kind is types.FrameType:
        code = o.f_code  # type: ignore[attr-defined]
        where = code.co_filename
        return where if "/server/" in where or "/websockets/" in where else None
    module = kind.__module__
    if module.startswith(("tickwire.", "websockets.", "server.")):
        return f"{module}.{kind.__qualname__}"
    return None


@pytest.mark.uvloop_only
@pytest.mark.usefixtures("no_cyclic_gc")
async def test_connections_coming_and_going_make_no_cyclic_garbage_on_the_server_side(
    redis_server: RedisProcess,
) -> None:
    """On uvloop (the server's loop: asyncio's own transports make cycles of their own), a
    cyclic collection after the lot finds nothing of the server's: no object, no frame."""
    async with (
        publisher(redis_server) as pub,
        TickwireServer(server_config(redis_server, max_message_bytes=4096)) as srv,
    ):
        await exercise(srv, pub)
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            gc.collect()
            found = Counter(name for name in map(server_side, gc.garbage) if name)
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
        assert not found, f"cyclic garbage of the server's: {found}"
