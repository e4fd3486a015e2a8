"""Private brokers for the bridge tests, on free ports; helpers to run and read a bridge."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import eventually, timeout
from tickwire.bench.brokers import MosquittoProcess, NatsProcess, RabbitProcess
from tickwire.core.channels import Channel
from tickwire.core.config import PublisherConfig
from tickwire.core.redis_process import RedisProcess, TlsFiles
from tickwire.core.redis_target import RedisLink
from tickwire.core.redis_wire import RedisConnection
from tickwire.core.stream import seq_of
from tickwire.feeds.bridges.core import BridgeStats, BridgeStore, open_source, run_bridge
from tickwire.feeds.bridges.mapping import BridgeMap, BridgeMapper, Broker, load_bridge_map
from tickwire.feeds.bridges.mqtt_source import MqttSource
from tickwire.feeds.bridges.rabbitmq_source import RabbitSource

TICKWIRE = str(Path(sys.executable).parent / "tickwire")


@pytest.fixture
def nats_server() -> Iterator[NatsProcess]:
    # Under a second to start: one per test, so a test may kill or restart its own.
    with NatsProcess() as proc:
        yield proc


@pytest.fixture
def mosquitto() -> Iterator[MosquittoProcess]:
    with MosquittoProcess() as proc:
        yield proc


@pytest.fixture(scope="session")
def rabbitmq(tls_files: TlsFiles) -> Iterator[RabbitProcess]:
    # Several seconds to start: one node per session; tests use queues of their own. A TLS
    # listener too (`tls_url`), for the test that needs one.
    with RabbitProcess(tls=tls_files) as proc:
        yield proc


def with_tls(text: str, broker: str, files: TlsFiles) -> str:
    """A map's text with its broker table (made if missing) trusting the test CA."""
    line = f'tls_ca_file = "{files.ca}"\n'
    if f"[{broker}]\n" in text:
        return text.replace(f"[{broker}]\n", f"[{broker}]\n{line}", 1)
    return f"{text}\n[{broker}]\n{line}"


async def stored(conn: RedisLink, channel: Channel) -> list[dict[str, Any]]:
    """A channel's stored events, checked for dense seqs from 1 in one epoch."""
    entries = await conn.execute("XRANGE", channel.stream_key, "-", "+")
    out = [orjson.loads(fields[1]) for _id, fields in entries]
    assert [seq_of(i) for i, _ in entries] == [e["seq"] for e in out]
    assert [e["seq"] for e in out] == list(range(1, len(out) + 1)), "seqs not dense"
    assert len({e["epoch"] for e in out}) <= 1
    return out


@contextlib.asynccontextmanager
async def running_bridge(
    broker: Broker, url: str, redis_url: str, map_path: Path
) -> AsyncIterator[BridgeStats]:
    """A bridge in this process (for tests that need no crash), stopped at the end."""
    bridge_map = load_bridge_map(map_path, broker)
    source = open_source(broker, url, bridge_map)
    store = BridgeStore(PublisherConfig(redis_url=redis_url), bridge_map.options)
    await store.start()
    await source.start()
    stats = BridgeStats()
    stop = asyncio.Event()
    task = asyncio.create_task(
        run_bridge(source, BridgeMapper(bridge_map), store, stats=stats, stop=stop)
    )
    try:
        yield stats
    finally:
        stop.set()
        await task
        await source.close()
        store.close()


async def wait_stored(
    conn: RedisConnection,
    channels: list[Channel],
    n: int,
    proc: BridgeProcess | None = None,
    limit: float = 20,
) -> None:
    """Poll Redis until `channels` hold `n` events in all (the bridge's log on failure)."""
    deadline = time.monotonic() + timeout(limit)
    while True:
        total = 0
        for ch in channels:
            total += await conn.execute("XLEN", ch.stream_key)
        if total >= n:
            return
        if time.monotonic() > deadline:
            pytest.fail(
                f"{total} of {n} events stored in time"
                + (f"; bridge log:\n{proc.log()}" if proc else "")
            )
        await asyncio.sleep(0.02)


async def trade_ids(conn: RedisConnection, symbols: Sequence[str]) -> dict[str, list[int]]:
    """The trade ids stored per symbol, in stored order."""
    return {s: [e["trade_id"] for e in await stored(conn, Channel("trades", s))] for s in symbols}


def expected(symbols: Sequence[str], last: int) -> dict[str, list[int]]:
    """Trades 1..last, trade n on symbol n % len(symbols), each once and in order."""
    return {s: [n for n in range(1, last + 1) if symbols[n % len(symbols)] == s] for s in symbols}


def write_map(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "map.toml"
    path.write_text(text)
    return path


@dataclass
class BridgeProcess:
    """`tickwire feed <broker>` running as a process of its own, and its log."""

    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM, as a service manager stops it: the bridge must end by itself, in time (a
        kill after a quiet 10 s hid a NATS bridge that never stopped)."""
        if self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout(10))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"the bridge did not stop within 10 s of SIGTERM:\n{self.log()}")

    def stopped_cleanly(self) -> bool:
        """Whether it ended on its own with its closing summary."""
        return self.proc.returncode == 0 and "bridge stopped:" in self.log()


def start_bridge(
    broker: str, url: str, redis_url: str, map_path: Path, *, crash_after_round: int = 0
) -> BridgeProcess:
    """A bridge process (so that it can be killed -9); `crash_after_round`: it kills itself
    after that many rounds are in Redis, before acknowledging them."""
    env = {**os.environ, "TICKWIRE_BRIDGE_CRASH_AFTER_ROUND": str(crash_after_round)}
    log_path = map_path.parent / f"bridge-{time.monotonic_ns()}.log"
    with open(log_path, "wb") as log:
        cmd = [TICKWIRE, "-v", "feed", broker, "--url", url, "--redis", redis_url]
        proc = subprocess.Popen(
            [*cmd, "--config", str(map_path)], stdout=log, stderr=subprocess.STDOUT, env=env
        )
    return BridgeProcess(proc, log_path)


async def pauses_while_redis_is_down(
    source: MqttSource | RabbitSource,
    bridge_map: BridgeMap,
    redis: RedisProcess,
    publish: Callable[[], Awaitable[None]],
    total: int,
    window: int,
    symbols: Sequence[str],
) -> None:
    """Kill Redis under a running bridge, `publish` `total` trades: the bridge takes its
    `window` and no more (the broker keeps the rest); with Redis back, every trade is stored,
    once and in order."""
    store = BridgeStore(PublisherConfig(redis_url=redis.url), bridge_map.options)
    await store.start()
    await source.start()
    stats = BridgeStats()
    stop = asyncio.Event()
    task = asyncio.create_task(
        run_bridge(source, BridgeMapper(bridge_map), store, stats=stats, stop=stop)
    )
    redis.kill()
    await publish()
    await eventually(lambda: stats.redis_retries >= 3, "retries against the dead Redis", limit=15)
    # The round held plus what the client has; the broker keeps the rest.
    assert stats.received + source.buffered == window
    redis.start()
    await eventually(lambda: stats.stored == total, "everything stored", limit=20)
    stop.set()
    await task
    await source.close()
    store.close()
    conn = await RedisConnection.open(redis.url)
    assert await trade_ids(conn, symbols) == expected(symbols, total)
    conn.close()
