from __future__ import annotations

import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from tickwire.bench.e2e_report import Step, breach, median_step
from tickwire.bench.e2e_run import Scenario
from tickwire.bench.floor import measure_floor
from tickwire.bench.harness import TICKWIRE, machine_cpu_seconds
from tickwire.bench.invariant import InvariantChecker
from tickwire.bench.load import concrete, spread_channels
from tickwire.bench.sink import EventCounter, SinkProtocol, count_events
from tickwire.bench.stats import histogram_quantile, latency_summary, ratio, server_share, table
from tickwire.core.redis_process import RedisProcess, TlsFiles, redis_cli
from tickwire.server.metrics import Metrics


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


def test_the_machine_figure_counts_this_process_working() -> None:
    before = machine_cpu_seconds()
    start = time.thread_time()
    while time.thread_time() - start < 0.3:
        pass
    # Other processes only add to it; a clock tick (10 ms) of rounding at each end.
    assert machine_cpu_seconds() - before >= 0.28


def test_plan_gives_every_channel_about_as_many_clients() -> None:
    plan = spread_channels(["a", "b", "c"], 4, 2)
    assert plan == [["a", "b"], ["c", "a"], ["b", "c"], ["a", "b"]]
    assert spread_channels(["a", "b"], 2, 5) == [["a", "b"], ["a", "b"]]  # at most every channel


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


