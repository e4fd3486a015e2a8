"""Throttle bench: clients on `quotes:*` at `max_hz` against the same clients unthrottled.

    tickwire bench throttle [--max-hz 4] [--clients 1000] [--rate 500] [--symbols 20]
                            [--duration 6] [--warmup 2] [--load-processes 2]
                            [--sample-every 50] [--json FILE]

Starts a private Redis and runs one scenario twice in the same process tree, one run after the
other: every client subscribes `quotes:*`, first unthrottled, then with `max_hz`. Both runs get
the same simulated feed. Reports the server's CPU and the deliveries of each run and their ratio,
the publish → receive latency of the events delivered, and the age of each sampled client's view
of a channel when a message updated it: receive time minus the publish time of the oldest event
the message covered, the ones it skipped included (one extra unthrottled client of the throttled
run records those). The throttle's promise is that this age stays under 1/max_hz plus the
unthrottled p99 latency; the bench says whether it held at p99 and at the maximum.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import orjson

from tickwire.bench.e2e_report import Run
from tickwire.bench.e2e_run import Scenario, conn_flush, run_target
from tickwire.bench.stats import ratio
from tickwire.core.argtypes import count, positive, rate, seconds, seconds_or_none
from tickwire.core.redis_process import RedisProcess


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tickwire bench throttle",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("--max-hz", type=positive, default=4.0, help="the throttled rate (default 4)")
    p.add_argument("--clients", type=count, default=1000, help="WebSocket clients (default 1000)")
    p.add_argument("--rate", type=rate, default=500, help="events/s published (default 500)")
    p.add_argument(
        "--symbols", type=count, default=20, help="symbols, one quote channel each (default 20)"
    )
    p.add_argument("--duration", type=seconds, default=6, help="measured seconds (default 6)")
    p.add_argument(
        "--warmup", type=seconds_or_none, default=2, help="seconds before measuring (default 2)"
    )
    p.add_argument(
        "--load-processes", type=count, default=2, help="client load processes (default 2)"
    )
    p.add_argument(
        "--sample-every",
        type=count,
        default=50,
        help="parse and check every Nth connection fully (default 50)",
    )
    p.add_argument("--json", help="write every figure and the configuration to this file")
    return p


def summary(live: Run, throttled: Run, max_hz: float) -> dict[str, Any]:
    """The figures of both runs side by side, and whether the view-age promise held."""
    a, b = live.result, throttled.result
    bound_us = 1e6 / max_hz + a.latency["p99_us"]
    rows: dict[str, tuple[float, float]] = {
        "deliveries/s": (a.figures["deliveries_per_s"], b.figures["deliveries_per_s"]),
        "frames/s": (a.figures["frames_per_s"], b.figures["frames_per_s"]),
        "egress MB/s": (a.figures["egress_MB_per_s"], b.figures["egress_MB_per_s"]),
        "server CPU %": (a.figures["server_cpu_percent"], b.figures["server_cpu_percent"]),
        "machine CPU %": (a.figures["machine_cpu_percent"], b.figures["machine_cpu_percent"]),
        "latency p50 ms": (a.latency["p50_us"] / 1000, b.latency["p50_us"] / 1000),
        "latency p99 ms": (a.latency["p99_us"] / 1000, b.latency["p99_us"] / 1000),
        "view age p50 ms": (a.view_age["p50_us"] / 1000, b.view_age["p50_us"] / 1000),
        "view age p99 ms": (a.view_age["p99_us"] / 1000, b.view_age["p99_us"] / 1000),
        "view age max ms": (a.view_age["max_us"] / 1000, b.view_age["max_us"] / 1000),
    }
    return {
        "rows": {
            k: {"live": v[0], "throttled": v[1], "ratio": ratio(v[1], v[0])}
            for k, v in rows.items()
        },
        "bound_ms": bound_us / 1000,
        "p99_within_bound": b.view_age["p99_us"] <= bound_us,
        "max_within_bound": b.view_age["max_us"] <= bound_us,
        "view_age_samples": {"live": a.view_age["samples"], "throttled": b.view_age["samples"]},
        "correctness": {"live": a.correctness, "throttled": b.correctness},
        "passed": live.passed and throttled.passed,
    }


def render(doc: dict[str, Any], max_hz: float) -> str:
    lines = [f"{'figure':20} {'live':>12} {f'max_hz {max_hz:g}':>12} {'ratio':>8}"]
    for name, row in doc["rows"].items():
        r = row["ratio"]
        lines.append(
            f"{name:20} {row['live']:>12,.1f} {row['throttled']:>12,.1f}"
            f" {f'{r:.3f}x' if r is not None else '-':>8}"
        )
    lines.append(
        f"bound 1/max_hz + live p99 = {doc['bound_ms']:.1f} ms: throttled view age p99 "
        f"{'within' if doc['p99_within_bound'] else 'OVER'}, max "
        f"{'within' if doc['max_within_bound'] else 'OVER'}"
    )
    lines.append(f"correctness: {'PASSED' if doc['passed'] else 'FAILED'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_hz <= 0:
        raise SystemExit("--max-hz must be above 0")
    base = Scenario(
        rate=args.rate,
        symbols=args.symbols,
        clients=args.clients,
        channels_per_client=1,
        duration=args.duration,
        warmup=args.warmup,
        workers=1,
        load_processes=args.load_processes,
        sample_every=args.sample_every,
        patterns=("quotes:*",),
    )
    print(
        f"bench throttle: {args.rate:,.0f} events/s over {args.symbols} symbols, "
        f"{args.clients} clients on quotes:*, live then max_hz {args.max_hz:g}, "
        f"{args.warmup:g}+{args.duration:g} s each",
        file=sys.stderr,
    )
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="tickwire-bench-throttle-") as tmp:
        redis = RedisProcess().start()
        try:
            for name, hz in (("live", None), ("throttled", args.max_hz)):
                workdir = Path(tmp) / name
                workdir.mkdir()
                conn_flush(redis.url)
                s = Scenario(**{**vars(base), "max_hz": hz})
                runs.append(run_target("tickwire", s, redis.url, workdir))
        finally:
            redis.stop()
    doc = summary(runs[0], runs[1], args.max_hz)
    doc["config"] = vars(args)
    print(render(doc, args.max_hz))
    text = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    print(text.decode())
    if args.json:
        Path(args.json).write_bytes(text + b"\n")
    return 0 if doc["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
