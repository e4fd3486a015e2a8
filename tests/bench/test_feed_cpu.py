from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from tickwire.bench.feed_cpu import main


def test_the_feed_bench_reads_the_feed_and_its_floor_over_the_same_window(tmp_path: Path) -> None:
    out = tmp_path / "feed.json"
    args = ["--rate", "2000", "--symbols", "5", "--duration", "1", "--warmup", "0.5"]
    assert main([*args, "--json", str(out)]) == 0
    doc = orjson.loads(out.read_bytes())
    feed, floor = doc["feed"], doc["floor"]
    # Both worked in the window: CPU spent, and Redis counted their calls.
    assert feed["cpu_percent"] > 0 and feed["calls_per_s"] > 0
    assert floor["cpu_percent"] > 0 and floor["calls_per_s"] > 0
    # The floor releases at most once per 1 ms tick.
    assert floor["calls_per_s"] <= 1000 * 1.05
    per_call = feed["cpu_percent"] * 1e4 / feed["calls_per_s"]
    assert feed["cpu_us_per_call"] == pytest.approx(per_call)
    assert doc["feed_per_release_vs_floor"] == pytest.approx(
        feed["cpu_us_per_call"] / floor["cpu_us_per_call"]
    )


def test_a_feed_that_cannot_start_ends_the_bench_saying_why(tmp_path: Path) -> None:
    failing = tmp_path / "tickwire"
    failing.write_text("#!/bin/sh\necho 'no Redis here' >&2\nexit 2\n")
    failing.chmod(0o755)
    with pytest.raises(SystemExit, match="exited with 2 during the warm-up"):
        main(["--duration", "1", "--warmup", "1", "--tickwire", str(failing)])
    # A rate no feed can run at is refused before any starts.
    with pytest.raises(SystemExit) as refused:
        main(["--rate", "-5"])
    assert refused.value.code == 2
    with pytest.raises(SystemExit, match=r"cannot run .*missing: No such file"):
        main(["--duration", "1", "--warmup", "1", "--tickwire", str(tmp_path / "missing")])
