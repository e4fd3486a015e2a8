"""Shared fixtures: one private redis-server per test session, emptied before each test."""

from __future__ import annotations

import asyncio
import gc
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping

import pytest
import uvloop

from tickwire.core.redis_process import RedisProcess
from tickwire.core.redis_wire import RedisConnection

#: Multiply test timeouts on slow machines: TICKWIRE_TIMEOUT_FACTOR=3 make test
TIMEOUT_FACTOR = float(os.environ.get("TICKWIRE_TIMEOUT_FACTOR", "1"))


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Every async test runs twice: on asyncio's own loop (what library users may run) and on
    uvloop (what `tickwire serve`, the feeds and the bench run on; the two differ, e.g. on
    writes to a reset socket and on timer resolution)."""
    if item.get_closest_marker("uvloop_only"):
        return {"uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def timeout(seconds: float) -> float:
    return seconds * TIMEOUT_FACTOR


async def eventually(cond: Callable[[], bool], what: str, limit: float = 5.0) -> None:
    """Poll `cond()` until it holds (for state that has no event to wait on); fail after `limit`."""
    deadline = time.monotonic() + timeout(limit)
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


@pytest.fixture
def no_cyclic_gc() -> Iterator[None]:
    """No automatic cyclic collection during the test (what it leaves is what reference
    counting alone left), and nothing frozen after it."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.enable()
        gc.collect()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisProcess]:
    with RedisProcess() as proc:
        yield proc


@pytest.fixture
async def redis(redis_server: RedisProcess) -> AsyncIterator[RedisConnection]:
    """A connection to the session's private Redis, emptied first (it is ours alone)."""
    if redis_server.proc is None or redis_server.proc.poll() is not None:
        redis_server.start()
    conn = await RedisConnection.open(redis_server.url)
    await conn.execute("FLUSHALL")
    yield conn
    conn.close()


@pytest.fixture
def fresh_redis() -> Iterator[RedisProcess]:
    """A redis-server of the test's own, for tests that kill, pause or wipe it.

    Every write is fsynced (`appendfsync always`), so a kill loses nothing it acknowledged.
    """
    with RedisProcess(appendonly=True, appendfsync="always") as proc:
        yield proc


@pytest.fixture(autouse=True)
async def _fail_on_loop_errors(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """Fail a test when the event loop logged an unhandled exception (as asyncpg's harness does)."""
    errors: list[dict[str, object]] = []
    loop = asyncio.get_running_loop()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        errors.append(context)
        loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
    yield
    if not request.node.get_closest_marker("allow_loop_errors"):
        assert not errors, f"event loop reported unhandled errors: {errors}"
