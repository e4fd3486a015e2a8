"""Connection-scale bench: how many clients one box holds, what each costs, and a reconnect storm.

    tickwire bench conns [--clients 20000] [--workers 2] [--load-processes 2] [--symbols 100]
                         [--duration 20] [--warmup 5] [--jitter 2] [--json FILE]

Starts a private Redis, the simulator, `tickwire serve --workers N` (SO_REUSEPORT) and client
load processes (`tickwire.bench.conns_load`), each client a light raw WebSocket bound to one of
several loopback source addresses and subscribed to one `quotes:` channel. The feed's rate is
set so that a connection gets one event per second on average (symbols / 0.75: a quarter of the
simulator's events are trades). In turn it measures: the server's RSS with every client
connected (idle) and subscribed, handshakes/s while connecting, heartbeat and event latency
over `--duration` s, then restarts the server and times every client's reconnect and resume
(random delay, then backoff), and counts the events any client never got: it must be 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from tickwire.bench.e2e_run import LoadProcess
from tickwire.bench.harness import (
    ServerProcess,
    cpu_seconds,
    machine_cpu_seconds,
    rss_mb,
    self_signed_pem,
    start_feed,
)
from tickwire.bench.stats import latency_summary
from tickwire.core.argtypes import count, rate, seconds, seconds_or_none
from tickwire.core.channels import Channel
from tickwire.core.redis_process import RedisProcess
from tickwire.core.redis_wire import RedisConnection
from tickwire.core.runtime import raise_open_files_limit
from tickwire.feeds.simulator import default_symbols

#: Clients per loopback source address: each has ports 32768-60999 (~28 k) to connect from.
PER_SOURCE = 20_000
#: What a process needs besides its connections: Redis, listeners, pipes, its own files.
SPARE_FILES = 200
#: The simulator's share of quotes (the rest are trades).
QUOTE_SHARE = 0.75


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tickwire bench conns", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    p.add_argument("--clients", type=count, default=20_000, help="connections (default 20000)")
    p.add_argument("--workers", type=count, default=2, help="server processes (default 2)")
    p.add_argument(
        "--load-processes", type=count, default=2, help="client load processes (default 2)"
    )
    p.add_argument(
        "--symbols",
        type=count,
        default=100,
        help="symbols; clients spread over their quotes channels (default 100)",
    )
    p.add_argument(
        "--rate",
        type=rate,
        default=None,
        help="events/s published (default symbols / 0.75: one event/s per connection on average)",
    )
    p.add_argument("--duration", type=seconds, default=20, help="measured seconds (default 20)")
    p.add_argument(
        "--warmup",
        type=seconds_or_none,
        default=5,
        help="seconds between the last subscribe ack and the measured window (default 5)",
    )
    p.add_argument(
        "--jitter",
        type=seconds_or_none,
        default=2.0,
        help="after the server goes, each client waits uniform 0..this s before reconnecting "
        "(default 2)",
    )
    p.add_argument(
        "--timeout",
        type=seconds,
        default=120,
        help="give up on a phase (connect, subscribe, storm) after this many s (default 120)",
    )
    p.add_argument(
        "--tls",
        action="store_true",
        help="the server serves wss:// (a throwaway self-signed certificate): what TLS costs "
        "per connection",
    )
    p.add_argument("--json", help="write every figure and the configuration to this file")
    p.add_argument(
        "--keep", metavar="DIR", help="keep the logs and latency samples in DIR (default: none)"
    )
    return p


def progress(label: str, done: int, total: int, t0: float) -> None:
    if not sys.stderr.isatty():
        return
    print(
        f"\r  {label:12} {done:>9,}/{total:,}  {time.monotonic() - t0:6.1f} s",
        end="",
        file=sys.stderr,
        flush=True,
    )


class Bench:
    """The processes of one run and its phases, each bounded by `timeout`."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.logname = workdir / "conns.log"
        self.log = open(self.logname, "ab")  # noqa: SIM115 - kept open for the children's life
        symbols = default_symbols(args.symbols)
        self.plan = [f"quotes:{symbols[i % len(symbols)]}" for i in range(args.clients)]
        self.rate = args.rate or args.symbols / QUOTE_SHARE
        self.loads: list[LoadProcess] = []

    def sources(self) -> list[list[str]]:
        """Loopback source addresses for each load process, none shared between processes."""
        a = self.args
        n = max(a.load_processes, math.ceil(a.clients / PER_SOURCE))
        n = math.ceil(n / a.load_processes) * a.load_processes
        addrs = [f"127.0.{2 + i // 250}.{2 + i % 250}" for i in range(n)]
        return [addrs[i :: a.load_processes] for i in range(a.load_processes)]

    def start_loads(self, url: str, cafile: str | None = None) -> None:
        a = self.args
        for i, sources in enumerate(self.sources()):
            plan = self.workdir / f"plan-{i}.json"
            plan.write_bytes(orjson.dumps(self.plan[i :: a.load_processes]))
            cmd = [
                sys.executable, "-m", "tickwire.bench.conns_load", "--url", url, "--plan",
                str(plan), "--sources", ",".join(sources), "--jitter", str(a.jitter),
                *(["--cafile", cafile] if cafile else []),
            ]  # fmt: skip
            self.loads.append(LoadProcess(cmd, self.log))
        for p in self.loads:
            p.wait_ready(self.logname)

    def phase(
        self,
        command: str | None,
        key: str,
        label: str,
        total: int,
        timeline: list[tuple[float, int]] | None = None,
    ) -> list[dict[str, Any]]:
        """Send `command` (if any) to every load process; wait for each one's `key` line.
        `timeline` gets (monotonic time, count) each time the count of all of them moves."""
        for p in self.loads:
            if command is not None:
                p.send(command)
        t0 = time.monotonic()
        deadline = t0 + self.args.timeout
        counts = [0] * len(self.loads)
        #: What each load process last said of its clients still waiting, if anything.
        waiting: list[dict[str, int]] = [{} for _ in self.loads]
        out: list[dict[str, Any] | None] = [None] * len(self.loads)
        while any(o is None for o in out):
            if time.monotonic() > deadline:
                why = f"{label}: {sum(counts):,} of {total:,} after the timeout"
                if any(waiting):
                    down = sum(w.get("down", 0) for w in waiting)
                    unacked = sum(w.get("unacked", 0) for w in waiting)
                    before = sum(w.get("acked_before", 0) for w in waiting)
                    oldest_down = max(w.get("oldest_down_ms", 0) for w in waiting) / 1000
                    oldest_unacked = max(w.get("oldest_unacked_ms", 0) for w in waiting) / 1000
                    cycles = sum(w.get("storm_connects", 0) for w in waiting)
                    failed = sum(w.get("storm_failures", 0) for w in waiting)
                    why += (
                        f" ({down:,} without a connection, the longest for {oldest_down:.1f} s;"
                        f" {unacked:,} connected, no ack, the longest for {oldest_unacked:.1f} s;"
                        f" {before:,} on a connection from before the storm; since the storm"
                        f" began, the first two opened {cycles:,} connections and failed"
                        f" {failed:,} attempts)"
                    )
                raise PhaseTimeout(why)
            for i, p in enumerate(self.loads):
                while out[i] is None and not p.lines.empty():
                    msg = p.lines.get_nowait()
                    if key in msg:
                        out[i] = msg
                    elif "progress" in msg:
                        counts[i] = msg.pop("progress")
                        waiting[i] = msg
                if p.proc.poll() is not None and out[i] is None:
                    raise RuntimeError(f"a load process exited; see {self.logname}")
            progress(label, sum(counts), total, t0)
            if timeline is not None and (not timeline or timeline[-1][1] != sum(counts)):
                timeline.append((time.monotonic(), sum(counts)))
            time.sleep(0.1)
        if sys.stderr.isatty():
            print(file=sys.stderr)
        return [o for o in out if o is not None]

    def close(self) -> None:
        for p in self.loads:
            with contextlib.suppress(OSError):
                p.send("stop")
        for p in self.loads:
            try:
                p.proc.wait(30)
            except Exception:
                p.proc.kill()
        self.log.close()


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def worker_rss(server: ServerProcess) -> float:
    return rss_mb(server.worker_pids() or [server.pid])


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    a = args
    b = Bench(a, workdir)
    figures: dict[str, Any] = {}
    redis = RedisProcess().start()
    cert = str(self_signed_pem(workdir / "tls.pem")) if a.tls else None
    server = ServerProcess(redis.url, workers=a.workers, tls_cert=cert)
    feed = None
    try:
        # The feed runs throughout: channels exist before anyone subscribes, and events keep
        # coming while the server is down (the clients must get them on resume).
        feed = start_feed(
            redis.url, rate=b.rate, symbols=a.symbols, duration=3600, seed=1, log=b.log
        )
        server.start(b.logname)
        time.sleep(1.0)
        rss0 = worker_rss(server)
        b.start_loads(server.url, cert)
        say(f"connecting {a.clients:,} clients ({a.load_processes} load processes)")
        t0 = time.monotonic()
        done = b.phase("connect", "connected", "connecting", a.clients)
        connect_s = time.monotonic() - t0
        held = sum(d["connected"] for d in done)
        figures["connections_held"] = held
        figures["connect_failed"] = sum(d["failed"] for d in done)
        figures["handshakes_per_s"] = held / connect_s
        per_worker = server.connections_by_worker()
        figures["connections_per_worker"] = sorted(per_worker.values())
        time.sleep(2.0)  # let the allocator settle: RSS of what stays, not of the burst
        rss1 = worker_rss(server)
        figures["rss_idle_KiB_per_conn"] = (rss1 - rss0) * 1024 / max(1, held)
        say("subscribing")
        b.phase("subscribe", "subscribed", "subscribing", held)
        time.sleep(2.0)
        rss2 = worker_rss(server)
        figures["rss_subscribed_KiB_per_conn"] = (rss2 - rss0) * 1024 / max(1, held)
        figures["server_rss_MiB"] = {"empty": rss0, "idle": rss1, "subscribed": rss2}
        # What the subscribe burst queued (each ack waits for a position read from Redis) is
        # still draining when the last ack arrives: with 50 000 clients, for about 4 s.
        time.sleep(a.warmup)
        say(f"measuring {a.duration:g} s")
        pids = [server.pid], [p.proc.pid for p in b.loads]
        cpu0 = [cpu_seconds(x) for x in pids] + [machine_cpu_seconds()]
        b.phase("go", "go", "go", 0)
        time.sleep(a.duration)
        cpu1 = [cpu_seconds(x) for x in pids] + [machine_cpu_seconds()]
        # What the window took of the two cores (200 = both busy): the box's limit at scale.
        figures["cpu_percent"] = dict(
            zip(
                ("server", "load", "machine"),
                (100 * (y - x) / a.duration for x, y in zip(cpu0, cpu1, strict=True)),
                strict=True,
            )
        )
        parts = [workdir / f"lat-{i}.npz" for i in range(len(b.loads))]
        for p, part in zip(b.loads, parts, strict=True):
            p.send(f"report {part}")
        counts = [wait_line(p, "events", a.timeout) for p in b.loads]
        samples = [np.load(part) for part in parts]
        events = np.concatenate([s["events"] for s in samples])
        figures["event_latency"] = latency_summary(events)
        figures["heartbeat_latency"] = latency_summary(
            np.concatenate([s["heartbeats"] for s in samples])
        )
        figures["events_per_conn_per_s"] = sum(c["events"] for c in counts) / a.duration / held
        figures["load_gc"] = {
            "pauses": sum(c["gc_pauses"] for c in counts),
            "longest_ms": max(c["gc_longest_ms"] for c in counts),
        }
        say("restarting the server: reconnect storm")
        for p in b.loads:
            p.send("storm")
        t_stop = time.monotonic()
        server.stop(grace_s=15)
        t_start = time.monotonic()
        start_ns = time.time_ns()
        server.start(b.logname, timeout=a.timeout)
        timeline: list[tuple[float, int]] = []
        try:
            resumed = b.phase(None, "resumed", "resuming", held, timeline)
        except PhaseTimeout as exc:
            # What was measured before the storm still stands: report it, and the storm failed.
            figures["storm_error"] = str(exc)
            figures["storm_down_s"] = t_start - t_stop
            return figures
        last_ns = max(r["at_ns"] for r in resumed)
        figures["storm_down_s"] = t_start - t_stop
        figures["storm_resume_s"] = (last_ns - start_ns) / 1e9
        # When half, 90 % and 99 % had resumed (seen by the bench every 0.1 s, from the start).
        figures["storm_share_s"] = {
            str(share): next((t - t_start for t, n in timeline if n >= share * held / 100), None)
            for share in (50, 90, 99)
        }
        figures["resumed"] = sum(r["resumed"] for r in resumed)
        time.sleep(2.0)  # events flow again after the storm
        feed.terminate()
        feed.wait(10)
        time.sleep(2.0)  # the last events reach every client
        final = asyncio.run(final_positions(redis.url, sorted(set(b.plan))))
        final_file = workdir / "final.json"
        final_file.write_bytes(orjson.dumps(final))
        # A client that is behind (an overloaded run) still gets what it is short of: wait
        # while that shrinks, so that only what never comes counts as lost.
        t_drain = time.monotonic()
        short = None
        while True:
            checks = b.phase(f"check {final_file}", "holes", "checking", 0)
            now_short = sum(c["short"] for c in checks)
            if now_short == 0 or (short is not None and now_short >= short):
                break
            if time.monotonic() - t_drain > a.timeout:
                break
            short = now_short
            time.sleep(3.0)
        figures["drain_s"] = time.monotonic() - t_drain
        figures["holes"] = sum(c["holes"] for c in checks)
        figures["short_at_end"] = now_short
        figures["lost"] = figures["holes"] + now_short
        for k in ("duplicates", "gaps", "resets", "reconnected", "connected"):
            figures[k] = sum(c[k] for c in checks)
    finally:
        if feed is not None and feed.poll() is None:
            feed.kill()
        b.close()
        server.stop()
        redis.stop()
    return figures


