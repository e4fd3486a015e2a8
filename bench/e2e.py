"""End-to-end bench: publish → client receive latency and fan-out throughput, against a baseline.

    tickwire bench [--rate 10000] [--symbols 100] [--clients 100] [--channels-per-client 10]
                   [--duration 30] [--warmup 5] [--workers 1] [--target both] [--rounds 1]
                   [--saturate] [--json FILE] [--plot FILE.png]

Starts a private Redis, the server under test (tickwire, then the naive baseline of
`tickwire.bench.baseline`), client load in separate processes and the simulator as publisher;
runs the same scenario against each, then prints one table with the ratios tickwire/baseline.
`--saturate` raises the rate step by step until p99, loss, the publisher or delivery gives out
(clients receiving under 90 % of what was published to them: the rest is queueing somewhere), and
reports the highest sustained step. A run in which any sampled connection saw a duplicate or an
unannounced hole is FAILED.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import platform
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
import orjson

from tickwire import __version__
from tickwire.bench.harness import cpu_seconds, machine_cpu_seconds, start_group, stop_group
from tickwire.bench.stats import latency_summary, ratio, server_share, table
from tickwire.core.channels import REGISTRY_KEY, Channel
from tickwire.core.redis_process import RedisProcess, free_port
from tickwire.core.redis_wire import RedisConnection
from tickwire.feeds.simulator import default_symbols

BIN = Path(sys.executable).parent


@dataclass
class Scenario:
    rate: float
    symbols: int
    clients: int
    channels_per_client: int
    duration: float
    warmup: float
    workers: int
    load_processes: int
    sample_every: int
    url: str | None = None
    saturate: bool = False
    max_rate: float = 1e7
    step_factor: float = 1.5
    max_p99_ms: float = 50.0


@dataclass
class Run:
    target: str
    scenario: Scenario
    steps: list[Step] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(s.passed for s in self.steps)

    @property
    def result(self) -> Step:
        """The step the run is judged by: the highest sustained one when saturating."""
        if self.scenario.saturate:
            good = [s for s in self.steps if breach(s, self.scenario) is None]
            if good:
                return good[-1]
        return self.steps[-1]


def plan_channels(s: Scenario) -> list[list[str]]:
    names = default_symbols(s.symbols)
    channels = [f"{kind}:{sym}" for sym in names for kind in ("quotes", "trades")]
    per = min(s.channels_per_client, len(channels))
    return [[channels[(i * per + j) % len(channels)] for j in range(per)] for i in range(s.clients)]


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server did not listen on port {port} within {timeout} s")


def start_server(
    target: str, redis_url: str, port: int, workers: int, log: IO[bytes]
) -> subprocess.Popen[bytes]:
    if target == "tickwire":
        cmd = [
            str(BIN / "tickwire"),
            "serve",
            "--redis",
            redis_url,
            "--port",
            str(port),
            "--workers",
            str(workers),
        ]
    else:
        cmd = [
            sys.executable,
            "-m",
            "tickwire.bench.baseline",
            "--redis",
            redis_url,
            "--port",
            str(port),
        ]
    proc = start_group(cmd, log)
    wait_port(port)
    return proc


@dataclass
class Step:
    """One measured window at one publish rate."""

    rate: float
    latency: dict[str, float] = field(default_factory=dict)
    #: The same events' latency from their venue time `ts` instead of `pt`: for the simulator,
    #: when the event was due, so this adds the feed's own wait before it stamps `pt`.
    from_event: dict[str, float] = field(default_factory=dict)
    figures: dict[str, float] = field(default_factory=dict)
    correctness: dict[str, Any] = field(default_factory=dict)
    #: The server's own view over the window (tickwire only): read→write and publish→write.
    server: dict[str, float] = field(default_factory=dict)
    latency_file: str = ""

    @property
    def passed(self) -> bool:
        c = self.correctness
        return not (
            c.get("lost") or c.get("duplicates") or c.get("tail_lost") or c.get("violations")
        )


def median_step(steps: list[Step]) -> Step:
    """Rounds of one target as one step: every latency and figure the median over the rounds.

    Single runs of the same scenario spread widely on a small shared machine (p99 4.2-8.3 ms
    in one session), so a ratio of one run each can say what one wants; the median of
    alternated rounds is what to quote. Counts (events sampled, lost, …) are summed over the
    rounds and examples kept: a round that lost an event fails the whole.
    """
    if len(steps) == 1:
        return steps[0]

    def medians(dicts: list[dict[str, float]]) -> dict[str, float]:
        keys = [k for k in dicts[0] if all(k in d for d in dicts)]
        return {k: float(np.median([d[k] for d in dicts])) for k in keys}

    correctness: dict[str, Any] = {}
    for st in steps:
        for key, value in st.correctness.items():
            if isinstance(value, list):
                correctness[key] = (correctness.get(key, []) + value)[:5]
            elif isinstance(value, int | float) and key != "sampled_connections":
                correctness[key] = correctness.get(key, 0) + value
            else:
                correctness.setdefault(key, value)
    return Step(
        steps[0].rate,
        latency=medians([st.latency for st in steps]),
        from_event=medians([st.from_event for st in steps]),
        figures=medians([st.figures for st in steps]),
        correctness=correctness,
        server=medians([st.server for st in steps]) if all(st.server for st in steps) else {},
    )


def rounds_report(runs: list[Run]) -> str:
    """One line per round: each target's p50/p99/p99.9 and the p99 ratio of that round."""
    tw = [r.result for r in runs if r.target == "tickwire" and r.steps]
    base = [r.result for r in runs if r.target == "baseline" and r.steps]

    def ms(st: Step) -> str:
        return "/".join(
            f"{st.latency.get(k, math.nan) / 1000:.2f}" for k in ("p50_us", "p99_us", "p99.9_us")
        )

    out = []
    for i, t in enumerate(tw):
        line = f"round {i + 1}: tickwire p50/p99/p99.9 {ms(t)}"
        if i < len(base):
            b = base[i]
            line += f" ms, baseline {ms(b)}"
            r = ratio(t.latency.get("p99_us", math.nan), b.latency.get("p99_us", math.nan))
            line += f" ms, p99 ratio {r:.2f}x" if r is not None else " ms"
        out.append(line)
    return "\n".join(out)


