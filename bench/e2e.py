"""End-to-end bench: publish → client receive latency and fan-out throughput, against a baseline.

    tickwire bench [--rate 10000] [--symbols 100] [--clients 100] [--channels-per-client 10]
                   [--duration 30] [--warmup 5] [--workers 1] [--target both] [--rounds 1]
                   [--saturate] [--tls] [--json FILE] [--plot FILE.png]

Starts a private Redis, the server under test (tickwire, then the naive baseline of
`tickwire.bench.baseline`), client load in separate processes and the simulator as publisher;
runs the same scenario against each, then prints one table with the ratios tickwire/baseline.
`--saturate` raises the rate step by step until p99, loss, the publisher or delivery gives out
(clients receiving under 90 % of what was published to them: the rest is queueing somewhere), and
reports the highest sustained step. A run in which any sampled connection saw a duplicate or an
unannounced hole is FAILED. `--tls` compares tickwire over `wss://` with tickwire over `ws://`
instead.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import orjson

from tickwire.bench.e2e_report import Run, json_report, median_step, plot, report, rounds_report
from tickwire.bench.e2e_run import TLS_TARGET, Scenario, conn_flush, run_target
from tickwire.bench.floor import Floor, measure_floor
from tickwire.bench.harness import self_signed_pem
from tickwire.core.argtypes import count, positive, rate, seconds, seconds_or_none
from tickwire.core.redis_process import RedisCluster, RedisProcess


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tickwire bench",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="`tickwire bench publish --help`: the publish-throughput bench; "
        "`tickwire bench faults --help`: the fault scenarios; "
        "`tickwire bench conns --help`: connections per box and a reconnect storm; "
        "`tickwire bench throttle --help`: max_hz subscriptions against unthrottled ones.",
    )
    p.add_argument("--rate", type=rate, default=10_000, help="events/s published (default 10000)")
    p.add_argument(
        "--symbols", type=count, default=100, help="symbols (2 channels each; default 100)"
    )
    p.add_argument("--clients", type=count, default=100, help="WebSocket clients (default 100)")
    p.add_argument(
        "--channels-per-client",
        type=count,
        default=10,
        help="channels each client subscribes (default 10)",
    )
    p.add_argument("--duration", type=seconds, default=30, help="measured seconds (default 30)")
    p.add_argument(
        "--warmup", type=seconds_or_none, default=5, help="seconds before measuring (default 5)"
    )
    p.add_argument("--workers", type=count, default=1, help="tickwire server processes (default 1)")
    p.add_argument(
        "--target",
        choices=("tickwire", "baseline", "both"),
        default="both",
        help="what to measure (default both: tickwire, then the naive baseline, same load)",
    )
    p.add_argument(
        "--load-processes", type=count, default=1, help="client load processes (default 1)"
    )
    p.add_argument(
        "--sample-every",
        type=count,
        default=1,
        help="parse and check every Nth connection fully (default 1: all)",
    )
    p.add_argument(
        "--rounds",
        type=count,
        default=1,
        help="measure each target this many times, alternating which goes first, and report "
        "the median of each figure (default 1; one run is noisy on a small machine)",
    )
    p.add_argument("--redis", help="use this Redis (FLUSHALL'd!) instead of a private one")
    p.add_argument(
        "--cluster",
        action="store_true",
        help="run on a private Redis Cluster (3 masters, 3 replicas) instead of one Redis; "
        "tickwire only (the baseline's multi-stream XREAD cannot run on a cluster)",
    )
    p.add_argument(
        "--url", help="measure an already running server (ws://…/ws) instead of starting one"
    )
    p.add_argument(
        "--tls",
        action="store_true",
        help="measure tickwire serving wss:// (a throwaway self-signed certificate) against "
        "tickwire serving ws://, in place of the baseline: what TLS costs",
    )
    p.add_argument(
        "--floor",
        action="store_true",
        help="also time a timestamp relayed through 3 loopback processes with no work (the "
        "hops of feed → Redis → server → client) and print latency against that floor",
    )
    p.add_argument("--json", help="write every figure, the configuration and versions to this file")
    p.add_argument(
        "--plot", metavar="FILE.png", help="draw the latency percentile curve of both targets"
    )
    sat = p.add_argument_group("saturation")
    sat.add_argument(
        "--saturate",
        action="store_true",
        help="step the rate up from --rate (each step --warmup + --duration s) until a limit "
        "breaks (p99 over --max-p99-ms, loss, the feed 10%% short, or clients receiving "
        "under 90%% of what was published to them); report the highest sustained step",
    )
    sat.add_argument(
        "--step-factor", type=positive, default=1.5, help="rate multiplier per step (default 1.5)"
    )
    sat.add_argument(
        "--max-rate", type=rate, default=1e7, help="stop stepping above this rate (default 1e7)"
    )
    sat.add_argument(
        "--max-p99-ms",
        type=positive,
        default=50.0,
        help="a step whose p99 exceeds this is not sustained (default 50 ms)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    s = Scenario(
        args.rate,
        args.symbols,
        args.clients,
        args.channels_per_client,
        args.duration,
        args.warmup,
        args.workers,
        args.load_processes,
        args.sample_every,
        args.url,
        args.saturate,
        args.max_rate,
        args.step_factor,
        args.max_p99_ms,
    )
    if s.step_factor <= 1:
        raise SystemExit("--step-factor must be above 1")
    if args.cluster and (args.redis or args.target != "tickwire"):
        raise SystemExit("--cluster starts its own cluster and needs --target tickwire")
    if args.rounds < 1 or (args.rounds > 1 and s.saturate):
        raise SystemExit("--rounds must be 1 or more, and 1 with --saturate")
    targets = ["tickwire", "baseline"] if args.target == "both" else [args.target]
    if args.tls:
        if args.url or args.target == "baseline":
            raise SystemExit("--tls starts tickwire itself: not with --url or --target baseline")
        targets = ["tickwire", TLS_TARGET]
    if args.url:
        targets = targets[:1]
    print(
        f"bench: {'from ' if s.saturate else ''}{s.rate:,.0f} events/s, {s.symbols} symbols, "
        f"{s.clients} clients x {s.channels_per_client} channels, "
        f"{s.warmup:g}+{s.duration:g} s per {'step' if s.saturate else 'target'}",
        file=sys.stderr,
    )
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="tickwire-bench-") as tmp:
        if args.tls:
            s = replace(s, tls_cert=str(self_signed_pem(Path(tmp) / "bench-tls.pem")))
        redis: RedisProcess | RedisCluster | None = None
        if args.cluster:
            redis = RedisCluster().start()
        elif not args.redis:
            redis = RedisProcess().start()
        url = args.redis or (redis.url if redis else "")
        try:
            for i in range(args.rounds):
                # Alternate which target goes first: the machine's drift over the run falls on
                # both alike.
                for target in targets if i % 2 == 0 else targets[::-1]:
                    if args.rounds > 1:
                        print(f"round {i + 1}/{args.rounds}: {target}", file=sys.stderr)
                    conn_flush(url)
                    runs.append(run_target(target, s, url, Path(tmp)))
        finally:
            if redis is not None:
                redis.stop()
        rounds = runs
        if args.rounds > 1:
            print(rounds_report(runs))
            print(f"medians of {args.rounds} rounds:")
            runs = [
                Run(t, s, [median_step([r.result for r in rounds if r.target == t])])
                for t in targets
            ]
        print(report(runs))
        floor = None
        if args.floor:
            # At most one message a millisecond: the feed releases at most once per tick.
            floor = measure_floor(hops=3, rate=min(s.rate, 1000.0), seconds=min(s.duration, 8.0))
            print(floor_line(floor, runs))
        if args.plot:
            plot(rounds, args.plot)
            print(f"plot: {args.plot}", file=sys.stderr)
    if args.json:
        doc = json_report(vars(args), runs, rounds)
        if floor is not None:
            doc["floor"] = asdict(floor)
        Path(args.json).write_bytes(
            orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
        )
    return 0 if all(r.passed for r in rounds) else 1


def floor_line(floor: Floor, runs: list[Run]) -> str:
    """The floor, and each target's latency p50 as a multiple of it."""
    line = (
        f"floor: a timestamp through {floor.hops} loopback hops with no work, "
        f"{floor.rate:,.0f}/s: p50 {floor.p50_us:,.0f} us, p99 {floor.p99_us:,.0f} us"
    )
    for r in runs:
        p50 = r.result.latency.get("p50_us") if r.steps else None
        if p50 and floor.p50_us > 0:
            line += f"; {r.target} p50 {p50 / floor.p50_us:.2f}x the floor"
    return line


if __name__ == "__main__":
    raise SystemExit(main())
