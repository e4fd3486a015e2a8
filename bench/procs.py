"""The benches' child processes: started in their own group, stopped as a group, and read from /proc."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO


def start_group(cmd: list[str], log: IO[bytes]) -> subprocess.Popen[bytes]:
    """Start `cmd` in a process group of its own, output to `log`."""
    # cwd elsewhere: from the repo root, `python -m` would import the source folder, not the package.
    return subprocess.Popen(
        cmd, stdout=log, stderr=log, cwd=tempfile.gettempdir(), start_new_session=True
    )


def stop_group(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM the process's group, SIGKILL it if it has not exited within `grace_s`."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def children(pid: int) -> list[int]:
    """Direct children of `pid` (e.g. the workers of `tickwire serve --workers N`)."""
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time of these processes and their direct children."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        for p in [pid, *children(pid)]:
            try:
                fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick
            except (OSError, IndexError, ValueError):
                pass
    return total


def machine_cpu_seconds() -> float:
    """CPU seconds the whole machine has been busy (every core, every process) since boot."""
    # /proc/stat's first line: user nice system idle iowait irq softirq steal … in clock ticks.
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    busy = sum(fields) - fields[3] - fields[4]
    return busy / os.sysconf("SC_CLK_TCK")


def rss_mb(pids: Sequence[int]) -> float:
    """Resident memory of these processes, in MiB."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (OSError, ValueError):
            pass
    return total / 1024
