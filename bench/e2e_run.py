"""End-to-end bench runs: the server under test, its client load and the feed, measured in steps."""

from __future__ import annotations

import asyncio
import contextlib
import math
import queue
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
import orjson

from tickwire.bench.e2e_report import Run, Step, breach
from tickwire.bench.harness import ServerProcess, cpu_seconds, machine_cpu_seconds, start_feed
from tickwire.bench.load import concrete, spread_channels, view_age_file
from tickwire.bench.stats import latency_summary, server_share
from tickwire.core.channels import REGISTRY_KEY, Channel
from tickwire.core.redis_cluster import ClusterConnection
from tickwire.core.redis_target import open_redis
from tickwire.feeds.simulator import default_symbols


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
    #: Every client subscribes these patterns instead of `channels_per_client` channels.
    patterns: tuple[str, ...] = ()
    #: The clients' `max_hz` (None: unthrottled).
    max_hz: float | None = None
    #: The certificate the `TLS_TARGET` serves (PEM with its key; the clients trust it).
    tls_cert: str | None = None


#: tickwire served over TLS (`wss://`): the second target of `tickwire bench --tls`.
TLS_TARGET = "tickwire-tls"


def plan_channels(s: Scenario) -> list[list[str]]:
    if s.patterns:
        return [list(s.patterns) for _ in range(s.clients)]
    names = default_symbols(s.symbols)
    channels = [f"{kind}:{sym}" for sym in names for kind in ("quotes", "trades")]
    return spread_channels(channels, s.clients, s.channels_per_client)


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
        self.server: ServerProcess | None = None
        self.loads: list[LoadProcess] = []
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
        tls_cert = s.tls_cert if self.name == TLS_TARGET else None
        if s.url is None:
            server = ServerProcess(
                self.redis_url,
                workers=s.workers,
                baseline=self.name == "baseline",
                tls_cert=tls_cert,
            )
            self.server = server  # stopped by __exit__ even if it fails to start
            server.start(self.log)
            url = server.url
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
                if s.max_hz is not None:
                    cmd += ["--max-hz", str(s.max_hz)]
                if tls_cert is not None:
                    cmd += ["--cafile", tls_cert]
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
            self.server.stop(grace_s=8)
        self.log.close()

    def step(self, rate: float, index: int = 0) -> Step:
        s, step = self.s, Step(rate)
        total = s.warmup + s.duration
        start_count = published(self.redis_url)
        pub = start_feed(
            self.redis_url,
            rate=rate,
            symbols=s.symbols,
            duration=total,
            seed=1 + index,
            log=self.log,
        )
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
        # How old each sampled client's view of a channel was when a message brought it up to
        # date: receive time minus the publish time of the oldest event it covered (skipped
        # ones included, see `tickwire.bench.load`).
        ages = np.concatenate([np.load(view_age_file(str(part))) for part in parts])
        step.view_age = latency_summary(ages)
        window = after.t - before.t
        # Patterns as the channels they covered by the window's end.
        covered = [concrete(chans, after.seqs) for chans in self.plan[:1]] if s.patterns else []
        finals = asyncio.run(final_seqs(self.redis_url, covered or self.plan))
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
            self.server.metrics_text() if self.server else "",
            redis_cpu,
            cpu_seconds(pids.loads),
            machine_cpu_seconds(),
        )

    def _owed(self, before: dict[str, int], after: dict[str, int]) -> int:
        """Deliveries the clients are owed for what was published between two samples."""
        return sum(
            after.get(ch, 0) - before.get(ch, 0)
            for chans in self.plan
            for ch in concrete(chans, after)
        )


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


def published(url: str) -> int:
    """Events published so far over every channel in the registry."""
    return sum(redis_counters(url)[0].values())


def redis_counters(url: str) -> tuple[dict[str, int], float]:
    """(events published so far per channel in the registry, Redis's CPU seconds)."""

    async def go() -> tuple[dict[str, int], float]:
        conn = await open_redis(url)
        try:
            names = [m.decode() for m in await conn.execute("SMEMBERS", REGISTRY_KEY)]
            # A cluster's CPU is every master's.
            if isinstance(conn, ClusterConnection):
                infos = await conn.execute_on_all("INFO", "cpu")
            else:
                infos = [await conn.execute("INFO", "cpu")]
            replies = await conn.pipeline(
                [["HGET", Channel.parse(n).meta_key, "seq"] for n in names]
            )
        finally:
            conn.close()
        seconds = 0.0
        for info in infos:
            cpu = dict(line.split(":", 1) for line in info.decode().split() if ":" in line)
            seconds += float(cpu.get("used_cpu_user", 0)) + float(cpu.get("used_cpu_sys", 0))
        seqs = {n: int(r) for n, r in zip(names, replies, strict=True) if r is not None}
        return seqs, seconds

    return asyncio.run(go())


async def final_seqs(url: str, plan: list[list[str]]) -> dict[str, int]:
    names = sorted({ch for chans in plan for ch in chans})
    conn = await open_redis(url)
    try:
        replies = await conn.pipeline([["HGET", Channel.parse(n).meta_key, "seq"] for n in names])
    finally:
        conn.close()
    return {n: int(r) for n, r in zip(names, replies, strict=True) if r is not None}


def conn_flush(url: str) -> None:
    async def go() -> None:
        conn = await open_redis(url)
        try:
            if isinstance(conn, ClusterConnection):
                await conn.execute_on_all("FLUSHALL")
            else:
                await conn.execute("FLUSHALL")
        finally:
            conn.close()

    asyncio.run(go())
