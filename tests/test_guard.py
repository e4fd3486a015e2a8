"""The suite's own guard: a hung async test or fixture fails with its tasks' stacks, on either
loop, and a run stuck where nothing can stop it ends."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import uvloop

from tests.conftest import guard, timeout

ROOT = Path(__file__).resolve().parent.parent


async def stuck_helper() -> None:
    await asyncio.Event().wait()


async def hung_test() -> None:
    helper = asyncio.create_task(stuck_helper(), name="the-helper")
    await asyncio.Event().wait()
    helper.cancel()


@pytest.mark.parametrize("new_loop", [asyncio.new_event_loop, uvloop.new_event_loop])
def test_a_hung_async_test_fails_in_time_with_every_task_stack(
    new_loop: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    with (
        asyncio.Runner(loop_factory=new_loop) as runner,
        pytest.raises(pytest.fail.Exception) as failed,
    ):
        runner.run(guard(hung_test(), 0.05))
    text = str(failed.value)
    assert text.startswith("timed out after 0.05 s")
    assert "in hung_test" in text
    assert "the-helper" in text and "in stuck_helper" in text


def test_a_test_that_ends_in_time_is_left_alone() -> None:
    async def quick() -> int:
        await asyncio.sleep(0)
        return 7

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(guard(quick(), 5.0)) == 7


async def swallowing_test() -> None:
    # Code under test that takes a cancel for its stop signal.
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.Event().wait()


def test_a_hung_test_fails_though_its_code_takes_the_cancel_for_a_stop() -> None:
    with (
        asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner,
        pytest.raises(pytest.fail.Exception, match=r"timed out after 0\.05 s"),
    ):
        runner.run(guard(swallowing_test(), 0.05))


PYTEST = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "asyncio_mode=auto"]
CONFTEST = """
from tests.conftest import (  # noqa: F401
    pytest_asyncio_loop_factories,
    pytest_configure,
    pytest_runtest_protocol,
    pytest_unconfigure,
)
"""
HUNG_TEARDOWN = """
import asyncio
import pytest


@pytest.fixture
async def stuck():
    yield
    await asyncio.Event().wait()


@pytest.mark.uvloop_only
async def test_whose_fixture_hangs_on_uvloop(stuck):
    pass


def test_after_it():
    pass
"""
UNSTOPPABLE = """
import asyncio
import uvloop


def test_on_a_loop_of_its_own():
    # Neither a Runner (which the guard wraps) nor anything SIGALRM can interrupt.
    uvloop.new_event_loop().run_until_complete(asyncio.Event().wait())
"""


def run_pytest(folder: Path, test: str, limit_s: int) -> subprocess.CompletedProcess[str]:
    (folder / "conftest.py").write_text(CONFTEST)
    (folder / "test_it.py").write_text(test)
    return subprocess.run(
        [*PYTEST, "--timeout", str(limit_s), "test_it.py"],
        cwd=folder,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        check=False,
        text=True,
        timeout=timeout(60),
    )


def test_an_async_fixture_hung_on_uvloop_fails_its_test_and_the_run_goes_on(
    tmp_path: Path,
) -> None:
    run = run_pytest(tmp_path, HUNG_TEARDOWN, 7)
    assert run.returncode == 1
    # The fixture's test passed, then its tear-down failed; the test after it ran.
    assert "2 passed" in run.stdout and "1 error" in run.stdout
    assert "ERROR at teardown of test_whose_fixture_hangs_on_uvloop" in run.stdout
    # The stack goes on from pytest-asyncio's finalizer into the fixture's own frame, through
    # the `__anext__` that steps it, down to the wait it hangs in.
    assert "timed out after 2 s" in run.stdout and "in async_finalizer" in run.stdout
    assert "in stuck\n    await asyncio.Event().wait()" in run.stdout


def test_a_run_stuck_where_nothing_can_stop_it_ends_with_every_stack(tmp_path: Path) -> None:
    run = run_pytest(tmp_path, UNSTOPPABLE, 2)
    assert run.returncode == 1
    assert "test_it.py::test_on_a_loop_of_its_own outlived its 2 s" in run.stderr
    assert "Thread 0x" in run.stderr and "most recent call first" in run.stderr
