"""Private brokers for the bridge tests, on free ports; helpers to run and read a bridge."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tickwire.bench.brokers import MosquittoProcess, NatsProcess, RabbitProcess
from tickwire.core.channels import Channel
from tickwire.core.redis_wire import RedisConnection
from tickwire.core.stream import seq_of

TICKWIRE = str(Path(sys.executable).parent / "tickwire")


@pytest.fixture
def nats_server() -> Iterator[NatsProcess]:
    # Under a second to start: one per test, so a test may kill or restart its own.
    with NatsProcess() as proc:
        yield proc  # type: ignore[misc]


@pytest.fixture
def mosquitto() -> Iterator[MosquittoProcess]:
    with MosquittoProcess() as proc:
        yield proc  # type: ignore[misc]


@pytest.fixture(scope="session")
def rabbitmq() -> Iterator[RabbitProcess]:
    # Several seconds to start: one node per session; tests use queues of their own.
    with RabbitProcess() as proc:
        yield proc  # type: ignore[misc]


async def stored(conn: RedisConnection, channel: Channel) -> list[dict[str, Any]]:
    """A channel's stored events, checked for dense seqs from 1 in one epoch."""
    entries = await conn.execute("XRANGE", channel.stream_key, "-", "+")
    out = [orjson.loads(fields[1]) for _id, fields in entries]
    assert [seq_of(i) for i, _ in entries] == [e["seq"] for e in out]
    assert [e["seq"] for e in out] == list(range(1, len(out) + 1)), "seqs not dense"
    assert len({e["epoch"] for e in out}) <= 1
    return out


def write_map(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "map.toml"
    path.write_text(text)
    return path


def start_bridge(
    broker: str, url: str, redis_url: str, map_path: Path, *, crash_after_round: int = 0
) -> subprocess.Popen[bytes]:
    """`tickwire feed <broker>` as a process of its own (so that it can be killed -9)."""
    env = {**os.environ, "TICKWIRE_BRIDGE_CRASH_AFTER_ROUND": str(crash_after_round)}
    log = open(map_path.parent / f"bridge-{time.monotonic_ns()}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            TICKWIRE,
            "-v",
            "feed",
            broker,
            "--url",
            url,
            "--redis",
            redis_url,
            "--config",
            str(map_path),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    proc.log_path = Path(log.name)  # type: ignore[attr-defined]
    log.close()
    return proc


def bridge_log(proc: subprocess.Popen[bytes]) -> str:
    return Path(proc.log_path).read_text(errors="replace")  # type: ignore[attr-defined]


def stop_bridge(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