class LoadProcess:
    """One client-load process (`tickwire.bench.load`), its commands and its output lines."""

    def __init__(self, cmd: list[str], log: IO[bytes]) -> None:
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
            cwd=tempfile.gettempdir(),
        )  # fmt: skip
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()

    def wait_ready(self, logname: Path) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != b"ready":
            raise RuntimeError(f"load process failed to start: {line!r}; see {logname}")
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(orjson.JSONDecodeError):
                self.lines.put(orjson.loads(line))

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{command}\n".encode())
        self.proc.stdin.flush()

    def report(self, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            msg = self.lines.get(timeout=left)
            if "report" in msg:
                return dict(msg["report"])
        raise RuntimeError("load process did not report")


class Target:
    """A server under test (started here unless `--url`) with its client load, measured in steps."""

    def __init__(self, name: str, s: Scenario, redis_url: str, workdir: Path) -> None:
        self.name, self.s, self.redis_url, self.workdir = name, s, redis_url, workdir
        self.plan = plan_channels(s)
        self.server: subprocess.Popen[bytes] | None = None
        self.loads: list[LoadProcess] = []
        self.port = free_port()
        self.logname = workdir / f"{name}.log"
        self.log = open(self.logname, "wb")  # noqa: SIM115 - kept open for the children's life

    def __enter__(self) -> Target:
        try:
            self._start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start(self) -> None:
        s = self.s
        if s.url is None:
            self.server = start_server(self.name, self.redis_url, self.port, s.workers, self.log)
            url = f"ws://127.0.0.1:{self.port}/ws"
        else:
            url = s.url
        for i in range(s.load_processes):
            chunk = self.plan[i :: s.load_processes]
            if chunk:
                # In a file: 1 000 clients x 200 channels is past the limit of a command line.
                plan = self.workdir / f"{self.name}-plan-{i}.json"
                plan.write_bytes(orjson.dumps(chunk))
                cmd = [
                    sys.executable, "-m", "tickwire.bench.load", "--url", url,
                    "--plan", str(plan), "--sample-every", str(s.sample_every),
                ]  # fmt: skip
                self.loads.append(LoadProcess(cmd, self.log))
        for p in self.loads:
            p.wait_ready(self.logname)

    def __exit__(self, *_: object) -> None:
        for p in self.loads:
            with contextlib.suppress(OSError):
                p.send("stop")
        for p in self.loads:
            try:
                p.proc.wait(10)
            except subprocess.TimeoutExpired:
                p.proc.kill()
        if self.server is not None:
            stop_group(self.server, grace_s=8)
        self.log.close()

    def step(self, rate: float, index: int = 0) -> Step:
        s, step = self.s, Step(rate)
        total = s.warmup + s.duration
        start_count = published(self.redis_url)
        pub = subprocess.Popen(
            [
                str(BIN / "tickwire"), "feed", "sim", "--redis", self.redis_url,
                "--rate", str(rate), "--symbols", str(s.symbols), "--duration", str(total),
                "--seed", str(1 + index),
            ],
            stdout=subprocess.DEVNULL, stderr=self.log, cwd=tempfile.gettempdir(),
        )  # fmt: skip
        # The clock starts at the first event published, not at the feed's (slow) start-up.
        while published(self.redis_url) == start_count:
            if pub.poll() is not None:
                raise RuntimeError(f"publisher failed ({pub.returncode}); see {self.logname}")
            time.sleep(0.02)
        measure_from = time.time_ns() + int(s.warmup * 1e9)
        for p in self.loads:
            p.send(f"go {measure_from}")
        t0 = time.monotonic()
        pids = Pids([self.server.pid] if self.server else [], [p.proc.pid for p in self.loads])
        before: Sample | None = None
        # The feed's CPU seconds at the window's start and as last seen within it: it often
        # ends (and is gone from /proc) before the window's end is sampled.
        feed_from = feed_seen = (0.0, 0.0)
        live = Live(len(self.loads))
        label = f"{self.name} {rate:,.0f}/s" if s.saturate else self.name
        after: Sample | None = None
        while pub.poll() is None:
            elapsed = time.monotonic() - t0
            if before is None and elapsed >= s.warmup:
                before = self._sample(pids)
                feed_from = (time.monotonic(), cpu_seconds([pub.pid]))
            elif before is not None and elapsed <= total:
                feed_seen = (time.monotonic(), cpu_seconds([pub.pid]))
            if after is None and elapsed >= total:
                # The feed's schedule is over; its exit (flush, interpreter shutdown) is not
                # part of the window.
                after = self._sample(pids)
            for i, p in enumerate(self.loads):
                while not p.lines.empty():
                    live.update(i, p.lines.get_nowait())
            progress(label, elapsed, total, live)
            # Wake at the window's edges: the loads start counting at the first.
            edge = s.warmup if before is None else total
            time.sleep(min(0.25, max(0.005, edge - elapsed)))
        after = after or self._sample(pids)
        progress(label, total, total, live)
        if sys.stderr.isatty():
            print(file=sys.stderr)
        if pub.returncode != 0:
            raise RuntimeError(f"publisher failed ({pub.returncode}); see {self.logname}")
        if before is None:
            raise RuntimeError(f"publisher stopped within the warm-up; see {self.logname}")
        time.sleep(1.0)  # let the last events arrive before the clients report
        parts = [self.workdir / f"{self.name}-{index}-{i}.npy" for i in range(len(self.loads))]
        for p, part in zip(self.loads, parts, strict=True):
            p.send(f"report {part}")
        results = [p.report() for p in self.loads]
        samples = [np.load(part) for part in parts]
        lat = np.concatenate([s[0] for s in samples])
        step.latency = latency_summary(lat)
        step.from_event = latency_summary(np.concatenate([s[1] for s in samples]))
        # All samples of the step in one file, for --plot.
        step.latency_file = str(self.workdir / f"{self.name}-{index}.npy")
        np.save(step.latency_file, lat)
        window = after.t - before.t
        finals = asyncio.run(final_seqs(self.redis_url, self.plan))
        tail = sum(max(0, finals.get(ch, 0) - last) for r in results for ch, last in r["last_seqs"])
        step.figures = {
            "events_published_per_s": (sum(after.seqs.values()) - sum(before.seqs.values()))
            / window,
            "deliveries_per_s": sum(r["events"] for r in results) / window,
            # What the clients received in the window, of what was published to them in it.
            "delivered_percent": 100
            * sum(r["events"] for r in results)
            / max(1, self._owed(before.seqs, after.seqs)),
            "frames_per_s": sum(r["frames"] for r in results) / window,
            "egress_MB_per_s": sum(r["bytes"] for r in results) / window / 1e6,
            "server_cpu_percent": 100 * (after.server_cpu - before.server_cpu) / window,
            # Redis is shared by the feed's appends and the server's reads.
            "redis_cpu_percent": 100 * (after.redis_cpu - before.redis_cpu) / window,
            # The load generators share the machine: what they take is what the server could
            # not have. The machine's figure counts every process, so 200 = two cores busy.
            "feed_cpu_percent": 100
            * (feed_seen[1] - feed_from[1])
            / max(1e-9, feed_seen[0] - feed_from[0]),
            "load_cpu_percent": 100 * (after.load_cpu - before.load_cpu) / window,
            "machine_cpu_percent": 100 * (after.machine_cpu - before.machine_cpu) / window,
        }
        step.server = server_share(before.metrics, after.metrics)
        step.correctness = {
            "sampled_connections": sum(r["sampled"] for r in results),
            "sampled_events": sum(r["sampled_events"] for r in results),
            "lost": sum(r["lost"] for r in results),
            "duplicates": sum(r["duplicates"] for r in results),
            "tail_lost": tail,
            "gaps_announced": sum(r["gaps"] for r in results),
            "gap_events": sum(r["gap_events"] for r in results),
            "resets": sum(r["resets"] for r in results),
            "violations": [v for r in results for v in r["violations"]][:5],
            "client_errors": [e for r in results for e in r["errors"]][:5],
            "closed": [c for r in results for c in r["closed"]][:5],
        }
        return step

    def _sample(self, pids: Pids) -> Sample:
        seqs, redis_cpu = redis_counters(self.redis_url)
        return Sample(
            time.monotonic(),
            cpu_seconds(pids.server),
            seqs,
            self._scrape(),
            redis_cpu,
            cpu_seconds(pids.loads),
            machine_cpu_seconds(),
        )

    def _owed(self, before: dict[str, int], after: dict[str, int]) -> int:
        """Deliveries the clients are owed for what was published between two samples."""
        return sum(after.get(ch, 0) - before.get(ch, 0) for chans in self.plan for ch in chans)

    def _scrape(self) -> str:
        if self.name != "tickwire" or self.server is None:
            return ""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as r:
                return str(r.read().decode())
        except OSError:
            return ""


class Pids(NamedTuple):
    """The processes of a step whose CPU time the bench reports."""

    server: list[int]
    loads: list[int]


class Sample(NamedTuple):
    """What a step's window is measured between: taken at its start and at its end."""

    t: float  # monotonic seconds
    server_cpu: float  # seconds
    seqs: dict[str, int]  # last seq per channel in the registry
    metrics: str  # the server's /metrics text ("" for the baseline)
    redis_cpu: float  # seconds
    load_cpu: float  # seconds
    machine_cpu: float  # seconds, every process on the machine


class Live:
    """The latest `live` line of each load process, summed for the progress bar."""

    def __init__(self, n: int) -> None:
        self.events = [0.0] * n
        self.rate = [0.0] * n
        self.p99 = [float("nan")] * n
        self._at = [time.monotonic()] * n

    def update(self, i: int, msg: dict[str, Any]) -> None:
        if "live" not in msg:
            return
        now, ev = time.monotonic(), float(msg["live"]["events"])
        if ev >= self.events[i] and now > self._at[i]:
            self.rate[i] = (ev - self.events[i]) / (now - self._at[i])
        p99 = msg["live"]["p99_us"]  # null (NaN) when no sample arrived in that second
        self.events[i], self._at[i] = ev, now
        self.p99[i] = float("nan") if p99 is None else float(p99)

    def text(self) -> str:
        p99 = [x for x in self.p99 if not math.isnan(x)]
        worst = f"{max(p99) / 1000:.2f} ms" if p99 else "-"
        return f"{sum(self.rate):>11,.0f} deliveries/s  p99 {worst}"


def progress(label: str, elapsed: float, total: float, live: Live) -> None:
    if not sys.stderr.isatty():
        return
    width = 24
    done = int(width * min(1.0, elapsed / total))
    print(
        f"\r  {label:18} [{'#' * done}{'.' * (width - done)}] {elapsed:5.1f}/{total:.0f} s"
        f"  {live.text()}",
        end="",
        file=sys.stderr,
        flush=True,
    )


def run_target(target: str, s: Scenario, redis_url: str, workdir: Path) -> Run:
    run = Run(target, s)
    with Target(target, s, redis_url, workdir) as t:
        if not s.saturate:
            run.steps.append(t.step(s.rate))
            return run
        rate, index = s.rate, 0
        while rate <= s.max_rate:
            step = t.step(rate, index)
            run.steps.append(step)
            why = breach(step, s)
            print(
                f"  {target} at {rate:,.0f} events/s: "
                + (f"limit reached ({why})" if why else "sustained"),
                file=sys.stderr,
            )
            if why:
                break
            rate, index = rate * s.step_factor, index + 1
    return run


def breach(step: Step, s: Scenario) -> str | None:
    """Why a saturation step is not sustainable, or None."""
    if not step.passed:
        return "silent loss or duplicates"
    if step.correctness.get("closed") or step.correctness.get("client_errors"):
        return "clients closed or failed"
    if step.latency.get("p99_us", math.inf) > s.max_p99_ms * 1000:
        return f"p99 {step.latency.get('p99_us', math.nan) / 1000:.1f} ms > {s.max_p99_ms:g} ms"
    if step.figures["events_published_per_s"] < 0.9 * step.rate:
        return "the publisher fell more than 10% short of the rate"
    if step.figures.get("delivered_percent", 100.0) < 90:
        return (
            f"clients received {step.figures['delivered_percent']:.0f}% of what was "
            "published to them (the rest queued)"
        )
    return None


def published(url: str) -> int:
    """Events published so far over every channel in the registry."""
    return sum(redis_counters(url)[0].values())


def redis_counters(url: str) -> tuple[dict[str, int], float]:
    """(events published so far per channel in the registry, Redis's CPU seconds)."""

    async def go() -> tuple[dict[str, int], float]:
        conn = await RedisConnection.open(url)
        try:
            names = [m.decode() for m in await conn.execute("SMEMBERS", REGISTRY_KEY)]
            info = (await conn.execute("INFO", "cpu")).decode()
            replies = await conn.pipeline(
                [["HGET", Channel.parse(n).meta_key, "seq"] for n in names]
            )
        finally:
            conn.close()
        cpu = dict(line.split(":", 1) for line in info.split() if ":" in line)
        seconds = float(cpu.get("used_cpu_user", 0)) + float(cpu.get("used_cpu_sys", 0))
        seqs = {n: int(r) for n, r in zip(names, replies, strict=True) if r is not None}
        return seqs, seconds

    return asyncio.run(go())


async def final_seqs(url: str, plan: list[list[str]]) -> dict[str, int]:
    names = sorted({ch for chans in plan for ch in chans})
    conn = await RedisConnection.open(url)
    try:
        replies = await conn.pipeline([["HGET", Channel.parse(n).meta_key, "seq"] for n in names])
    finally:
        conn.close()
    return {n: int(r) for n, r in zip(names, replies, strict=True) if r is not None}


def report(runs: list[Run]) -> str:
    tw = next((r.result for r in runs if r.target == "tickwire" and r.steps), None)
    base = next((r.result for r in runs if r.target == "baseline" and r.steps), None)
    out: list[str] = []
    saturate = any(r.scenario.saturate for r in runs)
    if saturate:
        for r in runs:
            out.append(f"{r.target}: saturation steps")
            out.append(
                f"  {'rate':>10} {'published/s':>12} {'deliveries/s':>13} {'MB/s':>7} "
                f"{'p99 ms':>8} {'cpu %':>6}  verdict"
            )
            for st in r.steps:
                f = st.figures
                out.append(
                    f"  {st.rate:>10,.0f} {f['events_published_per_s']:>12,.0f} "
                    f"{f['deliveries_per_s']:>13,.0f} {f['egress_MB_per_s']:>7.1f} "
                    f"{st.latency.get('p99_us', math.nan) / 1000:>8.2f} "
                    f"{f['server_cpu_percent']:>6.0f}  {breach(st, r.scenario) or 'sustained'}"
                )
        out.append("highest sustained step:")
    rows: list[tuple[str, float | None, float | None]] = []
    if saturate:
        rows.append(("rate", tw.rate if tw else None, base.rate if base else None))
    for key in ("p50_us", "p90_us", "p99_us", "p99.9_us", "max_us", "samples"):
        rows.append(
            (
                f"latency {key}",
                tw.latency.get(key) if tw else None,
                base.latency.get(key) if base else None,
            )
        )
    # From the event's venue time: adds the feed's wait for its release (same for both).
    for key in ("p50_us", "p99_us", "p99.9_us"):
        rows.append(
            (
                f"from event ts {key}",
                tw.from_event.get(key) if tw else None,
                base.from_event.get(key) if base else None,
            )
        )
    for key in (
        "events_published_per_s",
        "deliveries_per_s",
        "delivered_percent",
        "frames_per_s",
        "egress_MB_per_s",
        "server_cpu_percent",
        "redis_cpu_percent",
        "feed_cpu_percent",
        "load_cpu_percent",
        "machine_cpu_percent",
    ):
        rows.append(
            (key, tw.figures.get(key) if tw else None, base.figures.get(key) if base else None)
        )
    if tw is not None and tw.server:
        for key, value in tw.server.items():
            rows.append((f"server {key}", value, None))
    for key in ("sampled_events", "lost", "duplicates", "tail_lost", "gaps_announced"):
        rows.append(
            (
                key,
                tw.correctness.get(key) if tw else None,
                base.correctness.get(key) if base else None,
            )
        )
    out.append(table(rows, ("tickwire", "baseline")))
    for r in runs:
        verdict = "PASSED" if r.passed else "FAILED (silent loss or duplicates)"
        out.append(f"{r.target}: {verdict}")
        for st in r.steps:
            for key in ("violations", "client_errors", "closed"):
                if st.correctness.get(key):
                    out.append(f"  at {st.rate:,.0f}/s {key}: {st.correctness[key]}")
    return "\n".join(out)


def plot(runs: list[Run], path: str) -> None:
    """The latency percentile curve of each target's judged step (the samples of every round
    pooled), log-log, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit(
            "--plot needs matplotlib: pip install 'tickwire[bench]' (or matplotlib)"
        ) from exc
    fig, ax = plt.subplots(figsize=(8, 5))
    # x = 1/(1-q): equal room for 90, 99, 99.9, 99.99 %, the way HdrHistogram plots tails.
    q = 1 - np.logspace(0, -5, 400)
    q = q[q < 1 - 1e-9]
    for target in dict.fromkeys(r.target for r in runs):
        mine = [r.result for r in runs if r.target == target and r.steps]
        if not mine:
            continue
        lat = np.concatenate([np.load(st.latency_file) for st in mine])
        if lat.size == 0:
            continue
        ms = np.percentile(lat / 1e6, q * 100)
        ax.plot(1 / (1 - q), ms, label=f"{target} ({mine[0].rate:,.0f} events/s)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ticks = [2, 10, 100, 1000, 10000, 100000]
    ax.set_xticks(ticks, ["50%", "90%", "99%", "99.9%", "99.99%", "99.999%"])
    ax.set_xlabel("percentile")
    ax.set_ylabel("publish → client receive (ms)")
    s = runs[0].scenario
    ax.set_title(
        f"tickwire bench: {s.symbols} symbols, {s.clients} clients x {s.channels_per_client} "
        "channels"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tickwire bench",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="`tickwire bench publish --help`: the publish-throughput bench; "
        "`tickwire bench faults --help`: the fault scenarios.",
    )
    p.add_argument("--rate", type=float, default=10_000, help="events/s published (default 10000)")
    p.add_argument(
        "--symbols", type=int, default=100, help="symbols (2 channels each; default 100)"
    )
    p.add_argument("--clients", type=int, default=100, help="WebSocket clients (default 100)")
    p.add_argument(
        "--channels-per-client",
        type=int,
        default=10,
        help="channels each client subscribes (default 10)",
    )
    p.add_argument("--duration", type=float, default=30, help="measured seconds (default 30)")
    p.add_argument("--warmup", type=float, default=5, help="seconds before measuring (default 5)")
    p.add_argument("--workers", type=int, default=1, help="tickwire server processes (default 1)")
    p.add_argument(
        "--target",
        choices=("tickwire", "baseline", "both"),
        default="both",
        help="what to measure (default both: tickwire, then the naive baseline, same load)",
    )
    p.add_argument(
        "--load-processes", type=int, default=1, help="client load processes (default 1)"
    )
    p.add_argument(
        "--sample-every",
        type=int,
        default=1,
        help="parse and check every Nth connection fully (default 1: all)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure each target this many times, alternating which goes first, and report "
        "the median of each figure (default 1; one run is noisy on a small machine)",
    )
    p.add_argument("--redis", help="use this Redis (FLUSHALL'd!) instead of a private one")
    p.add_argument(
        "--url", help="measure an already running server (ws://…/ws) instead of starting one"
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
        "--step-factor", type=float, default=1.5, help="rate multiplier per step (default 1.5)"
    )
    sat.add_argument(
        "--max-rate", type=float, default=1e7, help="stop stepping above this rate (default 1e7)"
    )
    sat.add_argument(
        "--max-p99-ms",
        type=float,
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
    if args.rounds < 1 or (args.rounds > 1 and s.saturate):
        raise SystemExit("--rounds must be 1 or more, and 1 with --saturate")
    targets = ["tickwire", "baseline"] if args.target == "both" else [args.target]
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
        redis = None if args.redis else RedisProcess().start()
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
        if args.plot:
            plot(rounds, args.plot)
            print(f"plot: {args.plot}", file=sys.stderr)
    if args.json:
        doc = {
            "config": vars(args),
            "runs": [
                {
                    "target": r.target,
                    "passed": r.passed,
                    "latency": r.result.latency,
                    "from_event": r.result.from_event,
                    "figures": r.result.figures,
                    "server": r.result.server,
                    "correctness": r.result.correctness,
                    "steps": [
                        {k: v for k, v in asdict(st).items() if k != "latency_file"}
                        for st in r.steps
                    ],
                }
                for r in runs
                if r.steps
            ],
            "ratios": _ratios(runs),
            "rounds": [
                {"target": r.target, "latency": r.result.latency, "figures": r.result.figures}
                for r in rounds
                if r.steps
            ],
            "versions": {
                "tickwire": __version__,
                "python": platform.python_version(),
                "machine": platform.machine(),
                "cpus": os.cpu_count(),
            },
        }
        Path(args.json).write_bytes(
            orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
        )
    return 0 if all(r.passed for r in rounds) else 1


def _ratios(runs: list[Run]) -> dict[str, float | None]:
    tw = next((r.result for r in runs if r.target == "tickwire" and r.steps), None)
    base = next((r.result for r in runs if r.target == "baseline" and r.steps), None)
    if tw is None or base is None:
        return {}
    out = {k: ratio(v, base.latency.get(k, float("nan"))) for k, v in tw.latency.items()}
    out.update({k: ratio(v, base.figures.get(k, float("nan"))) for k, v in tw.figures.items()})
    if tw.rate != base.rate:
        out["rate"] = ratio(tw.rate, base.rate)
    return out


def conn_flush(url: str) -> None:
    async def go() -> None:
        conn = await RedisConnection.open(url)
        await conn.execute("FLUSHALL")
        conn.close()

    asyncio.run(go())


if __name__ == "__main__":
    raise SystemExit(main())