def run_bench(tmp: str, options: str) -> tuple[subprocess.CompletedProcess[str], Any]:
    """`tickwire bench` with `options` and `--json`; its output and the JSON it wrote."""
    out = Path(tmp) / "bench.json"
    proc = subprocess.run(
        [TICKWIRE, "bench", *options.split(), "--json", out],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, orjson.loads(out.read_bytes())


def test_tls_runs_tickwire_over_wss_beside_ws_in_place_of_the_baseline() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        proc, doc = run_bench(
            tmp,
            "--tls --rate 500 --symbols 5 --clients 4 --channels-per-client 3 --duration 1.5 "
            "--warmup 0.5",
        )
    assert "tickwire: PASSED" in proc.stdout and "tickwire-tls: PASSED" in proc.stdout
    assert [r["target"] for r in doc["runs"]] == ["tickwire", "tickwire-tls"]
    for run in doc["runs"]:
        c = run["correctness"]
        assert c["sampled_events"] > 0 and c["lost"] == c["duplicates"] == 0
        # Read over HTTPS from the TLS server's /metrics, as over HTTP from the other's.
        assert run["server"]["read→write p99_us"] > 0
    assert "p99_us" in doc["ratios"]
    assert "tickwire-tls" in proc.stdout.splitlines()[0]  # the table's second column


def test_short_end_to_end_run_reports_correctness_for_both_targets() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "bench.png"
        proc, doc = run_bench(
            tmp,
            "--rate 500 --symbols 5 --clients 6 --channels-per-client 3 --duration 2 "
            f"--warmup 0.5 --sample-every 2 --rounds 2 --plot {png}",
        )
        assert png.read_bytes().startswith(b"\x89PNG")
    assert "tickwire: PASSED" in proc.stdout and "baseline: PASSED" in proc.stdout
    # Two rounds, the second in the other order; the table holds their medians.
    assert [r["target"] for r in doc["rounds"]] == ["tickwire", "baseline", "baseline", "tickwire"]
    assert "round 2: tickwire p50/p99/p99.9" in proc.stdout
    assert "medians of 2 rounds:" in proc.stdout
    assert [r["target"] for r in doc["runs"]] == ["tickwire", "baseline"]
    for run in doc["runs"]:
        c = run["correctness"]
        assert c["sampled_connections"] == 3
        assert c["sampled_events"] > 0
        assert c["lost"] == c["duplicates"] == c["tail_lost"] == 0
        assert run["latency"]["samples"] > 0
        assert set(run["figures"]) >= {"deliveries_per_s", "egress_MB_per_s", "frames_per_s"}
    assert "p99_us" in doc["ratios"] and doc["config"]["rate"] == 500
    tw = doc["runs"][0]
    # The server's own share comes from its /metrics; the baseline has none.
    assert tw["server"]["read→write p99_us"] > 0 and doc["runs"][1]["server"] == {}
    # Light sinks counted what the sampled connections parsed, give or take the window edges.
    assert tw["figures"]["deliveries_per_s"] > 0
    # Deliveries against what Redis says was published to the clients' channels in the window.
    assert 75 <= tw["figures"]["delivered_percent"] <= 125
    # From the event's venue time: the same events, each measured from earlier (the simulator
    # stamps `pt` once the event is due), so every percentile is at least the one from `pt`.
    for run in doc["runs"]:
        lat, since = run["latency"], run["from_event"]
        assert since["samples"] == lat["samples"] > 0
        assert all(since[k] >= lat[k] for k in ("p50_us", "p99_us", "p99.9_us"))
    assert "from event ts p99_us" in proc.stdout
    # Where the machine's time went: the feed took some (the 6 clients' load may take less than
    # a clock tick), and the machine (every process, a core = 100) at least the parts' sum, give
    # or take a clock tick per process and sample.
    for run in doc["runs"]:
        f = run["figures"]
        parts = [f[k] for k in ("server_cpu_percent", "feed_cpu_percent", "load_cpu_percent")]
        assert parts[1] > 0
        assert f["machine_cpu_percent"] >= sum(parts) - 10


def test_rounds_are_summed_up_by_medians_and_a_round_that_lost_fails_them_all() -> None:
    def step(p99: float, lost: int, violations: list[str]) -> Step:
        return Step(
            1000,
            latency={"p99_us": p99, "p50_us": p99 / 4},
            figures={"deliveries_per_s": p99 * 10},
            correctness={"lost": lost, "violations": violations, "sampled_connections": 3},
        )

    one = median_step([step(3000, 0, []), step(9000, 0, []), step(4000, 0, [])])
    assert one.latency == {"p99_us": 4000.0, "p50_us": 1000.0}
    assert one.figures == {"deliveries_per_s": 40000.0}
    assert one.passed and one.correctness["sampled_connections"] == 3  # per round, not summed
    bad = median_step([step(3000, 0, []), step(4000, 2, ["hole at 7", "hole at 9"])])
    assert not bad.passed
    assert bad.correctness["lost"] == 2 and bad.correctness["violations"] == [
        "hole at 7",
        "hole at 9",
    ]


def test_a_step_whose_clients_fall_behind_is_not_sustained() -> None:
    s = Scenario(1000, 5, 6, 3, 2, 0.5, 1, 1, 2, saturate=True)
    step = Step(1000)
    step.latency = {"p99_us": 1000.0}
    step.figures = {"events_published_per_s": 1000.0, "delivered_percent": 99.0}
    assert breach(step, s) is None
    step.figures["delivered_percent"] = 34.0
    assert breach(step, s) == "clients received 34% of what was published to them (the rest queued)"


def test_saturation_steps_up_until_a_limit_and_reports_the_highest_sustained_step() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        proc, doc = run_bench(
            tmp,
            "--saturate --target tickwire --rate 2000 --step-factor 2 --max-rate 5000 "
            "--symbols 4 --clients 4 --channels-per-client 2 --duration 1.5 --warmup 0.5 "
            "--sample-every 2 --max-p99-ms 10000",
        )
    (run,) = doc["runs"]
    # 2000 → 4000 sustained; 8000 is above --max-rate, so stepping stops there.
    assert [st["rate"] for st in run["steps"]] == [2000, 4000]
    assert all(st["correctness"]["lost"] == 0 for st in run["steps"])
    assert "highest sustained step" in proc.stdout and run["figures"] == run["steps"][1]["figures"]


def test_server_share_reads_histogram_deltas_from_two_scrapes() -> None:
    m = Metrics()
    m.read_to_write.observe(0.00002, 10)
    before = m.render()
    m.read_to_write.observe(0.0003, 98)
    m.read_to_write.observe(0.0045, 2)
    share = server_share(before, m.render())
    # Only the 100 observations between the scrapes count, interpolated inside their bucket:
    # the 50th of 98 in (250, 300] µs, the 99th (1st of 2) in (4, 5] ms.
    assert share["read→write p50_us"] == pytest.approx(250 + 50 * 50 / 98)
    assert share["read→write p99_us"] == pytest.approx(4500)
    assert histogram_quantile([1.0], [0], 0.5) != histogram_quantile([1.0], [0], 0.5)  # NaN


def server_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    n = len(payload)
    b0 = 0x80 * fin | opcode
    if n < 126:
        head = bytes((b0, n))
    elif n < 65536:
        head = bytes((b0, 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((b0, 127)) + n.to_bytes(8, "big")
    return head + payload


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def unmask(frame: bytes) -> tuple[int, bytes]:
    n = frame[1] & 0x7F
    mask, payload = frame[2:6], frame[6 : 6 + n]
    return frame[0] & 0x0F, bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def keeper(into: list[bytes]) -> Callable[[bytes, int], None]:
    return lambda payload, _now: into.append(payload)


async def test_sink_counts_frames_bytes_and_events_across_any_split_and_answers_pings() -> None:
    events = [b'{"type":"events","ch":"t:A","events":[%s]}' % b",".join(
        b'{"seq":%d,"p":"1.5"}' % i for i in range(k)) for k in (1, 3, 40, 700)]  # fmt: skip
    stream = b"".join(
        [
            server_frame(0x1, events[0]),
            server_frame(0x9, b"hi"),  # ping between data frames
            server_frame(0x1, events[1]),
            server_frame(0x1, events[2]),  # 126-length form
            server_frame(0x1, events[3]),  # > 64 KiB? no: 16-bit form unless larger
            server_frame(0x1, b"x" * 70_000),  # 64-bit length form, no events
            # One message in three frames, a ping among them; a marker across a frame border.
            server_frame(0x1, events[2][:-18], fin=False),
            server_frame(0x9, b"mid"),
            server_frame(0x0, events[2][-18:-9], fin=False),
            server_frame(0x0, events[2][-9:]),
        ]
    )
    payloads = [*events, b"x" * 70_000, events[2]]
    shared = EventCounter(min_bytes=0)  # remembers whole payloads across the sinks below
    for split, counter in [(n, shared) for n in (1, 2, 7, 100, 4096, len(stream))] + [
        (len(stream), count_events)
    ]:
        got: list[bytes] = []
        sink = SinkProtocol("h", "/ws", b'{"op":"subscribe"}', keeper(got), counter)
        t = FakeTransport()
        sink.connection_made(t)  # type: ignore[arg-type]
        sink.data_received(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
        await sink.opened
        for i in range(0, len(stream), split):
            sink.data_received(stream[i : i + split])
        # Frames are counted alone: the marker split over two counts in neither (a server
        # never splits an event), so 39 of the 40.
        fragmented = sum(count_events(events[2][a:b]) for a, b in ((0, -18), (-18, -9), (-9, None)))
        assert fragmented == 39
        assert (sink.frames, sink.bytes, sink.events) == (6, len(stream), 744 + fragmented), split
        assert got == payloads, split
        assert unmask(t.written[1]) == (0x1, b'{"op":"subscribe"}')
        assert unmask(t.written[2]) == (0xA, b"hi")
        assert unmask(t.written[3]) == (0xA, b"mid")
        sink.data_received(server_frame(0x8, (4008).to_bytes(2, "big") + b"slow"))
        assert sink.close_code == 4008 and t.closed


def test_the_event_counter_is_exact_whether_payloads_repeat_or_not() -> None:
    def payload(i: int, k: int) -> bytes:
        return b'{"type":"events","ch":"t:%d","events":[%s]}' % (
            i,
            b",".join(b'{"seq":%d}' % j for j in range(k)),
        )

    counter = EventCounter(capacity=64, min_bytes=0, max_bytes=1000)
    # A broadcast: the same frames again and again; then frames that never repeat (past the
    # byte bound, and past the point where it stops looking them up); then repeats again.
    phases = [
        [payload(i % 5, i % 5 + 1) for i in range(3000)],
        [payload(i, i % 7) for i in range(3000)],
        [payload(i % 3, 2) for i in range(12_000)],
    ]
    hits = []
    for frames in phases:
        assert [counter(f) for f in frames] == [f.count(b'"seq":') for f in frames]
        hits.append(counter.hits)
    assert hits[0] > 2900 and hits[1] - hits[0] < 100 and hits[2] - hits[1] > 2900
    # Payloads alike in length, head and tail but not within: each counted for itself, also
    # inside a larger buffer.
    head, tail = b"h" * 40, b"t" * 40
    alike = [head + b'"seq":1,' * k + b"x" * (8 * (9 - k)) + tail for k in (1, 5, 9)]
    assert len({len(a) for a in alike}) == 1
    buf = b"~~" + b"".join(alike) + b"~~"
    counter = EventCounter(min_bytes=0)
    for _ in range(3):
        assert [counter(a) for a in alike] == [1, 5, 9]
        at = [2 + i * len(alike[0]) for i in range(3)]
        assert [counter(buf, s, s + len(alike[0])) for s in at] == [1, 5, 9]


def test_publish_ceiling_row_says_when_redis_benchmark_is_missing(monkeypatch: Any) -> None:
    import shutil

    from tickwire.bench import publish

    monkeypatch.setattr(shutil, "which", lambda name: None)
    row = publish.run_ceiling("redis://127.0.0.1:1/0", 1000, 200, 190)
    assert row.rate == 0 and "redis-benchmark is not installed" in row.note


def test_publish_ceiling_reaches_redis_as_tickwire_does_over_tls_with_a_password(
    tls_files: TlsFiles,
) -> None:
    from tickwire.bench import publish

    with RedisProcess(tls=tls_files) as proc:
        redis_cli(proc.port, "CONFIG", "SET", "requirepass", "s3cret")  # once it answered
        url = proc.tls_url(query=f"ssl_ca_certs={tls_files.ca}").replace("//", "//:s3cret@", 1)
        row = publish.run_ceiling(url, 2000, 20, 100)
        assert row.events == 2000 and row.rate > 0
        assert int(redis_cli(proc.port, "DBSIZE", password="s3cret")) > 0  # its streams


def test_patterns_in_a_plan_expand_to_the_known_channels_they_cover() -> None:
    known = ["quotes:AAPL", "trades:AAPL", "quotes:MSFT"]
    assert concrete(["quotes:*"], known) == ["quotes:AAPL", "quotes:MSFT"]
    assert concrete(["trades:AAPL", "quotes:*"], known) == [
        "trades:AAPL", "quotes:AAPL", "quotes:MSFT"
    ]  # fmt: skip
    assert concrete(["trades:MSFT"], known) == ["trades:MSFT"]


def test_short_throttle_run_compares_throttled_clients_with_live_ones() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        proc, doc = run_bench(
            tmp,
            "throttle --max-hz 4 --clients 8 --rate 300 --symbols 4 --duration 2 --warmup 0.5 "
            "--load-processes 1 --sample-every 2",
        )
    assert "correctness: PASSED" in proc.stdout and doc["passed"]
    rows = doc["rows"]
    # 4 quote channels at 4 Hz: at most ~16 messages a second per client, far fewer deliveries.
    assert rows["deliveries/s"]["throttled"] < rows["deliveries/s"]["live"]
    assert rows["deliveries/s"]["throttled"] <= 8 * 4 * 4 * 1.5
    assert doc["view_age_samples"]["throttled"] > 0 and doc["view_age_samples"]["live"] > 0
    # A throttled view is about 1/max_hz old when it moves, never much more.
    assert 100 < rows["view age p99 ms"]["throttled"] < 1000
    for run in doc["correctness"].values():
        assert run["lost"] == run["duplicates"] == run["tail_lost"] == 0


def test_the_floor_relays_every_timestamp_through_its_hops() -> None:
    floor = measure_floor(hops=2, rate=200, seconds=1.0)
    # All arrive (loopback TCP loses nothing); the first fifth is left out of the percentiles.
    assert floor.sent == floor.received == 200
    assert floor.samples == 160
    assert 0 < floor.p50_us <= floor.p90_us <= floor.p99_us
