"""End-to-end bench: publish → client receive latency and fan-out throughput, against a baseline.

    tickwire bench [--rate 10000] [--symbols 100] [--clients 100] [--channels-per-client 10]
                   [--duration 30] [--warmup 5] [--workers 1] [--target both] [--json FILE]

Starts a private Redis, the server under test (tickwire, then the naive baseline of
`tickwire.bench.baseline`), client load in separate processes and the simulator as publisher;
runs the same scenario against each, then prints one table with the ratios tickwire/baseline.
A run in which any sampled connection saw a duplicate or an unannounced hole is FAILED.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import orjson

from tickwire import __version__
from tickwire.bench.stats import latency_summary, ratio, table
from tickwire.core.channels import Channel
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


@dataclass
class Run:
    target: str
    scenario: Scenario
    latency: dict[str, float] = field(default_factory=dict)
    figures: dict[str, float] = field(default_factory=dict)
    correctness: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        c = self.correctness
        return not (
            c.get("lost") or c.get("duplicates") or c.get("tail_lost") or c.get("violations")
        )


def plan_channels(s: Scenario) -> list[list[str]]:
    names = default_symbols(s.symbols)
    channels = [f"{kind}:{sym}" for sym in names for kind in ("quotes", "trades")]
    per = min(s.channels_per_client, len(channels))
    return [[channels[(i * per + j) % len(channels)] for j in range(per)] for i in range(s.clients)]


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        for p in [pid, *_children(pid)]:
            try:
                fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick
            except (OSError, IndexError, ValueError):
                pass
    return total


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


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
    # cwd elsewhere: from the repo root, `python -m` would import the source folder, not the package.
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=log, cwd=tempfile.gettempdir(), start_new_session=True
    )
    wait_port(port)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(8)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def progress(label: str, elapsed: float, total: float) -> None:
    if not sys.stderr.isatty():
        return
    width = 30
    done = int(width * min(1.0, elapsed / total))
    print(
        f"\r  {label:9} [{'#' * done}{'.' * (width - done)}] {elapsed:5.1f}/{total:.0f} s",
        end="",
        file=sys.stderr,
        flush=True,
    )


def run_target(target: str, s: Scenario, redis_url: str, workdir: Path) -> Run:
    run = Run(target, s)
    port = free_port()
    log = open(workdir / f"{target}.log", "wb")  # noqa: SIM115 - kept open for the child's life
    server = None
    if s.url is None:
        server = start_server(target, redis_url, port, s.workers, log)
        url = f"ws://127.0.0.1:{port}/ws"
    else:
        url = s.url
    plan = plan_channels(s)
    loads = []
    try:
        chunks = [plan[i :: s.load_processes] for i in range(s.load_processes)]
        for i, chunk in enumerate(chunks):
            if not chunk:
                continue
            cmd = [
                sys.executable,
                "-m",
                "tickwire.bench.load",
                "--url",
                url,
                "--plan",
                orjson.dumps(chunk).decode(),
                "--sample-every",
                str(s.sample_every),
                "--latency-file",
                str(workdir / f"{target}-{i}.npy"),
            ]
            loads.append(
                subprocess.Popen(
                    cmd,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    cwd=tempfile.gettempdir(),
                )
            )
        for p in loads:
            assert p.stdout is not None
            line = p.stdout.readline()
            if line.strip() != b"ready":
                raise RuntimeError(
                    f"load process failed to start: {line!r}; see {workdir / (target + '.log')}"
                )
        measure_from = time.time_ns() + int(s.warmup * 1e9)
        for p in loads:
            assert p.stdin is not None
            p.stdin.write(f"go {measure_from}\n".encode())
            p.stdin.flush()
        total = s.warmup + s.duration
        pub = subprocess.Popen(
            [
                str(BIN / "tickwire"),
                "feed",
                "sim",
                "--redis",
                redis_url,
                "--rate",
                str(s.rate),
                "--symbols",
                str(s.symbols),
                "--duration",
                str(total),
                "--seed",
                "1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
            cwd=tempfile.gettempdir(),
        )
        t0 = time.monotonic()
        pids = [server.pid] if server else []
        cpu0 = None
        while pub.poll() is None:
            elapsed = time.monotonic() - t0
            if cpu0 is None and elapsed >= s.warmup:
                cpu0, cpu_t0 = cpu_seconds(pids), time.monotonic()
            progress(target, elapsed, total)
            time.sleep(0.25)
        cpu1, cpu_t1 = cpu_seconds(pids), time.monotonic()
        progress(target, total, total)
        print(file=sys.stderr)
        if pub.returncode != 0:
            raise RuntimeError(
                f"publisher failed ({pub.returncode}); see {workdir / (target + '.log')}"
            )
        time.sleep(1.0)  # let the last events arrive before the clients stop
        results = []
        for p in loads:
            assert p.stdin is not None and p.stdout is not None
            p.stdin.write(b"stop\n")
            p.stdin.flush()
        for p in loads:
            assert p.stdout is not None
            out, _ = p.communicate(timeout=60)
            results.append(orjson.loads(out.strip().splitlines()[-1]))
        lat = np.concatenate([np.load(workdir / f"{target}-{i}.npy") for i in range(len(loads))])
        run.latency = latency_summary(lat)
        finals = asyncio.run(final_seqs(redis_url, plan))
        tail = sum(max(0, finals.get(ch, 0) - last) for r in results for ch, last in r["last_seqs"])
        published = sum(finals.values())
        run.figures = {
            "events_published_per_s": published / total,
            "deliveries_per_s": sum(r["events"] for r in results) / total,
            "frames_per_s": sum(r["frames"] for r in results) / total,
            "egress_MB_per_s": sum(r["bytes"] for r in results) / total / 1e6,
            "server_cpu_percent": 100 * (cpu1 - (cpu0 or 0)) / max(1e-9, cpu_t1 - cpu_t0)
            if cpu0 is not None
            else float("nan"),
        }
        run.correctness = {
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
    finally:
        for p in loads:
            if p.poll() is None:
                p.kill()
        if server is not None:
            stop(server)
        log.close()
    return run


async def final_seqs(url: str, plan: list[list[str]]) -> dict[str, int]:
    names = sorted({ch for chans in plan for ch in chans})
    conn = await RedisConnection.open(url)
    try:
        replies = await conn.pipeline([["HGET", Channel.parse(n).meta_key, "seq"] for n in names])
    finally:
        conn.close()
    return {n: int(r) for n, r in zip(names, replies, strict=True) if r is not None}


def report(runs: list[Run]) -> str:
    tw = next((r for r in runs if r.target == "tickwire"), None)
    base = next((r for r in runs if r.target == "baseline"), None)
    rows: list[tuple[str, float | None, float | None]] = []
    for key in ("p50_us", "p90_us", "p99_us", "p99.9_us", "max_us", "samples"):
        rows.append(
            (
                f"latency {key}",
                tw.latency.get(key) if tw else None,
                base.latency.get(key) if base else None,
            )
        )
    for key in (
        "events_published_per_s",
        "deliveries_per_s",
        "frames_per_s",
        "egress_MB_per_s",
        "server_cpu_percent",
    ):
        rows.append(
            (key, tw.figures.get(key) if tw else None, base.figures.get(key) if base else None)
        )
    for key in ("sampled_events", "lost", "duplicates", "tail_lost", "gaps_announced"):
        rows.append(
            (
                key,
                tw.correctness.get(key) if tw else None,
                base.correctness.get(key) if base else None,
            )
        )
    out = [table(rows, ("tickwire", "baseline"))]
    for r in runs:
        verdict = "PASSED" if r.passed else "FAILED (silent loss or duplicates)"
        out.append(f"{r.target}: {verdict}")
        for key in ("violations", "client_errors", "closed"):
            if r.correctness.get(key):
                out.append(f"  {key}: {r.correctness[key]}")
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tickwire bench",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="`tickwire bench publish --help`: the publish-throughput bench.",
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
    p.add_argument("--target", choices=("tickwire", "baseline", "both"), default="both")
    p.add_argument(
        "--load-processes", type=int, default=1, help="client load processes (default 1)"
    )
    p.add_argument(
        "--sample-every",
        type=int,
        default=1,
        help="parse and check every Nth connection fully (default 1: all)",
    )
    p.add_argument("--redis", help="use this Redis (FLUSHALL'd!) instead of a private one")
    p.add_argument(
        "--url", help="measure an already running server (ws://…/ws) instead of starting one"
    )
    p.add_argument("--json", help="write every figure, the configuration and versions to this file")
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
    )
    targets = ["tickwire", "baseline"] if args.target == "both" else [args.target]
    if args.url:
        targets = targets[:1]
    print(
        f"bench: {s.rate:,.0f} events/s, {s.symbols} symbols, {s.clients} clients x {s.channels_per_client} channels, "
        f"{s.warmup:g}+{s.duration:g} s per target",
        file=sys.stderr,
    )
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="tickwire-bench-") as tmp:
        redis = None if args.redis else RedisProcess().start()
        url = args.redis or (redis.url if redis else "")
        try:
            for target in targets:
                conn_flush(url)
                runs.append(run_target(target, s, url, Path(tmp)))
        finally:
            if redis is not None:
                redis.stop()
    print(report(runs))
    if args.json:
        doc = {
            "config": vars(args),
            "runs": [
                {
                    "target": r.target,
                    "passed": r.passed,
                    "latency": r.latency,
                    "figures": r.figures,
                    "correctness": r.correctness,
                }
                for r in runs
            ],
            "ratios": _ratios(runs),
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
    return 0 if all(r.passed for r in runs) else 1


def _ratios(runs: list[Run]) -> dict[str, float | None]:
    tw = next((r for r in runs if r.target == "tickwire"), None)
    base = next((r for r in runs if r.target == "baseline"), None)
    if tw is None or base is None:
        return {}
    out = {k: ratio(v, base.latency.get(k, float("nan"))) for k, v in tw.latency.items()}
    out.update({k: ratio(v, base.figures.get(k, float("nan"))) for k, v in tw.figures.items()})
    return out


def conn_flush(url: str) -> None:
    async def go() -> None:
        conn = await RedisConnection.open(url)
        await conn.execute("FLUSHALL")
        conn.close()

    asyncio.run(go())


if __name__ == "__main__":
    raise SystemExit(main())
