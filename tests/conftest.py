"""Shared fixtures: one private redis-server per test session, emptied before each test."""

from __future__ import annotations

import asyncio
import faulthandler
import gc
import inspect
import os
import sys
import threading
import time
import traceback
import types
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Iterator, Mapping
from typing import Any

import pytest
import trustme
import uvloop

from tickwire.core.redis_process import RedisProcess, TlsFiles
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


#: How long before pytest-timeout's limit an async test or fixture is cancelled by its own loop.
GUARD_MARGIN_S = 5.0


def time_limit_of(item: pytest.Item) -> float:
    """pytest-timeout's limit for `item` (its `--timeout` or the ini's), 0 if none."""
    marker = item.get_closest_marker("timeout")
    if marker is not None and marker.args:
        return float(marker.args[0])
    return float(item.config.getoption("timeout", None) or item.config.getini("timeout") or 0)


def _first_of(obj: object, *names: str) -> Any:
    return next((getattr(obj, n) for n in names if hasattr(obj, n)), None)


def _generator_of(awaitable: object) -> types.AsyncGeneratorType[Any, Any] | None:
    """The async generator an `async_generator_asend` or `_athrow` steps, if it is one."""
    if awaitable is None or type(awaitable).__name__ not in (
        "async_generator_asend",
        "async_generator_athrow",
    ):
        return None
    return next(
        (g for g in gc.get_referents(awaitable) if isinstance(g, types.AsyncGeneratorType)), None
    )


def task_stacks(loop: asyncio.AbstractEventLoop) -> str:
    """Every task of `loop` with the chain of awaits it is suspended in (`Task.print_stack`
    shows only the outermost coroutine)."""
    out = []
    for task in asyncio.all_tasks(loop):
        frames = []
        awaited: Any = task.get_coro()
        # Coroutines, generators (`yield from`) and async generators name them differently.
        while True:
            frame = _first_of(awaited, "cr_frame", "gi_frame", "ag_frame")
            if frame is None:
                # An async generator awaited through `__anext__` or `athrow` (an async
                # fixture's tear-down): the awaitable names its generator only to the GC.
                awaited = _generator_of(awaited)
                if awaited is None:
                    break
                continue
            frames.append((frame, frame.f_lineno))
            awaited = _first_of(awaited, "cr_await", "gi_yieldfrom", "ag_await")
        stack = "".join(traceback.StackSummary.extract(iter(frames)).format())
        out.append(f"{task.get_name()}:\n{stack}")
    return "\n".join(out)


async def guard(work: Coroutine[Any, Any, Any], limit: float) -> Any:
    """`work`, cancelled by its own loop after `limit` s, failing with every task's stack.

    pytest-timeout cannot stop a test on uvloop: its SIGALRM handler runs only when the loop
    next calls into Python, and what it raises there the loop logs as a callback's error, so a
    hung test hung `make test` (a NATS bridge test sat 14 minutes past its 120 s limit)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    stacks: list[str] = []

    def expire() -> None:
        stacks.append(task_stacks(loop))
        task.cancel()

    timer = loop.call_later(limit, expire)
    try:
        result = await work
    except asyncio.CancelledError:
        if not stacks:
            raise
    finally:
        timer.cancel()
    if not stacks:
        return result
    # Also when the test went on: the cancel can end a wait the code under test takes for its
    # stop signal, and the test then passes (40 s late).
    pytest.fail(f"timed out after {limit:g} s; the loop's tasks:\n{stacks[0]}", pytrace=False)


#: The time limit of the item running now (none: 0), for `_guarded_run`.
_item_limit = [0.0]
_runner_run = asyncio.Runner.run


def _guarded_run(
    self: asyncio.Runner, coro: Coroutine[Any, Any, Any], *, context: Any = None
) -> Any:
    """`asyncio.Runner.run` with every coroutine guarded: pytest-asyncio runs each async
    test, fixture set-up and fixture tear-down through a Runner, and `asyncio.run` runs its
    main coroutine through one."""
    limit = _item_limit[0] - GUARD_MARGIN_S
    if limit > 0 and inspect.iscoroutine(coro):
        coro = guard(coro, limit)
    return _runner_run(self, coro, context=context)


def pytest_configure(config: pytest.Config) -> None:
    asyncio.Runner.run = _guarded_run  # type: ignore[method-assign]


def pytest_unconfigure(config: pytest.Config) -> None:
    asyncio.Runner.run = _runner_run  # type: ignore[method-assign]


def last_resort_after(limit: float) -> float:
    """How long after an item's time limit `pytest_runtest_protocol` ends the run."""
    return max(5.0, limit / 4)


def end_the_run(item: pytest.Item, limit: float) -> None:
    """Print every thread's stack and exit: `item` outlived its limit where nothing could
    stop it (a loop a test runs itself, say), and a hung run would hang CI with no word."""
    capture = item.config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        capture.suspend_global_capture(in_=True)  # or the words go to a capture file
    sys.stderr.write(
        f"\n{item.nodeid} outlived its {limit:g} s time limit by {last_resort_after(limit):g} s "
        "and nothing stopped it: ending the run. Every thread's stack:\n"
    )
    faulthandler.dump_traceback(all_threads=True)
    sys.stderr.flush()
    os._exit(1)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(
    item: pytest.Item, nextitem: pytest.Item | None
) -> Generator[None, object, object]:
    """The item's limit for `_guarded_run`, and the last resort: pytest-timeout's limit covers
    an item's set-up, call and tear-down but cannot interrupt uvloop, and `guard` covers only
    coroutines (not a hang in a sync test or fixture)."""
    limit = time_limit_of(item)
    if limit <= 0:
        return (yield)
    timer = threading.Timer(limit + last_resort_after(limit), end_the_run, (item, limit))
    timer.daemon = True
    timer.start()
    _item_limit[0] = limit
    try:
        return (yield)
    finally:
        _item_limit[0] = 0.0
        timer.cancel()


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
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A throwaway CA (`ca.pem`) and a certificate it signed for localhost and 127.0.0.1, its
    key in the same file (`server.pem`): for redis-server's TLS port and as a client's own."""
    where = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(where / "ca.pem")
    ca.issue_cert("localhost", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
        where / "server.pem"
    )
    return TlsFiles(where / "ca.pem", where / "server.pem", where / "server.pem")


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
