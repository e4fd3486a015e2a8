"""The server over real WebSockets against a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import websockets

from tickwire.core.channels import Channel
from tickwire.core.config import PublisherConfig
from tickwire.core.events import encode_body
from tickwire.core.redis_process import RedisProcess
from tickwire.core.redis_wire import RedisConnection
from tickwire.feeds.publisher import Publisher
from tickwire.server.app import TickwireServer

from .conftest import recorder, server_config

T = Channel.parse("trades:BTC-USD")
Q = Channel.parse("quotes:ETH-USD")


def trade(i: int) -> bytes:
    return encode_body(
        "trade", T.symbol, i, 0, {"price": 100.5, "size": 1, "side": "buy", "trade_id": i}
    )


def quote(ch: Channel, i: int) -> bytes:
    return encode_body(
        "quote", ch.symbol, i, 0, {"bid": 1.25, "bid_size": 1, "ask": 1.5, "ask_size": 2}
    )


@contextlib.asynccontextmanager
async def publisher(redis: RedisProcess) -> AsyncIterator[Publisher]:
    async with Publisher(
        PublisherConfig(redis_url=redis.url, backoff_initial_s=0.01, backoff_max_s=0.2)
    ) as pub:
        yield pub


async def publish(pub: Publisher, ch: Channel, start: int, n: int) -> None:
    make = trade if ch.kind == "trades" else (lambda i: quote(ch, i))
    await pub.publish({ch: [make(i) for i in range(start, start + n)]})
    await pub.flush()


async def test_subscribe_unsubscribe_acks_carry_the_full_set(server: TickwireServer) -> None:
    async with recorder(server.url) as c:
        ack = await c.request("subscribe", channels=["trades:BTC-USD", "quotes:*"])
        assert ack["type"] == "subscribed" and ack["channels"] == ["trades:BTC-USD", "quotes:*"]
        ack = await c.request("unsubscribe", channels=["quotes:*"])
        assert ack == {"type": "unsubscribed", "id": ack["id"], "channels": ["trades:BTC-USD"]}
        pong = await c.request("ping")
        assert pong["type"] == "pong" and pong["ts"] > 0


async def test_live_events_in_order_and_list(
    server: TickwireServer, redis_server: RedisProcess
) -> None:
    async with recorder(server.url) as c, publisher(redis_server) as pub:
        await c.request("subscribe", channels=[T.name])
        # The channel may not be live in the reader yet; publish until events arrive.
        for i in range(0, 500, 50):
            await publish(pub, T, i, 50)
        await c.wait_until(lambda: c.last_seq(T.name) == 500)
        assert c.checker.ok, c.checker.violations
        listed = await c.request("list")
        assert listed["channels"] == [T.name]


async def test_wildcard_picks_up_a_symbol_that_appears_later(
    server: TickwireServer, redis_server: RedisProcess
) -> None:
    async with recorder(server.url) as c, publisher(redis_server) as pub:
        await c.request("subscribe", channels=["quotes:*"])
        late = Channel.parse("quotes:NEW-SYM")
        await publish(pub, late, 0, 20)
        await c.wait_until(lambda: len(c.events(late.name)) == 20)
        assert [e["seq"] for e in c.events(late.name)] == list(range(1, 21))
        assert c.checker.ok


async def test_snapshot_sends_latest_event_first(
    server: TickwireServer, redis_server: RedisProcess
) -> None:
    async with publisher(redis_server) as pub:
        await publish(pub, T, 0, 30)
        await publish(pub, Q, 0, 7)
        async with recorder(server.url) as c:
            await c.request("subscribe", channels=[T.name, "quotes:*"], snapshot=True)
            await c.wait_until(lambda: bool(c.events(T.name)) and bool(c.events(Q.name)))
            assert [e["seq"] for e in c.events(T.name)] == [30]
            assert [e["seq"] for e in c.events(Q.name)] == [7]
            await publish(pub, T, 30, 5)
            await c.wait_until(lambda: c.events(T.name)[-1]["seq"] == 35)
            assert [e["seq"] for e in c.events(T.name)] == [30, 31, 32, 33, 34, 35]


async def test_resume_across_disconnect_while_events_flow_has_no_gap_no_duplicate(
    server: TickwireServer, redis_server: RedisProcess
) -> None:
    stop = asyncio.Event()

    async def flow(pub: Publisher) -> None:
        i = 0
        while not stop.is_set():
            await publish(pub, T, i, 20)
            i += 20
            await asyncio.sleep(0.002)

    async with publisher(redis_server) as pub:
        await publish(pub, T, 0, 10)
        feeder = asyncio.create_task(flow(pub))
        seen: list[int] = []
        epoch = ""
        position: dict[str, Any] | None = None
        for _round in range(5):
            async with recorder(server.url) as c:
                if position is None:
                    await c.request("subscribe", channels=[T.name], snapshot=True)
                else:
                    c.checker.expect_from(T.name, position["epoch"], position["seq"])
                    await c.request("subscribe", channels=[T.name], resume={T.name: position})
                target = (seen[-1] if seen else 0) + 100
                await c.wait_until(
                    lambda c=c, t=target: c.last_seq(T.name) >= t  # type: ignore[misc]
                )
                assert c.checker.ok, c.checker.violations
                got = c.events(T.name)
                seen += [e["seq"] for e in got]
                epoch = got[-1]["epoch"]
                position = {"epoch": epoch, "seq": seen[-1]}
        stop.set()
        await feeder
    assert seen == list(range(seen[0], seen[-1] + 1))


async def test_trimmed_history_gives_the_exact_gap(
    server: TickwireServer, redis_server: RedisProcess, redis: RedisConnection
) -> None:
    async with publisher(redis_server) as pub:
        await publish(pub, T, 0, 100)
        epoch = pub.positions[T][0]
        await redis.execute("XTRIM", T.stream_key, "MINID", "61-0")  # keep 61..100
        async with recorder(server.url) as c:
            c.checker.expect_from(T.name, epoch, 40)
            await c.request(
                "subscribe", channels=[T.name], resume={T.name: {"epoch": epoch, "seq": 40}}
            )
            await c.wait_until(lambda: c.last_seq(T.name) == 100)
            gaps = c.of_type("gap")
            assert gaps == [
                {"type": "gap", "ch": T.name, "from_seq": 41, "to_seq": 60, "reason": "trimmed"}
            ]
            assert [e["seq"] for e in c.events(T.name)] == list(range(61, 101))
            assert c.checker.ok


async def test_flushall_gives_reset_and_the_new_epoch(
    server: TickwireServer, redis_server: RedisProcess, redis: RedisConnection
) -> None:
    async with publisher(redis_server) as pub, recorder(server.url) as c:
        await c.request("subscribe", channels=[T.name])
        for i in range(0, 100, 20):
            await publish(pub, T, i, 20)
        await c.wait_until(lambda: c.last_seq(T.name) == 100)
        old = c.events(T.name)[-1]["epoch"]
        await redis.execute("FLUSHALL")
        await publish(pub, T, 0, 5)
        reset = await c.wait_for(lambda m: m.get("type") == "reset")
        assert reset["ch"] == T.name and reset["epoch"] != old
        await c.wait_until(
            lambda: (
                c.events(T.name)[-1]["epoch"] == reset["epoch"] and c.events(T.name)[-1]["seq"] == 5
            )
        )
        assert c.checker.ok, c.checker.violations


async def test_resume_with_stale_epoch_gets_reset_then_new_epoch_history(
    server: TickwireServer, redis_server: RedisProcess
) -> None:
    async with publisher(redis_server) as pub:
        await publish(pub, T, 0, 8)
        async with recorder(server.url) as c:
            await c.request(
                "subscribe", channels=[T.name], resume={T.name: {"epoch": "gone", "seq": 500}}
            )
            await c.wait_until(lambda: len(c.events(T.name)) == 8)
            assert c.of_type("reset")[0]["epoch"] == pub.positions[T][0]
            assert [e["seq"] for e in c.events(T.name)] == list(range(1, 9))


async def test_redis_killed_and_restarted_mid_stream(fresh_redis: RedisProcess) -> None:
    async with (
        TickwireServer(server_config(fresh_redis)) as srv,
        publisher(fresh_redis) as pub,
        recorder(srv.url) as c,
    ):
        await c.request("subscribe", channels=[T.name])
        for i in range(0, 200, 50):
            await publish(pub, T, i, 50)
        await c.wait_until(lambda: c.last_seq(T.name) == 200)
        fresh_redis.kill()
        await c.wait_for(lambda m: m == {"type": "status", "redis": "down"})
        fresh_redis.start()
        await c.wait_for(lambda m: m == {"type": "status", "redis": "up"})
        await publish(pub, T, 200, 50)
        await c.wait_until(lambda: c.events(T.name)[-1]["seq"] >= 250 or bool(c.of_type("reset")))
        assert c.checker.ok, c.checker.violations
        health = srv.health()
        assert health["redis"] is True


async def test_slow_client_is_conflated_then_closed_while_others_get_everything(
    redis_server: RedisProcess, redis: RedisConnection
) -> None:
    cfg = server_config(redis_server, outbox_bytes=64 * 1024, slow_grace_s=1.0)
    async with (
        TickwireServer(cfg) as srv,
        publisher(redis_server) as pub,
        recorder(srv.url) as fast,
    ):
        slow = await websockets.connect(srv.url, compression=None, max_size=None, max_queue=1)
        slow.transport.pause_reading()  # stop reading, as a stuck client does
        await slow.send(
            orjson.dumps(
                {"op": "subscribe", "id": 1, "channels": ["trades:*", "quotes:*"]}
            ).decode()
        )
        await fast.request("subscribe", channels=["trades:*", "quotes:*"])
        n = 0
        while srv.metrics.slow_disconnects == 0 and n < 200_000:
            await publish(pub, T, n, 500)
            await publish(pub, Q, n, 500)
            n += 500
        assert srv.metrics.slow_disconnects == 1
        assert srv.metrics.outbox.dropped_events + srv.metrics.outbox.conflated_events > 0
        await fast.wait_until(
            lambda: len(fast.events(T.name)) >= n - 1000 and fast.events(T.name)[-1]["seq"] == n
        )
        assert fast.checker.ok and fast.of_type("gap") == []
        slow.transport.resume_reading()
        with pytest.raises(websockets.ConnectionClosed) as info:
            while True:
                await asyncio.wait_for(slow.recv(), 10)
        assert info.value.rcvd is not None and info.value.rcvd.code == 4008
        assert info.value.rcvd.reason == "slow consumer"


async def test_malformed_requests_get_typed_errors_and_the_connection_lives(
    server: TickwireServer,
) -> None:
    async with recorder(server.url) as c:
        for frame, code in [
            ("{nope", "bad_request"),
            ('{"op":"dance","id":7}', "unknown_op"),
            ('{"op":"subscribe","id":8,"channels":["orders:X"]}', "unknown_channel"),
            ('{"op":"subscribe","id":9,"channels":["trades:bad sym"]}', "bad_request"),
        ]:
            start = len(c.messages)
            await c.send_raw(frame)
            err = await c.wait_for(lambda m: m.get("type") == "error", start=start)
            assert err["code"] == code
        assert (await c.request("ping"))["type"] == "pong"
        assert server.metrics.rejected_requests == 4


async def test_oversized_frame_closes_with_1009(server: TickwireServer) -> None:
    limit = server.config.limits.max_message_bytes
    async with recorder(server.url) as c:
        # Up to twice the limit, the request is refused and the connection stays.
        await c.send_raw("x" * (2 * limit))
        error = await c.wait_for(lambda m: m.get("type") == "error")
        assert error["code"] == "too_large"
        await c.send_raw("x" * (2 * limit + 1))
        await c.wait_until(lambda: c.closed is not None) if c.closed is None else None
    assert c.closed is not None and c.closed[0] == 1009


async def test_graceful_shutdown_closes_clients_with_1001(
    redis_server: RedisProcess, redis: RedisConnection
) -> None:
    srv = TickwireServer(server_config(redis_server))
    await srv.start()
    async with recorder(srv.url) as c:
        await c.request("subscribe", channels=[T.name])
        await asyncio.wait_for(srv.close(), 5)
        with contextlib.suppress(AssertionError):
            await c.wait_for(lambda m: False, timeout=5)
        assert c.closed == (1001, "server shutting down")


async def test_http_routes(server: TickwireServer) -> None:
    async def get(path: str) -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = await reader.read()
        writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split()[1]), body

    status, body = await get("/healthz")
    assert status == 200 and orjson.loads(body)["redis"] is True
    status, body = await get("/metrics")
    assert (
        status == 200
        and b"tickwire_connections " in body
        and b"tickwire_publish_to_write_seconds_bucket" in body
        and b"tickwire_read_to_write_seconds_count" in body
    )
    status, body = await get("/")
    assert status == 200
    assert b"<html" in body.lower() or b"<!doctype html" in body.lower()
    assert (await get("/nope"))[0] == 404
    assert (await get("/web/../../etc/passwd"))[0] == 404


QUOTE_KEYS = ["v", "type", "sym", "ts", "pt", "bid", "ask", "epoch", "seq"]


async def test_projected_and_whole_clients_of_one_channel_each_get_their_fields(
    server: TickwireServer, redis_server: RedisProcess, redis: RedisConnection
) -> None:
    async with (
        publisher(redis_server) as pub,
        recorder(server.url) as projected,
        recorder(server.url) as twin,
        recorder(server.url) as whole,
    ):
        for c in (projected, twin):
            ack = await c.request("subscribe", channels=["quotes:*"], fields=["bid", "ask"])
            assert ack["type"] == "subscribed"
        # The same client follows trades whole beside its projected quotes.
        await projected.request("subscribe", channels=[T.name])
        await whole.request("subscribe", channels=["quotes:*", T.name])
        for i in range(0, 60, 20):
            await publish(pub, Q, i, 20)
            await publish(pub, T, i, 20)
        for c in (projected, twin, whole):
            await c.wait_until(
                lambda c=c: c.last_seq(Q.name) == 60 and c.last_seq(T.name) >= 0  # type: ignore[misc]
            )
        await projected.wait_until(lambda: projected.last_seq(T.name) == 60)
        await whole.wait_until(lambda: whole.last_seq(T.name) == 60)
        stored = [
            orjson.loads(fields[1])
            for _id, fields in await redis.execute("XRANGE", Q.stream_key, "-", "+")
        ]
        for c in (projected, twin):
            got = c.events(Q.name)
            assert [list(e) for e in got] == [QUOTE_KEYS] * 60
            assert got == [{k: e[k] for k in QUOTE_KEYS} for e in stored]
            assert c.checker.ok, c.checker.violations
        assert whole.events(Q.name) == stored
        assert projected.events(T.name) == whole.events(T.name)
        assert "price" in projected.events(T.name)[0]
        assert whole.checker.ok, whole.checker.violations


async def test_projected_snapshot_and_resume(
    server: TickwireServer, redis_server: RedisProcess
) -> None:
    async with publisher(redis_server) as pub:
        await publish(pub, Q, 0, 30)
        epoch = pub.positions[Q][0]
        async with recorder(server.url) as snap, recorder(server.url) as resumed:
            await snap.request("subscribe", channels=[Q.name], fields=["ask"], snapshot=True)
            resumed.checker.expect_from(Q.name, epoch, 25)
            await resumed.request(
                "subscribe",
                channels=["quotes:*"],
                fields=["bid", "ask"],
                resume={Q.name: {"epoch": epoch, "seq": 25}},
            )
            await snap.wait_until(lambda: snap.last_seq(Q.name) == 30)
            await resumed.wait_until(lambda: resumed.last_seq(Q.name) == 30)
            await publish(pub, Q, 30, 5)
            await snap.wait_until(lambda: snap.last_seq(Q.name) == 35)
            await resumed.wait_until(lambda: resumed.last_seq(Q.name) == 35)
            assert [e["seq"] for e in snap.events(Q.name)] == [30, 31, 32, 33, 34, 35]
            assert {tuple(e) for e in snap.events(Q.name)} == {
                ("v", "type", "sym", "ts", "pt", "ask", "epoch", "seq")
            }
            assert [e["seq"] for e in resumed.events(Q.name)] == list(range(26, 36))
            assert {tuple(e) for e in resumed.events(Q.name)} == {tuple(QUOTE_KEYS)}
            assert snap.checker.ok and resumed.checker.ok


async def test_bad_fields_are_refused(server: TickwireServer) -> None:
    async with recorder(server.url) as c:
        err = await c.request("subscribe", channels=["quotes:*"], fields=["bid", "price"])
        assert err["type"] == "error" and err["code"] == "bad_request"
        assert "price" in err["message"]
        await c.request("subscribe", channels=["quotes:*"], fields=["bid"])
        err = await c.request("subscribe", channels=["quotes:*"], fields=["ask"])
        assert err["code"] == "bad_request" and "quotes:*" in err["message"]
        ack = await c.request("subscribe", channels=["quotes:*"], fields=["bid"])
        assert ack["type"] == "subscribed" and ack["channels"] == ["quotes:*"]
