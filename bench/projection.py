"""Projection bench: `Hub.dispatch` time per delivery, projected subscribers against whole ones.

    python -m tickwire.bench.projection [--clients 1000] [--rounds 5] [--baseline REV] [--json FILE]

The hub fans batches of quotes (20 channels x 5 events a dispatch) out to `--clients`
subscribers of `quotes:*` whose sockets always take data (the fast path: one frame per group,
one write per client; a write is a no-op here, so what is timed is tickwire's own work).
Scenarios: every client whole; every client on one projection (`bid`, `ask`); half and half;
four distinct projections. With `--baseline REV` the whole scenario also runs on the server
code of that git revision, alternated with the current code round by round, each in its own
process (`git archive` of REV on PYTHONPATH), so the ratio shows what projection costs the
unprojected hot path. Ratios are against the whole scenario of the current code.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tickwire.core.argtypes import count

FIELD_SETS = (["bid", "ask"], ["bid"], ["ask", "ask_size"], ["bid", "bid_size"])
SCENARIOS = {
    "whole": (),
    "one projection": (0,),
    "half projected": (None, 0),
    "4 projections": (0, 1, 2, 3),
}


def measure(scenario: str, clients: int, dispatches: int) -> float:
    """Nanoseconds of `Hub.dispatch` per (client, event) delivery."""
    from tickwire.core.channels import Channel, ChannelPattern
    from tickwire.core.events import encode_body
    from tickwire.core.stream import complete_body
    from tickwire.server.batch import Batch
    from tickwire.server.hub import Hub, Subscriber
    from tickwire.server.outbox import Outbox

    hub = Hub()
    pattern = ChannelPattern.parse("quotes:*")
    kinds = SCENARIOS[scenario] or (None,)
    for i in range(clients):
        sub = Subscriber(Outbox(1 << 20), lambda: None, write_now=lambda m, w: True)
        hub.attach(sub)
        kind = kinds[i % len(kinds)]
        if kind is None:
            hub.subscribe(sub, pattern)
        else:
            # Imported here: the baseline code (`--baseline`) runs the whole scenario only.
            from tickwire.server.projection import parse_fields

            hub.subscribe(sub, pattern, fields=parse_fields(FIELD_SETS[kind], [pattern]))
    channels = [Channel.parse(f"quotes:S{i:03d}") for i in range(20)]
    seq = dict.fromkeys(channels, 1)
    body = {"bid": 64123.5, "bid_size": 0.125, "ask": 64124.0, "ask_size": 1.5}

    def batches() -> list[Batch]:
        out = []
        for ch in channels:
            first = seq[ch]
            events = [
                complete_body(encode_body("quote", ch.symbol, 1, 2, body), "e1", first + j)
                for j in range(5)
            ]
            seq[ch] = first + 5
            out.append(Batch(ch, "e1", first, events))
        return out

    hub.dispatch(batches())  # the groups' shared positions settle
    deliveries = elapsed = 0
    for _ in range(dispatches):
        # Made afresh and dropped after each dispatch, as the reader's are: batches kept alive
        # by the thousand would make the garbage collector's passes the cost being measured.
        b = batches()
        start = time.perf_counter_ns()
        deliveries += hub.dispatch(b)
        elapsed += time.perf_counter_ns() - start
        del b
    assert deliveries == dispatches * clients * 100, deliveries
    return elapsed / deliveries


def run_child(args: argparse.Namespace) -> None:
    out = {s: measure(s, args.clients, args.dispatches) for s in args.scenario}
    print(json.dumps(out))


def child(scenarios: list[str], args: argparse.Namespace, path: str | None) -> dict[str, float]:
    env = dict(os.environ)
    if path is not None:
        env["PYTHONPATH"] = path + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, __file__, "--child", "--clients", str(args.clients)]
    cmd += ["--dispatches", str(args.dispatches)]
    for s in scenarios:
        cmd += ["--scenario", s]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return dict(json.loads(result.stdout))


def export(rev: str, into: str) -> str:
    """The package as of `rev`, laid out as `tickwire.*` under `into` (see pyproject's package-dir)."""
    root = Path(into)
    top = subprocess.run(
        ["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True
    ).stdout.strip()
    archive = subprocess.run(
        ["git", "-C", top, "archive", rev, "tickwire", "server"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
    (root / "server").rename(root / "tickwire" / "server")
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=count, default=1000)
    parser.add_argument("--dispatches", type=count, default=200)
    parser.add_argument("--rounds", type=count, default=5)
    parser.add_argument("--baseline", help="git revision whose whole scenario to compare")
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--scenario", action="append", default=[])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args)
        return
    runs: dict[str, list[float]] = {s: [] for s in SCENARIOS}
    with tempfile.TemporaryDirectory() as tmp:
        old = export(args.baseline, tmp) if args.baseline else None
        if old is not None:
            runs[f"whole, {args.baseline}"] = []
        for i in range(args.rounds):
            # The current and the baseline whole runs alternate, each first every other round.
            order = [None, old] if i % 2 == 0 else [old, None]
            for path in order if old is not None else [None]:
                if path is None:
                    runs["whole"].append(child(["whole"], args, None)["whole"])
                else:
                    runs[f"whole, {args.baseline}"].append(child(["whole"], args, old)["whole"])
            for name, value in child(list(SCENARIOS)[1:], args, None).items():
                runs[name].append(value)
    base = statistics.median(runs["whole"])
    rows: list[dict[str, Any]] = [
        {
            "scenario": name,
            "ns_per_delivery": round(statistics.median(values), 2),
            "us_per_dispatch": round(statistics.median(values) * args.clients * 100 / 1000, 1),
            "ratio": round(statistics.median(values) / base, 3),
            "runs": [round(v, 2) for v in values],
        }
        for name, values in runs.items()
    ]
    print(f"Hub.dispatch, {args.clients} clients of quotes:*, 100 events a dispatch")
    print(f"{'scenario':<24}{'ns/delivery':>12}{'us/dispatch':>12}{'ratio':>8}")
    for row in rows:
        print(
            f"{row['scenario']:<24}{row['ns_per_delivery']:>12.2f}"
            f"{row['us_per_dispatch']:>12.1f}{row['ratio']:>8.3f}"
        )
    doc = json.dumps({"clients": args.clients, "rows": rows})
    print(doc)
    if args.json:
        Path(args.json).write_text(doc + "\n")


if __name__ == "__main__":
    main()