class PhaseTimeout(RuntimeError):
    """A phase did not complete within `--timeout`."""


def wait_line(p: LoadProcess, key: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        msg = p.lines.get(timeout=left)
        if key in msg:
            return msg
    raise RuntimeError(f"a load process did not answer {key!r}")


async def final_positions(url: str, channels: list[str]) -> dict[str, tuple[str, int]]:
    """(epoch, last seq) of each channel in Redis."""
    conn = await RedisConnection.open(url)
    try:
        replies = await conn.pipeline(
            [["HMGET", Channel.parse(n).meta_key, "epoch", "seq"] for n in channels]
        )
    finally:
        conn.close()
    return {
        n: (r[0].decode(), int(r[1]))
        for n, r in zip(channels, replies, strict=True)
        if r[1] is not None
    }


def ms(us: float) -> str:
    return f"{us / 1000:.2f}" if us < 10_000 else f"{us / 1000:,.0f}"


def table(f: dict[str, Any]) -> str:
    ev, hb, cpu = f["event_latency"], f["heartbeat_latency"], f["cpu_percent"]
    rows = [
        ("connections held", f"{f['connections_held']:,}"),
        ("per worker", " ".join(f"{n:,}" for n in f["connections_per_worker"])),
        ("handshakes/s", f"{f['handshakes_per_s']:,.0f}"),
        ("server RSS/conn, idle", f"{f['rss_idle_KiB_per_conn']:.1f} KiB"),
        ("server RSS/conn, subscribed", f"{f['rss_subscribed_KiB_per_conn']:.1f} KiB"),
        ("events/s per connection", f"{f['events_per_conn_per_s']:.2f}"),
        ("event p50 / p99", f"{ms(ev['p50_us'])} / {ms(ev['p99_us'])} ms"),
        ("heartbeat p50 / p99", f"{ms(hb['p50_us'])} / {ms(hb['p99_us'])} ms"),
        ("CPU % server / load / machine", " / ".join(f"{v:.0f}" for v in cpu.values())),
        (
            "load GC pauses, longest",
            f"{f['load_gc']['pauses']:,}, {f['load_gc']['longest_ms']:.1f} ms",
        ),
    ]
    if "storm_error" in f:
        rows.append(
            ("storm: FAILED", f"{f['storm_error']} (server down {f['storm_down_s']:.1f} s)")
        )
    else:
        rows += [
            (
                "storm: all resumed in",
                f"{f['storm_resume_s']:.1f} s (server down {f['storm_down_s']:.1f} s)",
            ),
            (
                "storm: 50 / 90 / 99 % in",
                " / ".join(
                    f"{v:.1f}" if v is not None else "-" for v in f["storm_share_s"].values()
                )
                + " s",
            ),
            ("resumed", f"{f['resumed']:,}"),
            ("lost (holes + never came)", f"{f['lost']} ({f['holes']} + {f['short_at_end']})"),
            ("duplicates / gaps", f"{f['duplicates']} / {f['gaps']}"),
        ]
    return "\n".join(f"{k:30} {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _, hard = raise_open_files_limit()
    limit = hard - SPARE_FILES
    if math.ceil(args.clients / args.load_processes) > limit:
        raise SystemExit(f"{args.clients} clients need more load processes ({limit} files each)")
    # SO_REUSEPORT spreads connections by a hash, a little unevenly: keep a margin.
    if math.ceil(args.clients / args.workers) > 0.95 * limit:
        raise SystemExit(f"{args.clients} clients need more workers ({limit} files each)")
    print(
        f"bench conns: {args.clients:,} clients, {args.workers} workers, "
        f"{args.load_processes} load processes, {args.symbols} symbols",
        file=sys.stderr,
    )
    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=True)
        figures = run(args, Path(args.keep))
    else:
        with tempfile.TemporaryDirectory(prefix="tickwire-conns-") as tmp:
            figures = run(args, Path(tmp))
    print(table(figures))
    passed = "storm_error" not in figures
    passed = passed and figures["lost"] == 0 and figures["duplicates"] == 0
    passed = passed and figures["resumed"] == figures["connections_held"]
    print("PASSED" if passed else "FAILED")
    if args.json:
        doc = {"config": vars(args), "figures": figures, "passed": passed}
        Path(args.json).write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
