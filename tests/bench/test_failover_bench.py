"""`tickwire bench failover` at a tiny scale: a master killed with its replica behind."""

from __future__ import annotations

import subprocess
from pathlib import Path

import orjson

from tickwire.bench.harness import TICKWIRE


def test_failover_bench_loses_writes_and_reports_every_one_covered(tmp_path: Path) -> None:
    out = tmp_path / "failover.json"
    proc = subprocess.run(
        [
            TICKWIRE,
            "bench",
            "failover",
            "--node-timeout-ms",
            "1000",
            "--rate",
            "600",
            "--warmup",
            "1",
            "--after",
            "0.5",
            "--behind",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    doc = orjson.loads(out.read_bytes())
    figures = doc["figures"]
    assert doc["passed"] is True
    assert figures["seen_then_lost"] > 0  # the replica really was behind
    assert figures["lost_without_reset"] == 0 and figures["seq_naming_two_events"] == 0
    assert figures["resets_dead_shard"] > 0 and figures["resets_other_shards"] == 0
    assert 0 < figures["promotion_s"] < 60
