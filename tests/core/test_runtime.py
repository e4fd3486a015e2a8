"""GC tuning for the long-running processes."""

from __future__ import annotations

import gc
import resource
import subprocess
import sys

from tickwire.core.runtime import GC_THRESHOLD, tune_gc


def test_tune_gc_raises_the_young_threshold_and_freezes_what_exists() -> None:
    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == (GC_THRESHOLD, *before[1:])
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_open_files_soft_limit_is_raised_to_the_hard_limit() -> None:
    # In a child that starts with a low soft limit, so this process's limit stays as it was.
    script = (
        "import resource\n"
        "from tickwire.core.runtime import raise_open_files_limit\n"
        "got = raise_open_files_limit()\n"
        "print(*got, *resource.getrlimit(resource.RLIMIT_NOFILE))\n"
    )
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)),
    ).stdout.split()
    assert [int(x) for x in out] == [hard] * 4
