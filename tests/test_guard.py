"""The suite's own guard: a hung async test fails with its tasks' stacks, on either loop."""

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

from tests.conftest import guarded, timeout

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
        runner.run(guarded(hung_test, 0.05)())
    text = str(failed.value)
    assert text.startswith("timed out after 0.05 s")
    assert "in hung_test" in text
    assert "the-helper" in text and "in stuck_helper" in text


def test_a_test_that_ends_in_time_is_left_alone() -> None:
    async def quick() -> int:
        await asyncio.sleep(0)
        return 7

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(guarded(quick, 5.0)()) == 7


async def swallowing_test() -> None:
    # Code under test that takes a cancel for its stop signal.
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.Event().wait()


def test_a_hung_test_fails_though_its_code_takes_the_cancel_for_a_stop() -> None:
    with (
        asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner,
        pytest.raises(pytest.fail.Exception, match=r"timed out after 0\.05 s"),
    ):
        runner.run(guarded(swallowing_test, 0.05)())


PYTEST = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider"]
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
"""


def test_a_run_stuck_where_nothing_can_stop_it_ends_with_every_stack(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(
        "from tests.conftest import (  # noqa: F401\n"
        "    pytest_asyncio_loop_factories, pytest_runtest_call, pytest_runtest_protocol\n"
        ")\n"
    )
    (tmp_path / "test_stuck.py").write_text(HUNG_TEARDOWN)
    run = subprocess.run(
        [*PYTEST, "-o", "asyncio_mode=auto", "--timeout", "2", "test_stuck.py"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        check=False,
        text=True,
        timeout=timeout(60),
    )
    assert run.returncode == 1
    assert "test_stuck.py::test_whose_fixture_hangs_on_uvloop outlived its 2 s" in run.stderr
    assert "Thread 0x" in run.stderr and "most recent call first" in run.stderr
