"""Timed waits that never lose a cancel."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Awaitable, Callable

import pytest

from tests.conftest import timeout
from tickwire.core.waits import cancel_and_wait, report_end, wait_set, within


async def wait_for_set(event: asyncio.Event, limit: float) -> bool:
    """The wait `wait_set` replaces, for comparison."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), limit)
    return event.is_set()


async def cancelled_as_the_event_is_set(
    wait: Callable[[asyncio.Event, float], Awaitable[bool]],
) -> bool:
    """Whether a loop around `wait` stops when cancelled just as its event is set."""
    event = asyncio.Event()

    async def consume_for_ever() -> None:
        while True:
            await wait(event, 30.0)
            event.clear()

    task = asyncio.create_task(consume_for_ever())
    # Two turns: the task starts its wait, then wait_for's inner task starts waiting on the event.
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    event.set()
    task.cancel()
    # asyncio.wait, not a timeout around `await task`: its expiry would cancel the task again.
    await asyncio.wait({task}, timeout=timeout(0.5))
    stopped = task.done()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return stopped


async def test_a_cancel_that_comes_as_the_event_is_set_stops_the_waiting_loop() -> None:
    assert await cancelled_as_the_event_is_set(wait_set)


async def test_wait_for_loses_that_cancel_before_python_3_12() -> None:
    # Why wait_set exists (CPython gh-86296, fixed in 3.12).
    lost = not await cancelled_as_the_event_is_set(wait_for_set)
    assert lost == (sys.version_info < (3, 12))


async def test_wait_set_tells_set_from_timed_out() -> None:
    event = asyncio.Event()
    assert not await wait_set(event, 0.01)
    asyncio.get_running_loop().call_soon(event.set)
    assert await wait_set(event, timeout(5))
    assert await wait_set(event, 0)  # already set: no wait at all


async def slow_to_stop(stopping: asyncio.Event, release: asyncio.Event) -> None:
    """A helper whose clean-up takes a while (a last write, a close handshake)."""
    try:
        await asyncio.Event().wait()
    finally:
        stopping.set()
        await release.wait()


async def test_stopping_a_helper_returns_once_it_has_ended() -> None:
    stopping, release = asyncio.Event(), asyncio.Event()
    helper = asyncio.create_task(slow_to_stop(stopping, release))
    await asyncio.sleep(0)
    stopper = asyncio.create_task(cancel_and_wait(helper))
    await stopping.wait()
    assert not stopper.done()
    release.set()
    await stopper  # the helper's CancelledError is not the stopper's
    assert helper.cancelled()


async def test_a_caller_cancelled_while_it_stops_a_helper_is_cancelled() -> None:
    stopping, release = asyncio.Event(), asyncio.Event()
    helper = asyncio.create_task(slow_to_stop(stopping, release))
    await asyncio.sleep(0)
    went_on = False

    async def close() -> None:
        nonlocal went_on
        await cancel_and_wait(helper)
        went_on = True  # what `suppress(CancelledError)` let happen

    closer = asyncio.create_task(close())
    await stopping.wait()
    closer.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await closer
    assert not went_on and helper.cancelled()


async def test_within_says_whether_work_ended_in_time_and_cancels_it_if_not() -> None:
    slow = asyncio.ensure_future(asyncio.sleep(30))
    assert not await within(slow, 0.01)
    assert slow.cancelled()
    assert await within(asyncio.sleep(0), timeout(5))


async def test_report_end_says_when_a_task_meant_to_run_ends_and_not_when_it_is_stopped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def fails() -> None:
        raise TypeError("a bug")

    async def returns() -> None:
        return None

    async def runs() -> None:
        await asyncio.Event().wait()

    tasks = [
        asyncio.create_task(fails(), name="failing"),
        asyncio.create_task(returns(), name="returning"),
        asyncio.create_task(runs(), name="stopped"),
    ]
    for task in tasks:
        task.add_done_callback(report_end)
    await asyncio.sleep(0)
    await cancel_and_wait(tasks[2])
    await asyncio.sleep(0)  # the done callbacks run
    mine = [r for r in caplog.records if r.name == "tickwire.tasks"]
    assert [(r.levelname, r.getMessage()) for r in mine] == [
        ("ERROR", "failing ended with an error; the process goes on without it"),
        ("ERROR", "returning ended; the process goes on without it"),
    ]
    assert mine[0].exc_info is not None and mine[1].exc_info is None
