"""Attempts run side by side: the first that succeeds, or all of them bounded by the first.

A hung host takes a connection (its kernel accepts) and answers nothing until the caller's
timeout, and nodes asked in turn waited that long for it each time: a reconnect whose first seed
hung, or a subscription to every master one of which hung, stalled the whole timeout while the
other nodes would have answered in milliseconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


class AllFailed(Exception):
    """No attempt succeeded; `failures` holds why, in the order they failed."""

    def __init__(self, failures: list[BaseException]) -> None:
        super().__init__("; ".join(map(str, failures)) or "nothing to try")
        self.failures = failures


async def first_success(
    starts: Sequence[Callable[[], Awaitable[T]]],
    stagger: float,
    expected: type[BaseException],
    discard: Callable[[T], None],
) -> T:
    """Start the attempts in order, the next one as soon as the last failed or `stagger`
    seconds after it began, until one succeeds ("happy eyeballs", RFC 8305); returns its
    result, or raises AllFailed if every one failed with an `expected` exception. The others
    are cancelled; one that succeeded too is given to `discard` (to close it). A failure of any
    other type is raised at once."""
    failures: list[BaseException] = []
    pending: set[asyncio.Future[T]] = set()
    started: list[asyncio.Future[T]] = []
    winner: asyncio.Future[T] | None = None
    i = 0
    started_next = True  # the first at once
    try:
        while winner is None:
            if started_next or not pending:
                if i < len(starts):
                    started.append(asyncio.ensure_future(starts[i]()))
                    pending.add(started[-1])
                    i += 1
                elif not pending:
                    raise AllFailed(failures)
            done, pending = await asyncio.wait(
                pending,
                timeout=stagger if i < len(starts) else None,
                return_when=asyncio.FIRST_COMPLETED,
            )
            started_next = not done
            for task in sorted(done, key=started.index):  # the earliest started first
                exc = task.exception()
                if exc is None:
                    if winner is None:
                        winner = task
                    else:
                        discard(task.result())
                elif isinstance(exc, expected):
                    failures.append(exc)
                    started_next = True
                else:
                    raise exc
        return winner.result()
    finally:
        await _stop(pending, discard)


async def all_within_grace(
    attempts: Sequence[Awaitable[T]],
    grace: float,
    expected: type[BaseException],
    discard: Callable[[T], None],
) -> list[T | BaseException]:
    """Run the attempts at once; once one has succeeded, wait at most `grace` seconds more for
    the others. Each one's result or `expected` exception, in order; one cut off gets a
    TimeoutError. If one failed otherwise, or the caller is cancelled, what succeeded goes to
    `discard` and that failure (or the cancel) is raised."""
    tasks = [asyncio.ensure_future(a) for a in attempts]
    pending: set[asyncio.Future[T]] = set(tasks)
    deadline: float | None = None
    loop = asyncio.get_running_loop()
    try:
        while pending:
            timeout = None if deadline is None else max(0.0, deadline - loop.time())
            done, pending = await asyncio.wait(
                pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                break
            if deadline is None and any(t.exception() is None for t in done):
                deadline = loop.time() + grace
    except BaseException:
        await _stop(set(tasks), discard)
        raise
    await _stop(pending, None)
    failures = [t.exception() for t in tasks if not t.cancelled()]
    unexpected = next((e for e in failures if e and not isinstance(e, expected)), None)
    if unexpected is not None:
        for task in tasks:
            if not task.cancelled() and task.exception() is None:
                discard(task.result())
        raise unexpected
    return [
        TimeoutError(f"no answer within {grace:g} s of the first")
        if t.cancelled()
        else (t.exception() or t.result())
        for t in tasks
    ]


async def _stop(tasks: set[asyncio.Future[T]], discard: Callable[[T], None] | None) -> None:
    """Cancel `tasks` and wait for them to end; give what succeeded meanwhile to `discard`."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if discard is not None:
        for task in tasks:
            if not task.cancelled() and task.exception() is None:
                discard(task.result())
