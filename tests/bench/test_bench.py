from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from tickwire.bench.invariant import InvariantChecker
from tickwire.bench.stats import latency_summary, ratio, table


def ev(seq: int, epoch: str = "e") -> dict[str, object]:
    return {"seq": seq, "epoch": epoch, "pt": 0}


def test_latency_summary_is_exact_over_all_samples() -> None:
    ns = np.arange(1, 100_001, dtype=np.int64) * 1000  # 1..100000 us
    s = latency_summary(ns)
    assert s["samples"] == 100_000
    assert abs(s["p50_us"] - 50_000.5) < 1
    assert abs(s["p99_us"] - 99_000) < 2
    assert abs(s["p99.9_us"] - 99_900) < 2
    assert s["max_us"] == 100_000
    assert latency_summary(np.array([], dtype=np.int64))["samples"] == 0


def test_ratio_table_prints_ratios_and_dashes() -> None:
    text = table([("latency p99_us", 500.0, 1000.0), ("lost", 0, 0)], ("tickwire", "baseline"))
    assert "0.50x" in text.splitlines()[1]
    assert text.splitlines()[2].rstrip().endswith("-")
    assert ratio(1.0, 0.0) is None and ratio(3.0, 2.0) == 1.5


def test_invariant_checker_flags_holes_duplicates_and_accepts_announced_gaps() -> None:
    ok = InvariantChecker()
    messages: list[dict[str, Any]] = [
        {"type": "events", "ch": "t:A", "epoch": "e", "events": [ev(1), ev(2)]},
        {"type": "gap", "ch": "t:A", "from_seq": 3, "to_seq": 5, "reason": "trimmed"},
        {"type": "events", "ch": "t:A", "epoch": "e", "events": [ev(6)]},
        {"type": "reset", "ch": "t:A", "epoch": "f"},
        {"type": "events", "ch": "t:A", "epoch": "f", "events": [ev(1, "f")]},
    ]
    for m in messages:
        ok.feed(m)
    assert ok.ok and ok.delivered == 4 and ok.gap_events == 3 and ok.resets == 1
    bad = InvariantChecker()
    bad.feed({"type": "events", "ch": "t:A", "epoch": "e", "events": [ev(1), ev(3), ev(3)]})
    bad.feed({"type": "events", "ch": "t:A", "epoch": "x", "events": [ev(4, "x")]})
    assert bad.lost == 1 and bad.duplicates == 1 and len(bad.violations) == 3


def test_short_end_to_end_run_reports_correctness_for_both_targets() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        proc = subprocess.run(
            [
                str(Path(sys.executable).parent / "tickwire"),
                "bench",
                "--rate",
                "500",
                "--symbols",
                "5",
                "--clients",
                "6",
                "--channels-per-client",
                "3",
                "--duration",
                "2",
                "--warmup",
                "0.5",
                "--sample-every",
                "2",
                "--json",
                str(out),
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        doc = orjson.loads(out.read_bytes())
    assert "tickwire: PASSED" in proc.stdout and "baseline: PASSED" in proc.stdout
    assert [r["target"] for r in doc["runs"]] == ["tickwire", "baseline"]
    for run in doc["runs"]:
        c = run["correctness"]
        assert c["sampled_connections"] == 3
        assert c["sampled_events"] > 0
        assert c["lost"] == c["duplicates"] == c["tail_lost"] == 0
        assert run["latency"]["samples"] > 0
        assert set(run["figures"]) >= {"deliveries_per_s", "egress_MB_per_s", "frames_per_s"}
    assert "p99_us" in doc["ratios"] and doc["config"]["rate"] == 500
