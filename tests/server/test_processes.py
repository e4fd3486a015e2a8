"""`tickwire serve` as real processes: workers sharing a port, signals, heartbeats."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import time
from pathlib import Path

from tests.conftest import eventually
from tickwire.bench.harness import ServerProcess, children
from tickwire.core.channels import Channel
from tickwire.core.config import PublisherConfig
from tickwire.core.events import encode_body
from tickwire.core.redis_process import RedisProcess
from tickwire.core.redis_wire import RedisConnection
from tickwire.feeds.publisher import Publisher
from tickwire.server.app import TickwireServer

from .conftest import http_get, recorder, server_config

T = Channel.parse("trades:BTC-USD")


def trade_body(price: float) -> bytes:
    return encode_body(
        "trade", T.symbol, 0, 0, {"price": price, "size": 1, "side": "buy", "trade_id": 1}
    )


async def serve_two_workers(redis: RedisProcess) -> tuple[int, subprocess.Popen[bytes]]:
    """`tickwire serve --workers 2` on a free port, once both workers serve."""
    server = ServerProcess(redis.url, workers=2)
    await asyncio.to_thread(server.start)
    assert server.proc is not None
    return server.port, server.proc


async def test_two_workers_share_the_port_and_each_serves_every_event(
    redis_server: RedisProcess, redis: RedisConnection
) -> None:
    port, proc = await serve_two_workers(redis_server)
    try:
        url = f"ws://127.0.0.1:{port}/ws"
        async with Publisher(PublisherConfig(redis_url=redis_server.url)) as pub:
            await pub.publish({T: [trade_body(1.5) for _ in range(10)]})
            await pub.flush()
            clients = [recorder(url) for _ in range(8)]
            recs = [await c.__aenter__() for c in clients]
            for r in recs:
                await r.request("subscribe", channels=[T.name], snapshot=True)
                await r.wait_until(lambda r=r: r.last_seq(T.name) == 10)  # type: ignore[misc]
            await pub.publish({T: [trade_body(2.5) for _ in range(50)]})
            await pub.flush()
            for r in recs:
                await r.wait_until(lambda r=r: r.last_seq(T.name) == 60)  # type: ignore[misc]
                assert [e["seq"] for e in r.events(T.name)] == list(range(10, 61))
            for c in clients:
                await c.__aexit__(None, None, None)
        assert len(children(proc.pid)) == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0


async def test_killed_worker_is_replaced_and_sigterm_closes_clients_with_1001(
    redis_server: RedisProcess, redis: RedisConnection
) -> None:
    port, proc = await serve_two_workers(redis_server)
    try:
        victim = children(proc.pid)[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pids = children(proc.pid)
            if victim not in pids and len(pids) == 2:
                break
            await asyncio.sleep(0.1)
        assert victim not in children(proc.pid) and len(children(proc.pid)) == 2
        async with recorder(f"ws://127.0.0.1:{port}/ws") as c:
            await c.request("subscribe", channels=[T.name])
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            await c.wait_until(lambda: c.closed is not None, timeout=6)
            assert c.closed == (1001, "server shutting down")
        assert await asyncio.to_thread(proc.wait, 6) == 0
        assert time.monotonic() - started < 5.5
    finally:
        if proc.poll() is None:
            proc.kill()


async def test_idle_connection_gets_heartbeat_with_last_seqs(
    redis_server: RedisProcess, redis: RedisConnection
) -> None:
    cfg = server_config(redis_server)
    cfg = dataclasses.replace(cfg, heartbeat_ms=200)
    async with (
        TickwireServer(cfg) as srv,
        recorder(srv.url) as c,
        Publisher(PublisherConfig(redis_url=redis_server.url)) as pub,
    ):
        await c.request("subscribe", channels=[T.name])
        for _ in range(20):
            await pub.publish({T: [trade_body(1.5)]})
            await pub.flush()
            if c.last_seq(T.name):
                break
            await asyncio.sleep(0.05)
        assert c.last_seq(T.name) > 0
        # A heartbeat goes only to an idle connection, so everything sent came before it.
        hb = await c.wait_for(lambda m: m.get("type") == "heartbeat", timeout=5)
        assert hb["ts"] > 0
        assert hb["last"] == {T.name: c.last_seq(T.name)}


async def test_a_served_process_times_its_collector_pauses_and_runs_its_full_collections(
    redis_server: RedisProcess, tmp_path: Path
) -> None:
    """`serve` keeps the collector's policy (`tickwire.core.collector`) running, and the pauses
    show on /metrics: here a full collection every 0.2 s, so that some come at once."""
    config = tmp_path / "server.toml"
    config.write_text("gc_freeze_s = 0.05\ngc_full_every_s = 0.2\n")
    server = ServerProcess(redis_server.url, extra_args=["--config", str(config)])
    await asyncio.to_thread(server.start)
    try:

        async def pauses() -> int:
            _, body, _ = await http_get(server.port, "/metrics")
            (line,) = [
                x
                for x in body.decode().splitlines()
                if x.startswith("tickwire_gc_pause_seconds_count")
            ]
            return int(line.split()[1])

        for _ in range(200):  # 10 s
            if await pauses() >= 3:
                break
            await asyncio.sleep(0.05)
        # An idle server allocates too little for a collection of its own: these are the
        # policy's full collections.
        assert await pauses() >= 3
    finally:
        server.stop()


async def test_a_connection_that_fails_to_be_tended_goes_and_the_others_keep_their_heartbeats(
    redis_server: RedisProcess, redis: RedisConnection
) -> None:
    cfg = dataclasses.replace(server_config(redis_server), heartbeat_ms=200)
    async with TickwireServer(cfg) as srv, recorder(srv.url) as a, recorder(srv.url) as b:
        await a.wait_for(lambda m: m.get("type") == "heartbeat", timeout=5)
        await b.wait_for(lambda m: m.get("type") == "heartbeat", timeout=5)
        # A stand-in for a bug in one connection's tending: its heartbeat raises TypeError.
        first = next(iter(srv.connections))
        first.last_write = None  # type: ignore[assignment]
        await eventually(lambda: a.closed is not None or b.closed is not None, "one closed")
        bad, good = (a, b) if a.closed is not None else (b, a)
        assert bad.closed is not None and bad.closed[0] == 1011
        seen = len(good.of_type("heartbeat"))
        await good.wait_until(lambda: len(good.of_type("heartbeat")) >= seen + 2, timeout=5)
        assert good.closed is None
