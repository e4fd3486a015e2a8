"""Attempts side by side: a hung one never holds back the others, and nothing is left open."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from tickwire.core.races import AllFailed, all_within_grace, first_success


class Attempts:
    """Attempts that hang (until cancelled), fail or succeed, recording what became of each."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.discarded: list[str] = []
        #: Released by the test: an attempt that succeeds only when told to.
        self.release = asyncio.Event()
        self._began = asyncio.Event()

    def _start(self, name: str) -> None:
        self.started.append(name)
        self._began.set()

    async def until_started(self, n: int) -> None:
        while len(self.started) < n:
            self._began.clear()
            await self._began.wait()

    def hangs(self, name: str) -> Callable[[], Awaitable[str]]:
        async def run() -> str:
            self._start(name)
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled.append(name)
                raise
            raise AssertionError("unreachable")

        return run

    def fails(self, name: str, exc: BaseException | None = None) -> Callable[[], Awaitable[str]]:
        async def run() -> str:
            self._start(name)
            raise exc or ConnectionError(f"{name} refused")

        return run

    def succeeds(self, name: str, *, when_released: bool = False) -> Callable[[], Awaitable[str]]:
        async def run() -> str:
            self._start(name)
            if when_released:
                await self.release.wait()
            return name

        return run

    def discard(self, name: str) -> None:
        self.discarded.append(name)


async def test_a_hung_first_attempt_is_passed_over_after_the_stagger_and_cancelled() -> None:
    a = Attempts()
    got = await first_success(
        [a.hangs("seed1"), a.succeeds("seed2"), a.succeeds("seed3")],
        0.01,
        ConnectionError,
        a.discard,
    )
    assert got == "seed2"
    assert a.started == ["seed1", "seed2"]  # the third never needed
    assert a.cancelled == ["seed1"] and a.discarded == []


async def test_a_failure_starts_the_next_attempt_at_once_and_every_failure_is_told() -> None:
    a = Attempts()
    # A stagger far past the test's own timeout: only failing fast moves it on.
    got = await first_success(
        [a.fails("seed1"), a.fails("seed2"), a.succeeds("seed3")], 3600, ConnectionError, a.discard
    )
    assert got == "seed3" and a.started == ["seed1", "seed2", "seed3"]
    a = Attempts()
    with pytest.raises(AllFailed) as failed:
        await first_success([a.fails("seed1"), a.fails("seed2")], 3600, ConnectionError, a.discard)
    assert [str(e) for e in failed.value.failures] == ["seed1 refused", "seed2 refused"]
    assert "seed1 refused; seed2 refused" in str(failed.value)


async def test_an_unexpected_failure_is_raised_and_the_others_are_cancelled() -> None:
    a = Attempts()
    with pytest.raises(ValueError, match="bad config"):
        await first_success(
            [a.hangs("seed1"), a.fails("seed2", ValueError("bad config"))],
            0.01,
            ConnectionError,
            a.discard,
        )
    assert a.cancelled == ["seed1"]


async def test_a_second_success_in_the_same_turn_is_discarded() -> None:
    a = Attempts()
    waiting = [a.succeeds("seed1", when_released=True), a.succeeds("seed2", when_released=True)]
    task = asyncio.ensure_future(first_success(waiting, 0.0, ConnectionError, a.discard))
    await a.until_started(2)
    a.release.set()
    assert await task == "seed1"
    assert a.discarded == ["seed2"]


async def test_all_within_grace_cuts_off_a_hung_attempt_once_another_has_answered() -> None:
    a = Attempts()
    got = await all_within_grace(
        [a.succeeds("m1")(), a.hangs("m2")(), a.fails("m3")()], 0.01, ConnectionError, a.discard
    )
    assert got[0] == "m1"
    assert isinstance(got[1], TimeoutError) and "within 0.01 s of the first" in str(got[1])
    assert isinstance(got[2], ConnectionError)
    assert a.cancelled == ["m2"] and a.discarded == []


async def test_all_within_grace_waits_for_all_while_none_has_answered() -> None:
    """No grace before the first success: attempts that fail, or all that are slow, are waited
    for whole (each has its own timeout)."""
    a = Attempts()
    task = asyncio.ensure_future(
        all_within_grace(
            [a.fails("m1")(), a.succeeds("m2", when_released=True)()],
            0.0,
            ConnectionError,
            a.discard,
        )
    )
    await a.until_started(2)
    await asyncio.sleep(0.05)  # past the grace, were it counting: it is not
    assert not task.done()
    a.release.set()
    got = await task
    assert isinstance(got[0], ConnectionError) and got[1] == "m2"


async def test_all_within_grace_cancelled_discards_what_succeeded() -> None:
    a = Attempts()
    task = asyncio.ensure_future(
        all_within_grace([a.succeeds("m1")(), a.hangs("m2")()], 3600, ConnectionError, a.discard)
    )
    await a.until_started(2)
    await asyncio.sleep(0)  # m1's result is in
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert a.discarded == ["m1"] and a.cancelled == ["m2"]


async def test_all_within_grace_raises_an_unexpected_failure_and_discards_what_succeeded() -> None:
    a = Attempts()
    with pytest.raises(ValueError, match="bad config"):
        await all_within_grace(
            [a.succeeds("m1")(), a.fails("m2", ValueError("bad config"))(), a.fails("m3")()],
            3600,
            ConnectionError,
            a.discard,
        )
    assert a.discarded == ["m1"]
