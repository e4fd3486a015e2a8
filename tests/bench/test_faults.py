from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import orjson

from tickwire.bench.harness import TICKWIRE


def test_faults_bench_runs_scenarios_and_reports_correctness() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "faults.json"
        # Tiny: two clients, six storm clients, half-second phases; the cheap scenarios (the
        # slow consumer needs volume: tests/server/test_server.py covers it).
        proc = subprocess.run(
            [
                TICKWIRE,
                "bench",
                "faults",
                "--scale",
                "0.02",
                "--rate",
                "300",
                "--steady",
                "0.5",
                "--hold",
                "0.5",
                "--only",
                "proxy-reset,storm,worker-kill,redis-kill-aof",
                "--json",
                str(out),
            ],
            check=False,
            capture_output=True,
            text=True,
            cwd=tmp,
            timeout=150,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        doc = orjson.loads(out.read_bytes())
    assert "scenario" in proc.stdout and "lost silently" in proc.stdout
    assert "[1/4] proxy-reset" in proc.stderr and "[2/4] storm" in proc.stderr
    rows = {s["scenario"]: s for s in doc["scenarios"]}
    assert set(rows) == {"proxy-reset", "storm", "worker-kill", "redis-kill-aof"}
    for row in rows.values():
        assert row["correct"] is True, row
        assert row["lost_silently"] == 0 and row["duplicates"] == 0 and not row["problems"]
        assert row["published"] > 0 and row["delivered"] > 0
        assert {"gaps", "resets", "recover_s", "verdict"} <= set(row)
    # What each fault did, not how fast: the resets happened, every client was told and came back.
    reset = rows["proxy-reset"]
    assert reset["notes"]["proxy"]["resets"] >= 2
    assert reset["notes"]["clients_told_down_up"] == reset["clients"]
    assert rows["storm"]["notes"]["resumed"] == rows["storm"]["notes"]["dropped"] > 0
    killed = rows["worker-kill"]["notes"]
    assert killed["clients_reconnected"] == killed["clients_on_killed_worker"] > 0
    assert killed["workers_after"] == 2
    aof = rows["redis-kill-aof"]["notes"]
    assert aof["clients_told_down_up"] == rows["redis-kill-aof"]["clients"]


def test_faults_bench_rejects_an_unknown_scenario() -> None:
    proc = subprocess.run(
        [TICKWIRE, "bench", "faults", "--only", "nope"],
        check=False,
        capture_output=True,
        text=True,
        cwd=tempfile.gettempdir(),
        timeout=30,
    )
    assert proc.returncode == 2 and "unknown scenario" in proc.stderr
