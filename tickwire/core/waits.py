"""Timed waits that never lose a cancel (Python 3.11's `asyncio.wait_for` can)."""

from __future__ import annotations

import asyncio


async def wait_set(event: asyncio.Event, timeout: float | None) -> bool:
    """Whether `event` is set within `timeout` seconds (None: no limit).

    Not `asyncio.wait_for`: on Python 3.11, a cancel that comes as the awaited thing finishes is
    lost (wait_for returns its result; CPython gh-86296, fixed in 3.12), and a loop around the
    wait runs on after its task was told to stop. A NATS bridge's receive loop, cancelled as a
    pull request ended, ignored the stop for good and hung its shutdown."""
    if event.is_set():
        return True
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True
