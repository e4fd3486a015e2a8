"""Waits that never lose a cancel: timed ones (Python 3.11's `asyncio.wait_for` can), and
stopping a helper task; and saying at once when a helper task that should run until stopped
ends."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any

log = logging.getLogger("tickwire.tasks")


async def within(work: Awaitable[Any], timeout: float | None) -> bool:
    """Await `work` for at most `timeout` seconds (None: no limit), cancelling it if it takes
    longer; whether it ended in time.

    Not `asyncio.wait_for`: on Python 3.11, a cancel that comes as the awaited thing finishes is
    lost (wait_for returns its result; CPython gh-86296, fixed in 3.12), and a loop around the
    wait runs on after its task was told to stop. A NATS bridge's receive loop, cancelled as a
    pull request ended, ignored the stop for good and hung its shutdown."""
    try:
        async with asyncio.timeout(timeout):
            await work
    except TimeoutError:
        return False
    return True


async def wait_set(event: asyncio.Event, timeout: float | None) -> bool:
    """Whether `event` is set within `timeout` seconds (None: no limit)."""
    return event.is_set() or await within(event.wait(), timeout)


async def cancel_and_wait(task: asyncio.Future[Any]) -> None:
    """Cancel `task` and wait until it has ended, without raising its CancelledError but
    raising the caller's own: `contextlib.suppress(CancelledError)` around the wait swallowed
    both, so a caller cancelled while it stopped a helper went on as if it had not been."""
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise


def report_end(task: asyncio.Task[Any]) -> None:
    """A done callback for a task meant to run until cancelled: one that ends otherwise is
    logged at once, with its error (`gather(return_exceptions=True)` at shutdown would swallow
    it, and the process would go on without the task, silently)."""
    if task.cancelled():
        return
    exc = task.exception()
    log.error(
        "%s ended%s; the process goes on without it",
        task.get_name(),
        "" if exc is None else " with an error",
        exc_info=exc,
    )
