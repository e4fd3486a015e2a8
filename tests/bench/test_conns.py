from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import orjson

from tickwire.bench.harness import TICKWIRE

ARGS = (
    "--clients 50 --workers 2 --load-processes 2 --symbols 5 --duration 2 --warmup 0.5 --jitter 0.5"
)


def test_a_small_connection_scale_run_resumes_every_client_and_loses_nothing() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "conns.json"
        proc = subprocess.run(
            [TICKWIRE, "bench", "conns", *ARGS.split(), "--timeout", "30", "--json", str(out)],
            check=False,
            capture_output=True,
            text=True,
            timeout=90,
            cwd=tmp,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        doc = orjson.loads(out.read_bytes())
    f = doc["figures"]
    assert doc["passed"] and "PASSED" in proc.stdout
    # Every client was restarted on (the storm), came back and resumed.
    assert f["connections_held"] == f["resumed"] == f["reconnected"] == f["connected"] == 50
    # Both workers took connections (SO_REUSEPORT).
    assert len(f["connections_per_worker"]) == 2 and sum(f["connections_per_worker"]) == 50
    assert f["lost"] == f["duplicates"] == f["gaps"] == 0
    assert f["event_latency"]["samples"] > 0 and f["handshakes_per_s"] > 0
    assert f["rss_subscribed_KiB_per_conn"] > 0
