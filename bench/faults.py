"""Fault bench: Redis killed, paused or cut off, a worker killed, a reconnect storm, a slow consumer.

    tickwire bench faults [--scale 1] [--clients 50] [--rate 2000] [--only NAME]… [--json FILE]

Each scenario starts its own private redis-server and a real `tickwire serve` process, publishes
simulated quotes and trades with tickwire's Publisher, holds WebSocket clients in this process
(each checks protocol v1's delivery invariant on every message it receives), injects its fault
mid-stream, lets the stream run on, and counts what every client got. "Lost silently" counts the
holes no `gap` or `reset` covered, plus the events Redis kept that a client following that epoch
never got: it must be 0. The exit status is 1 when a scenario lost silently, duplicated or broke
the invariant; a missed target (recovery time, /healthz latency, memory) shows as MISS.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import orjson

from tickwire.bench.fault_report import Outcome, json_report, print_table
from tickwire.bench.fault_scenarios import SCENARIOS
from tickwire.bench.fault_stage import Settings, say
from tickwire.core.argtypes import count, positive, rate, seconds


async def run_all(st: Settings, names: list[str], workdir: Path) -> list[Outcome]:
    outcomes = []
    for i, name in enumerate(names, 1):
        say(f"[{i}/{len(names)}] {name}: {SCENARIOS[name][1]}")
        t0 = time.monotonic()
        try:
            o = await SCENARIOS[name][0](st, workdir)
        except Exception as exc:  # a scenario that cannot run is a failed scenario, not a crash
            o = Outcome(name, problems=[f"{type(exc).__name__}: {exc}"])
        say(f"  {o.verdict} in {time.monotonic() - t0:.0f} s")
        outcomes.append(o)
    return outcomes


def settings_from(args: argparse.Namespace) -> Settings:
    k = args.scale

    def scaled(explicit: int | None, full: int) -> int:
        return explicit if explicit is not None else max(2, round(full * k))

    def secs(explicit: float | None, full: float, low: float) -> float:
        return explicit if explicit is not None else max(low, full * k)

    return Settings(
        clients=scaled(args.clients, 50),
        rate=args.rate,
        kill_rate=args.kill_rate if args.kill_rate is not None else 5 * args.rate,
        symbols=args.symbols,
        channels_per_client=args.channels_per_client,
        storm_clients=scaled(args.storm_clients, 300),
        slow_clients=scaled(args.slow_clients, 200),
        pause_s=secs(args.pause, 15.0, 1.0),
        hold_s=secs(args.hold, 8.0, 1.0),
        steady_s=secs(args.steady, 2.0, 0.5),
        seed=args.seed,
    )


def main(argv: list[str] | None = None) -> int:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(
        prog="tickwire bench faults",
        description=doc.split("\n\n", 1)[0] + "\n\n" + doc.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="scenarios:\n"
        + "\n".join(f"  {n:22} {d}" for n, (_, d) in SCENARIOS.items())
        + "\n\nexample: tickwire bench faults --scale 0.2 --only storm --only proxy-reset",
    )
    p.add_argument(
        "--scale",
        type=positive,
        default=1.0,
        help="multiplies client counts and fault durations (1: the issue's 300 storm clients, "
        "200 slow-consumer clients, a 15 s pause; default 1)",
    )
    p.add_argument("--clients", type=count, help="clients per scenario (default 50 x scale)")
    p.add_argument("--storm-clients", type=count, help="storm clients (default 300 x scale)")
    p.add_argument("--slow-clients", type=count, help="slow-consumer clients (default 200 x scale)")
    p.add_argument("--rate", type=rate, default=2000.0, help="events/s published (default 2000)")
    p.add_argument("--kill-rate", type=rate, help="events/s for redis-kill-aof (default 5 x rate)")
    p.add_argument(
        "--symbols", type=count, default=10, help="symbols (2 channels each; default 10)"
    )
    p.add_argument(
        "--channels-per-client", type=count, default=2, help="channels per client (default 2)"
    )
    p.add_argument("--pause", type=seconds, help="redis-pause SIGSTOP seconds (default 15 x scale)")
    p.add_argument("--hold", type=seconds, help="proxy fault seconds (default 8 x scale)")
    p.add_argument("--steady", type=seconds, help="streaming before/after faults (default 2 s)")
    p.add_argument("--seed", type=int, default=0, help="simulator seed (default 0)")
    p.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="run only this scenario (repeatable, or comma-separated)",
    )
    p.add_argument("--json", metavar="FILE", help="write every figure to FILE as JSON")
    args = p.parse_args(argv)
    names = list(SCENARIOS)
    if args.only:
        names = [n.strip() for item in args.only for n in item.split(",") if n.strip()]
        unknown = [n for n in names if n not in SCENARIOS]
        if unknown:
            p.error(
                f"unknown scenario(s): {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}"
            )
    st = settings_from(args)
    # The publisher and the client library log every retry: the table says what happened.
    logging.getLogger("tickwire").setLevel(logging.ERROR)
    import uvloop

    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tickwire-faults-") as tmp:
        outcomes: list[Outcome] = uvloop.run(run_all(st, names, Path(tmp)))
        failed_logs = {
            o.scenario: (Path(tmp) / f"{o.scenario}.log").read_text()[-2000:]
            for o in outcomes
            if not o.correct and (Path(tmp) / f"{o.scenario}.log").exists()
        }
    print_table(outcomes)
    for name, text in failed_logs.items():
        say(f"--- end of the server log of {name} ---\n{text}")
    if args.json:
        command = "tickwire bench faults " + " ".join(sys.argv[3:] if argv is None else argv)
        result = json_report(command, st, time.monotonic() - t0, outcomes)
        Path(args.json).write_text(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    return 0 if all(o.correct for o in outcomes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
