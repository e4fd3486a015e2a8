"""The server's own WebSocket connection layer (`tickwire.server.wire`) over real sockets: what it
does beyond websockets' sans-I/O protocol (requests held behind a slow one, in order; upgrades
refused while shutting down; every TCP connection counted until it goes)."""

from __future__ import annotations

import asyncio

import orjson

from tests.conftest import eventually
from tickwire.core.channels import REGISTRY_KEY
from tickwire.core.redis_process import RedisProcess
from tickwire.core.redis_wire import RedisConnection
from tickwire.server.app import TickwireServer

from .conftest import server_config
from .test_abuse import CONT, PING, PONG, TEXT, UPGRADE, frame, http_exchange, raw_ws, status_of


async def test_requests_behind_a_list_are_answered_after_it_in_the_order_sent(
    redis_server: RedisProcess, redis: RedisConnection
) -> None:
    """A `list` waits on a registry read; what the client sent after it, in the same segment,
    waits too (reading held) and is answered after it, in order."""
    await redis.execute("SADD", REGISTRY_KEY, "trades:AAA", "quotes:BBB")
    async with TickwireServer(server_config(redis_server)) as srv, raw_ws(srv.port) as ws:
        requests = [
            {"op": "list", "id": 1},
            {"op": "ping", "id": 2},
            {"op": "list", "id": 3},
            {"op": "ping", "id": 4},
            {"op": "ping", "id": 5},
        ]
        # One write: every request reaches the server in one read, the list's wait among them.
        await ws.send(b"".join(frame(TEXT, orjson.dumps(r)) for r in requests))
        replies = [await ws.message() for _ in requests]
        assert [(m["type"], m["id"]) for m in replies] == [
            ("channels", 1),
            ("pong", 2),
            ("channels", 3),
            ("pong", 4),
            ("pong", 5),
        ]
        assert replies[0]["channels"] == ["quotes:BBB", "trades:AAA"]
        (conn,) = srv.connections
        assert not conn.wire.reading_held


async def test_a_fragmented_request_with_pings_between_is_answered_once_whole(
    redis_server: RedisProcess, redis: RedisConnection
) -> None:
    request = orjson.dumps({"op": "ping", "id": 7})
    parts = [request[:5], request[5:9], request[9:]]
    async with TickwireServer(server_config(redis_server)) as srv, raw_ws(srv.port) as ws:
        await ws.send(
            frame(TEXT, parts[0], fin=False)
            + frame(PING, b"a")
            + frame(CONT, parts[1], fin=False)
            + frame(PING, b"b")
            + frame(CONT, parts[2])
        )
        # Each ping's pong comes at once; the request is answered when its last part is in.
        assert await ws.read_frame() == (PONG, b"a")
        assert await ws.read_frame() == (PONG, b"b")
        reply = await ws.message()
        assert (reply["type"], reply["id"]) == ("pong", 7)


async def test_an_upgrade_during_shutdown_is_refused_503_and_every_socket_is_counted_out(
    redis_server: RedisProcess, redis: RedisConnection
) -> None:
    srv = TickwireServer(server_config(redis_server))
    await srv.start()
    try:
        # Connected before the shutdown, its request comes after it started.
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        await eventually(lambda: srv.sockets == 1, "the server to accept the connection")
        srv.stop_serving()  # close()'s first step
        writer.write(b"GET /ws HTTP/1.1\r\n" + UPGRADE + b"\r\n")
        response = await asyncio.wait_for(reader.read(), 5)
        assert status_of(response) == 503, response[:200]
        writer.close()
        await eventually(lambda: srv.sockets == 0, "the refused connection to be counted out")
    finally:
        await srv.close()


async def test_http_routes_answer_and_close_and_are_counted_out(
    redis_server: RedisProcess, redis: RedisConnection
) -> None:
    async with TickwireServer(server_config(redis_server)) as srv:
        response = await http_exchange(srv.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(response) == 200
        assert b"\r\nServer: tickwire/" in response
        assert orjson.loads(response.partition(b"\r\n\r\n")[2])["status"] in ("ok", "degraded")
        await eventually(lambda: srv.sockets == 0, "the HTTP exchange's socket to be counted out")
