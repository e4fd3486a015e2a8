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
import asyncio
import contextlib
import http.client
import logging
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
import websockets
from websockets.asyncio.client import ClientConnection

from tickwire import __version__
from tickwire.bench.invariant import InvariantChecker
from tickwire.bench.procs import children, rss_mb, start_group, stop_group
from tickwire.bench.proxy import Proxy
from tickwire.clients import (
    EventBatch,
    Gap,
    Reconnected,
    Reset,
    Status,
    connect,
)
from tickwire.clients.session import UNRECOVERED
from tickwire.core.channels import Channel
from tickwire.core.config import PublisherConfig
from tickwire.core.redis_process import RedisProcess, free_port
from tickwire.core.redis_wire import RedisConnection
from tickwire.feeds.publisher import Publisher
from tickwire.feeds.simulator import MarketSimulator, make_instruments

BIN = Path(sys.executable).parent
#: The issue's targets.
STORM_RESUME_S = 10.0
HEALTHZ_MS = 100.0
#: Server memory growth we still call bounded while one client does not read.
RSS_GROWTH_MB = 100.0
SLOW_MIN_RATE = 2000.0  # events/s the slow-consumer scenario publishes at least

# -- settings and results ---------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    clients: int
    rate: float
    kill_rate: float
    symbols: int
    channels_per_client: int
    storm_clients: int
    slow_clients: int
    pause_s: float
    hold_s: float
    steady_s: float
    seed: int = 0


@dataclass
class Outcome:
    scenario: str
    clients: int = 0
    published: int = 0
    delivered: int = 0
    lost_silently: int = 0
    duplicates: int = 0
    gaps: int = 0
    gap_events: int = 0
    resets: int = 0
    recover_s: float | None = None
    #: Correctness failures: any of them fails the scenario (and the exit status).
    problems: list[str] = field(default_factory=list)
    #: Targets missed (time, memory): reported, the exit status stays 0.
    misses: list[str] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def correct(self) -> bool:
        return not self.problems and self.lost_silently == 0 and self.duplicates == 0

    @property
    def verdict(self) -> str:
        if not self.correct:
            return "FAIL"
        return "MISS" if self.misses else "ok"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "correct": self.correct, "verdict": self.verdict}


# -- clients ------------------------------------------------------------------------------------


class Watch:
    """What one client received, checked message by message."""

    def __init__(self, name: str, channels: list[str]) -> None:
        self.name = name
        self.channels = channels
        self.checker = InvariantChecker()
        #: Highest seq delivered or announced as a gap, per (channel, epoch).
        self.reached: dict[tuple[str, str], int] = {}
        self.gaps: list[tuple[str, int, int, str]] = []
        self.reset_channels: set[str] = set()
        self.statuses: list[str] = []
        self.connects = 0
        self.reconnects = 0
        self.close_codes: list[int | None] = []
        #: Holes the client library found unexplained and had to announce itself.
        self.unrecovered = 0
        self.mark_ns = 0
        #: When (monotonic) the first event published after `mark()` arrived.
        self.fresh_at: float | None = None
        self.task: asyncio.Task[None] | None = None

    def mark(self, now_ns: int) -> None:
        self.mark_ns = now_ns
        self.fresh_at = None

    def feed(self, m: dict[str, Any]) -> None:
        self.checker.feed(m)
        kind = m.get("type")
        if kind == "events":
            events = m["events"]
            if not events:
                return
            last = events[-1]
            key = (m["ch"], last["epoch"])
            if last["seq"] > self.reached.get(key, 0):
                self.reached[key] = last["seq"]
            if self.fresh_at is None and self.mark_ns and last["pt"] >= self.mark_ns:
                self.fresh_at = time.monotonic()
        elif kind == "gap":
            ch, a, b = m["ch"], int(m["from_seq"]), int(m["to_seq"])
            self.gaps.append((ch, a, b, m["reason"]))
            track = self.checker.channels.get(ch)
            key = (ch, (track.epoch if track else None) or "")
            self.reached[key] = max(self.reached.get(key, 0), b)
        elif kind == "reset":
            self.reset_channels.add(m["ch"])
        elif kind == "status":
            self.statuses.append(m["redis"])

    def shortfall(self, final: dict[str, tuple[str, int]]) -> int:
        """Events of the final positions this client has not reached (0 when done)."""
        missing = 0
        for ch in self.channels:
            if ch in final:
                epoch, seq = final[ch]
                missing += max(0, seq - self.reached.get((ch, epoch), 0))
        return missing

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()


class RawClient(Watch):
    """A plain WebSocket client that resumes by hand from its last (epoch, seq) per channel."""

    def __init__(
        self,
        name: str,
        url: str,
        channels: list[str],
        *,
        resume: bool = True,
        rcvbuf: int | None = None,
    ) -> None:
        super().__init__(name, channels)
        self.url = url
        self.resume = resume
        self.rcvbuf = rcvbuf
        self.ws: ClientConnection | None = None
        self.subscribed = asyncio.Event()
        #: Cleared: stop taking frames (the socket fills up, as with a stalled consumer).
        self.reading = asyncio.Event()
        self.reading.set()
        self._id = 0

    async def _open(self) -> ClientConnection:
        sock = None
        if self.rcvbuf is not None:
            # A small fixed receive buffer (no autotuning): a stalled reader fills up quickly.
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            sock.setblocking(False)
            host, port = self.url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
            try:
                await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
            except OSError:
                sock.close()
                raise
        return await websockets.connect(
            self.url, compression=None, max_size=None, open_timeout=30, max_queue=4, sock=sock
        )

    def _subscribe_frame(self) -> bytes:
        self._id += 1
        resume = {
            ch: {"epoch": t.epoch, "seq": t.last}
            for ch, t in self.checker.channels.items()
            if t.epoch and t.last is not None
        }
        request: dict[str, Any] = {"op": "subscribe", "id": self._id, "channels": self.channels}
        if resume:
            request["resume"] = resume
        return orjson.dumps(request)

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                ws = await self._open()
            except (OSError, websockets.WebSocketException, TimeoutError):
                failures += 1
                await asyncio.sleep(random.uniform(0, min(1.0, 0.05 * 2**failures)))
                continue
            failures = 0
            self.ws = ws
            self.connects += 1
            if self.connects > 1:
                self.reconnects += 1
            try:
                await ws.send(self._subscribe_frame().decode())
                self.subscribed.set()
                while True:
                    await self.reading.wait()
                    frame = await ws.recv(decode=False)
                    doc = orjson.loads(frame)
                    for m in doc if isinstance(doc, list) else (doc,):
                        self.feed(m)
            except websockets.ConnectionClosed:
                pass
            finally:
                self.close_codes.append(ws.close_code)
                self.ws = None
            if not self.resume:
                return

    def drop(self) -> None:
        """Lose the connection without a closing handshake (the client resumes at once)."""
        if self.ws is not None:
            self.ws.transport.abort()


class LibraryClient(Watch):
    """A `tickwire.clients` feed: the library reconnects and resumes by itself."""

    def __init__(self, name: str, url: str, channels: list[str]) -> None:
        super().__init__(name, channels)
        self.url = url
        self.subscribed = asyncio.Event()

    async def run(self) -> None:
        async with connect(
            self.url, backoff_initial_s=0.05, backoff_max_s=1.0, open_timeout_s=30
        ) as feed:
            await feed.subscribe(*self.channels)
            self.connects = 1
            self.subscribed.set()
            async for msg in feed.batches():
                if isinstance(msg, EventBatch):
                    events = [{"seq": e.seq, "epoch": e.epoch, "pt": e.pt} for e in msg.events]
                    self.feed(
                        {"type": "events", "ch": msg.channel, "epoch": msg.epoch, "events": events}
                    )
                elif isinstance(msg, Gap):
                    if msg.reason == UNRECOVERED:
                        self.unrecovered += msg.count
                    self.feed(
                        {
                            "type": "gap",
                            "ch": msg.channel,
                            "from_seq": msg.from_seq,
                            "to_seq": msg.to_seq,
                            "reason": msg.reason,
                        }
                    )
                elif isinstance(msg, Reset):
                    self.feed({"type": "reset", "ch": msg.channel, "epoch": msg.epoch})
                elif isinstance(msg, Status):
                    self.statuses.append(msg.redis)
                elif isinstance(msg, Reconnected):
                    self.connects += 1
                    self.reconnects += 1


# -- processes ----------------------------------------------------------------------------------


async def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = await reader.read()
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


class ServerProcess:
    """`tickwire serve` as a real process group: the server, or a supervisor and its workers."""

    def __init__(self, redis_url: str, log_path: Path, *, workers: int = 1) -> None:
        self.redis_url = redis_url
        self.log_path = log_path
        self.workers = workers
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def start(self) -> None:
        cmd = [str(BIN / "tickwire"), "serve", "--redis", self.redis_url]
        cmd += ["--port", str(self.port), "--workers", str(self.workers)]
        with open(self.log_path, "ab") as log:
            self.proc = await asyncio.to_thread(start_group, cmd, log)
        async with asyncio.timeout(30):
            while True:
                with contextlib.suppress(OSError, TimeoutError, IndexError, ValueError):
                    status, _ = await http_get(self.port, "/healthz", 1.0)
                    if status == 200 and (
                        self.workers == 1 or len(self.worker_pids()) >= self.workers
                    ):
                        return
                if self.proc.poll() is not None:
                    raise RuntimeError(f"tickwire serve exited; see {self.log_path}")
                await asyncio.sleep(0.05)

    def worker_pids(self) -> list[int]:
        if self.proc is None or self.workers == 1:
            return []
        return children(self.proc.pid)

    def connections_by_worker(self) -> dict[int, int]:
        """Established connections on the server port, per worker pid (from /proc)."""
        inodes: dict[str, int] = {}
        for pid in self.worker_pids():
            with contextlib.suppress(OSError):
                for fd in Path(f"/proc/{pid}/fd").iterdir():
                    with contextlib.suppress(OSError):
                        link = os.readlink(fd)
                        if link.startswith("socket:["):
                            inodes[link[8:-1]] = pid
        counts = dict.fromkeys(self.worker_pids(), 0)
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            cols = line.split()
            local_port = int(cols[1].rsplit(":", 1)[1], 16)
            if local_port == self.port and cols[3] == "01" and cols[9] in inodes:  # ESTABLISHED
                counts[inodes[cols[9]]] += 1
        return counts

    def rss_mb(self) -> float:
        if self.proc is None:
            return 0.0
        return rss_mb([self.proc.pid, *children(self.proc.pid)])

    async def metric(self, name: str) -> float:
        _, body = await http_get(self.port, "/metrics")
        for line in body.decode().splitlines():
            key, _, value = line.partition(" ")
            if key in (name, "tickwire_" + name):
                return float(value)
        return 0.0

    async def stop(self) -> None:
        if self.proc is not None:
            await asyncio.to_thread(stop_group, self.proc)


class HealthProbe:
    """GET /healthz every `every_s` from a thread: this process's own loop lag is not measured."""

    def __init__(self, port: int, every_s: float = 0.1) -> None:
        self.port = port
        self.every_s = every_s
        self.times_ms: list[float] = []
        self.statuses: dict[int, int] = {}
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            t0 = time.perf_counter()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/healthz")
                status = conn.getresponse().status
                conn.close()
            except OSError:
                self.errors += 1
                continue
            self.times_ms.append((time.perf_counter() - t0) * 1000)
            self.statuses[status] = self.statuses.get(status, 0) + 1

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class Flow:
    """Publishes simulated quotes and trades at `rate` events/s with tickwire's Publisher."""

    def __init__(self, redis_url: str, rate: float, symbols: int, seed: int) -> None:
        self.sim = MarketSimulator(make_instruments(symbols, seed), rate=rate, seed=seed)
        self.pub = Publisher(PublisherConfig(redis_url=redis_url))
        self.rate = rate
        self.generated = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def channels(self) -> list[Channel]:
        names = [i.symbol for i in self.sim.instruments]
        return [Channel(kind, s) for s in names for kind in ("quotes", "trades")]

    async def start(self) -> None:
        await self.pub.start()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        t0 = time.monotonic()
        while not self._stop.is_set():
            due = int((time.monotonic() - t0) * self.rate) - self.generated
            while due > 0:
                n = min(due, 4096)
                chunk = self.sim.next_chunk(n)
                await self.pub.publish(self.sim.encode(chunk, self.pub.clock_ns()))
                self.generated += n
                due -= n
            # 20 ms ticks: fewer, larger appends; sleeps under 1 ms make uvloop spin.
            await asyncio.sleep(0.02)

    async def stop(self) -> dict[str, tuple[str, int]]:
        """Stop publishing, wait until Redis has everything; the final (epoch, seq) per channel."""
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None
        await asyncio.wait_for(self.pub.flush(), 60)
        return {c.name: pos for c, pos in self.pub.positions.items()}

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.pub.close()


async def until(cond: Callable[[], bool], timeout: float) -> bool:
    """Wait for a condition over many clients; False on timeout."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        # Polled: checking hundreds of clients on every frame would cost more than the clients.
        await asyncio.sleep(0.05)
    return True


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- the stage every scenario plays on ---------------------------------------------------------


@dataclass
class Stage:
    settings: Settings
    name: str
    redis: RedisProcess
    server: ServerProcess
    flow: Flow
    proxy: Proxy | None = None
    clients: list[Watch] = field(default_factory=list)

    async def stop_clients(self) -> None:
        for c in self.clients:
            c.stop()
        await asyncio.gather(*(c.task for c in self.clients if c.task), return_exceptions=True)

    def plan(self, n: int, per: int) -> list[list[str]]:
        names = [c.name for c in self.flow.channels]
        per = min(per, len(names))
        return [[names[(i * per + j) % len(names)] for j in range(per)] for i in range(n)]

    async def add_raw(
        self,
        n: int,
        *,
        resume: bool = True,
        channels: list[str] | None = None,
        rcvbuf: int | None = None,
    ) -> list[RawClient]:
        plan = self.plan(n, self.settings.channels_per_client) if channels is None else [channels]
        out = [
            RawClient(
                f"{self.name}-{len(self.clients) + i}",
                self.server.url,
                chans,
                resume=resume,
                rcvbuf=rcvbuf,
            )
            for i, chans in enumerate(plan)
        ]
        await self._start(out)
        return out

    async def add_library(self, n: int) -> list[LibraryClient]:
        out = [
            LibraryClient(f"{self.name}-{len(self.clients) + i}", self.server.url, chans)
            for i, chans in enumerate(self.plan(n, self.settings.channels_per_client))
        ]
        await self._start(out)
        return out

    async def _start(self, clients: Sequence[RawClient | LibraryClient]) -> None:
        for i in range(0, len(clients), 50):
            # Fifty at a time: don't SYN-flood the accept queue.
            group = clients[i : i + 50]
            for c in group:
                c.task = asyncio.create_task(c.run())
            async with asyncio.timeout(60):
                await asyncio.gather(*(c.subscribed.wait() for c in group))
        self.clients.extend(clients)

    async def warm(self, clients: Sequence[Watch] | None = None) -> None:
        """Wait until every client has had events on each of its channels."""
        group = list(self.clients if clients is None else clients)
        ok = await until(
            lambda: all(all(ch in c.checker.channels for ch in c.channels) for c in group),
            60,
        )
        if not ok:
            raise RuntimeError(f"{self.name}: clients got no events within 60 s")

    async def steady(self) -> None:
        """Let the stream run (a phase of the scenario, not a wait for something)."""
        await asyncio.sleep(self.settings.steady_s)

    def mark(self, clients: Sequence[Watch] | None = None) -> float:
        now_ns = time.time_ns()
        for c in self.clients if clients is None else clients:
            c.mark(now_ns)
        return time.monotonic()

    async def recovered(
        self, since: float, clients: Sequence[Watch] | None = None, timeout: float = 60.0
    ) -> float | None:
        """Seconds until every client had an event published after `since` (None: never)."""
        group = list(self.clients if clients is None else clients)
        if not await until(lambda: all(c.fresh_at is not None for c in group), timeout):
            return None
        return max(c.fresh_at or since for c in group) - since

    async def finish(self, out: Outcome, active: Sequence[Watch] | None = None) -> Outcome:
        """Stop publishing, wait for the clients to get everything, and count."""
        group = list(self.clients if active is None else active)
        final = await self.flow.stop()
        if not await until(lambda: all(c.shortfall(final) == 0 for c in group), 60):
            short = [c for c in group if c.shortfall(final)]
            out.problems.append(
                f"{len(short)} clients never got the last events (e.g. {short[0].name})"
            )
            out.lost_silently += sum(c.shortfall(final) for c in short)
        kept, resent = await self.kept()
        if resent:
            # A batch whose reply was lost is written again; the append must store it once.
            out.problems.append(f"{resent} trades stored twice by the publisher")
        missing = 0
        for c in group:
            for (ch, epoch), top in kept.items():
                got = c.reached.get((ch, epoch))
                # Earlier epochs only: the final one is the shortfall above.
                if got is not None and got < top and final.get(ch, ("", 0))[0] != epoch:
                    missing += top - got
        if missing:
            out.problems.append(f"{missing} events Redis kept never reached clients of their epoch")
            out.lost_silently += missing
        pub = self.flow.pub
        out.clients = len(self.clients)
        out.published = pub.stats.published
        out.delivered = sum(c.checker.delivered for c in self.clients)
        out.lost_silently += sum(c.checker.lost + c.unrecovered for c in self.clients)
        out.duplicates = sum(c.checker.duplicates for c in self.clients)
        out.gaps = sum(c.checker.gaps_announced for c in self.clients)
        out.gap_events = sum(c.checker.gap_events for c in self.clients)
        out.resets = sum(c.checker.resets for c in self.clients)
        other = [
            v
            for c in self.clients
            for v in c.checker.violations
            if "silent hole" not in v and "duplicate" not in v
        ]
        if other:
            out.problems.append(f"{len(other)} invariant violations, e.g. {other[0]}")
        if pub.stats.dropped:
            out.notes["publisher_dropped_unsequenced"] = pub.stats.dropped
        return out

    async def kept(self) -> tuple[dict[tuple[str, str], int], int]:
        """Highest seq Redis holds per (channel, epoch), read from the streams themselves, and
        how many trades it holds twice (same trade id under two seqs)."""
        conn = await RedisConnection.open(self.redis.url)
        out: dict[tuple[str, str], int] = {}
        twice = 0
        try:
            for ch in self.flow.channels:
                entries = await conn.execute("XRANGE", ch.stream_key, "-", "+", timeout=30)
                trade_ids: set[int] = set()
                for entry_id, fields in entries:
                    event = orjson.loads(fields[1])
                    seq = int(entry_id.split(b"-")[0])
                    key = (ch.name, event["epoch"])
                    if seq > out.get(key, 0):
                        out[key] = seq
                    if ch.kind == "trades":
                        if event["trade_id"] in trade_ids:
                            twice += 1
                        trade_ids.add(event["trade_id"])
        finally:
            conn.close()
        return out, twice


@contextlib.asynccontextmanager
async def stage(
    st: Settings,
    name: str,
    workdir: Path,
    *,
    rate: float | None = None,
    workers: int = 1,
    appendonly: bool = True,
    proxy: bool = False,
) -> AsyncIterator[Stage]:
    # Each step undone in reverse order, every one even if another fails: no process is left.
    async with contextlib.AsyncExitStack() as undo:
        redis = RedisProcess(appendonly=appendonly, appendfsync="everysec")
        undo.push_async_callback(asyncio.to_thread, redis.stop)
        await asyncio.to_thread(redis.start)
        prox: Proxy | None = None
        if proxy:
            prox = await Proxy(redis.port).start()
            undo.push_async_callback(prox.close)
        url = f"redis://127.0.0.1:{prox.port}/0" if prox is not None else redis.url
        server = ServerProcess(url, workdir / f"{name}.log", workers=workers)
        undo.push_async_callback(server.stop)
        await server.start()
        flow = Flow(redis.url, rate or st.rate, st.symbols, st.seed)
        undo.push_async_callback(flow.close)
        await flow.start()
        s = Stage(st, name, redis, server, flow, prox)
        undo.push_async_callback(s.stop_clients)
        yield s


def expect_status(out: Outcome, clients: Sequence[Watch]) -> None:
    """Every client was told Redis went away and came back."""
    told = [c for c in clients if "down" in c.statuses and c.statuses[-1] == "up"]
    out.notes["clients_told_down_up"] = len(told)
    if len(told) < len(clients):
        out.problems.append(f"{len(clients) - len(told)} clients were not told status down/up")


# -- scenarios ---------------------------------------------------------------------------------


async def restart_redis(s: Stage, out: Outcome, clients: Sequence[Watch]) -> None:
    """After 2 s without Redis, start it again; time the recovery, stream on, count, and check
    every client was told `down` then `up`."""
    await asyncio.sleep(2.0)  # the outage
    await asyncio.to_thread(s.redis.start)
    out.recover_s = await s.recovered(s.mark())
    await s.steady()
    await s.finish(out)
    expect_status(out, clients)


def aof_tail(data_dir: Path) -> Path | None:
    """The AOF file Redis is appending to (Redis 7: appendonlydir/*.incr.aof)."""
    files = sorted((data_dir / "appendonlydir").glob("*.incr.aof"), key=lambda p: p.stat().st_mtime)
    return files[-1] if files else None


async def redis_kill_aof(st: Settings, workdir: Path, *, crash: bool = False) -> Outcome:
    out = Outcome("redis-crash-aof" if crash else "redis-kill-aof")
    async with stage(st, out.scenario, workdir, rate=st.kill_rate) as s:
        clients = await s.add_raw(st.clients)
        await s.warm()
        await s.steady()
        tail = aof_tail(s.redis.data_dir)
        size = tail.stat().st_size if tail is not None else 0
        if crash:
            await asyncio.sleep(1.0)  # the second of writes the crash will take away
        say("  kill -9 redis-server (AOF, appendfsync everysec), restart in 2 s")
        await asyncio.to_thread(s.redis.kill)
        acked = dict(s.flow.pub.positions)
        if crash and tail is not None:
            # What a machine crash under everysec may do: the last second never reached disk.
            # Redis loads a truncated AOF up to its last whole command (aof-load-truncated).
            out.notes["aof_bytes_dropped"] = tail.stat().st_size - size
            os.truncate(tail, size)
        await restart_redis(s, out, clients)
        kept, _ = await s.kept()
        lost_by_redis = sum(
            max(0, seq - kept.get((ch.name, epoch), 0)) for ch, (epoch, seq) in acked.items()
        )
        # Acknowledged before the kill and gone after the restart.
        out.notes["acked_then_lost_by_redis"] = lost_by_redis
        out.notes["channel_subscriptions_reset"] = sum(len(c.reset_channels) for c in clients)
        if crash and lost_by_redis == 0:
            out.problems.append("the crash lost nothing: the rollback path was not exercised")
        if lost_by_redis and not out.resets:
            out.problems.append("Redis lost acknowledged events and no client was told (reset)")
        out.notes["rate"] = st.kill_rate
    return out


async def redis_crash_aof(st: Settings, workdir: Path) -> Outcome:
    return await redis_kill_aof(st, workdir, crash=True)


async def redis_kill_nopersist(st: Settings, workdir: Path) -> Outcome:
    out = Outcome("redis-kill-nopersist")
    async with stage(st, out.scenario, workdir, appendonly=False) as s:
        clients = await s.add_raw(st.clients)
        await s.warm()
        await s.steady()
        say("  kill -9 redis-server (no persistence), restart empty in 2 s")
        await asyncio.to_thread(s.redis.kill)
        await asyncio.to_thread(s.redis.wipe)
        await restart_redis(s, out, clients)
        unreset = sum(len(set(c.channels) - c.reset_channels) for c in clients)
        out.notes["channel_subscriptions_reset"] = sum(len(c.reset_channels) for c in clients)
        if unreset:
            out.problems.append(f"{unreset} channel subscriptions got no reset after the data loss")
    return out


async def redis_pause(st: Settings, workdir: Path) -> Outcome:
    out = Outcome("redis-pause")
    async with stage(st, out.scenario, workdir) as s:
        await s.add_raw(st.clients)
        await s.warm()
        await s.steady()
        say(f"  SIGSTOP redis-server for {st.pause_s:g} s, polling /healthz every 100 ms")
        with HealthProbe(s.server.port) as probe:
            s.redis.pause()
            await asyncio.sleep(st.pause_s)  # the outage
            s.redis.resume()
            since = s.mark()
            out.recover_s = await s.recovered(since)
            await s.steady()
        await s.finish(out)
        worst = max(probe.times_ms, default=0.0)
        out.notes["healthz_probes"] = len(probe.times_ms)
        out.notes["healthz_max_ms"] = round(worst, 1)
        out.notes["healthz_statuses"] = {str(k): v for k, v in probe.statuses.items()}
        out.notes["status_messages"] = sorted({tuple(c.statuses) for c in s.clients})[:3]
        if probe.errors:
            out.misses.append(f"/healthz failed {probe.errors} times")
        if worst > HEALTHZ_MS:
            out.misses.append(f"/healthz took {worst:.0f} ms (target {HEALTHZ_MS:.0f})")
    return out


async def proxy_scenario(
    st: Settings, workdir: Path, name: str, fault: Callable[[Proxy], None], what: str
) -> Outcome:
    out = Outcome(name)
    async with stage(st, name, workdir, proxy=True) as s:
        assert s.proxy is not None
        clients = await s.add_raw(st.clients)
        await s.warm()
        await s.steady()
        say(f"  {what} for {st.hold_s:g} s")
        fault(s.proxy)
        await asyncio.sleep(st.hold_s)  # the fault
        s.proxy.pass_through()
        since = s.mark()
        out.recover_s = await s.recovered(since)
        await s.steady()
        await s.finish(out)
        stats = s.proxy.stats
        out.notes["proxy"] = {
            "resets": stats.resets,
            "refused": stats.refused,
            "bytes_dropped": stats.bytes_dropped,
        }
        out.notes["clients_told_down"] = sum("down" in c.statuses for c in clients)
        if name == "proxy-delay" and out.notes["clients_told_down"]:
            out.misses.append("status went down under 50-200 ms of delay")
        if name == "proxy-reset" or (name == "proxy-blackhole" and st.hold_s > 6):
            # A black hole shows only when the idle subscription's PING goes unanswered (5 s).
            expect_status(out, clients)
    return out


async def proxy_delay(st: Settings, workdir: Path) -> Outcome:
    return await proxy_scenario(
        st, workdir, "proxy-delay", lambda p: p.delay(0.05, 0.15), "delay Redis 50-200 ms each way"
    )


async def proxy_blackhole(st: Settings, workdir: Path) -> Outcome:
    return await proxy_scenario(
        st, workdir, "proxy-blackhole", lambda p: p.blackhole(), "black-hole the Redis link"
    )


async def proxy_reset(st: Settings, workdir: Path) -> Outcome:
    def fault(p: Proxy) -> None:
        p.reset(refuse_new=True)

    return await proxy_scenario(
        st, workdir, "proxy-reset", fault, "RST every Redis connection and refuse new ones"
    )


async def worker_kill(st: Settings, workdir: Path) -> Outcome:
    out = Outcome("worker-kill")
    async with stage(st, out.scenario, workdir, workers=2) as s:
        clients = await s.add_library(st.clients)
        await s.warm()
        await s.steady()
        load = s.server.connections_by_worker()
        victim = max(load, key=lambda pid: load[pid])
        say(f"  kill -9 worker {victim} ({load[victim]} of {len(clients)} clients on it)")
        os.kill(victim, signal.SIGKILL)
        since = s.mark()
        out.recover_s = await s.recovered(since)
        await s.steady()
        await s.finish(out)
        moved = [c for c in clients if c.reconnects]
        out.notes["clients_on_killed_worker"] = load[victim]
        out.notes["clients_reconnected"] = len(moved)
        out.notes["workers_after"] = len(s.server.worker_pids())
        if not moved:
            out.problems.append("no client was on the killed worker: nothing was tested")
    return out


async def storm(st: Settings, workdir: Path) -> Outcome:
    out = Outcome("storm")
    async with stage(st, out.scenario, workdir) as s:
        clients = await s.add_raw(st.storm_clients)
        await s.warm()
        await s.steady()
        dropped = clients[::3]
        say(f"  drop {len(dropped)} of {len(clients)} connections at once; they resume")
        since = s.mark(dropped)
        for c in dropped:
            c.drop()
        out.recover_s = await s.recovered(since, dropped)
        await s.steady()
        await s.finish(out)
        back = [c for c in dropped if c.connects >= 2]
        out.notes["dropped"] = len(dropped)
        out.notes["resumed"] = len(back)
        if len(back) < len(dropped):
            out.problems.append(f"{len(dropped) - len(back)} dropped clients never came back")
        if out.recover_s is None or out.recover_s > STORM_RESUME_S:
            out.misses.append(f"not every dropped client resumed within {STORM_RESUME_S:g} s")
    return out


async def slow_consumer(st: Settings, workdir: Path) -> Outcome:
    out = Outcome("slow-consumer")
    # The kernel's socket buffers hold megabytes: below ~2 000 events/s the stalled client would
    # not back up into the server's outbox within the scenario's time, at any --scale.
    async with stage(st, out.scenario, workdir, rate=max(st.rate, SLOW_MIN_RATE)) as s:
        fast = await s.add_raw(st.slow_clients)
        everything = [c.name for c in s.flow.channels]
        (slow,) = await s.add_raw(1, resume=False, channels=everything, rcvbuf=16384)
        await s.warm(fast)
        await s.steady()
        base = s.server.rss_mb()
        say(f"  one client stops reading among {len(fast)}; server RSS {base:.0f} MB")
        slow.reading.clear()
        t0 = time.monotonic()
        peak = base
        closed_after: float | None = None
        while time.monotonic() - t0 < 90:
            peak = max(peak, s.server.rss_mb())
            if await s.server.metric("slow_disconnects_total") >= 1:
                closed_after = time.monotonic() - t0
                break
            await asyncio.sleep(0.25)  # sampling memory while the socket fills
        slow.reading.set()
        await s.steady()
        peak = max(peak, s.server.rss_mb())
        await until(lambda: slow.task is not None and slow.task.done(), 15)
        await s.finish(out, fast)
        shed = [g for g in slow.gaps if g[3] in ("slow_consumer", "conflated")]
        for name in ("dropped_events", "conflated_events"):
            # Shed from the slow client's outbox before it was closed (it never saw the gaps).
            out.notes[f"server_outbox_{name}"] = int(await s.server.metric(f"outbox_{name}_total"))
        out.notes["rss_mb_before"] = round(base, 1)
        out.notes["rss_mb_peak"] = round(peak, 1)
        out.notes["slow_closed_after_s"] = None if closed_after is None else round(closed_after, 1)
        out.notes["slow_close_codes"] = slow.close_codes
        out.notes["slow_gaps_seen"] = len(shed)
        fast_gaps = sum(len(c.gaps) for c in fast)
        out.notes["fast_clients_gaps"] = fast_gaps
        if closed_after is None and not shed:
            out.problems.append("the slow consumer was neither conflated nor closed")
        if fast_gaps:
            out.misses.append(f"fast clients got {fast_gaps} gaps")
        if peak - base > RSS_GROWTH_MB:
            out.misses.append(f"server RSS grew {peak - base:.0f} MB")
    return out


Scenario = Callable[[Settings, Path], Awaitable[Outcome]]
SCENARIOS: dict[str, tuple[Scenario, str]] = {
    "redis-kill-aof": (
        redis_kill_aof,
        "kill -9 Redis (AOF everysec) at --kill-rate, restart after 2 s",
    ),
    "redis-crash-aof": (
        redis_crash_aof,
        "the same, and the AOF loses its last second, as a machine crash under everysec may",
    ),
    "redis-kill-nopersist": (
        redis_kill_nopersist,
        "kill -9 Redis without persistence, restart empty: every client gets reset",
    ),
    "redis-pause": (redis_pause, "SIGSTOP Redis for --pause s; /healthz must answer throughout"),
    "proxy-delay": (proxy_delay, "server's Redis link delayed 50-200 ms each way for --hold s"),
    "proxy-blackhole": (proxy_blackhole, "server's Redis link black-holed for --hold s"),
    "proxy-reset": (proxy_reset, "server's Redis connections RST, new ones refused, --hold s"),
    "worker-kill": (worker_kill, "kill -9 one of 2 workers; library clients resume elsewhere"),
    "storm": (storm, "a third of --storm-clients drop at once and resume"),
    "slow-consumer": (slow_consumer, "one client stops reading among --slow-clients"),
}


# -- command line -------------------------------------------------------------------------------


def print_table(outcomes: list[Outcome]) -> None:
    head = (
        f"{'scenario':22} {'published':>9} {'delivered':>10} {'lost silently':>13} "
        f"{'gaps':>5} {'resets':>6} {'recover s':>9}  verdict"
    )
    print(head)
    for o in outcomes:
        rec = "-" if o.recover_s is None else f"{o.recover_s:.2f}"
        print(
            f"{o.scenario:22} {o.published:9d} {o.delivered:10d} {o.lost_silently:13d} "
            f"{o.gaps:5d} {o.resets:6d} {rec:>9}  {o.verdict}"
        )
    for o in outcomes:
        why = "; ".join(o.problems + o.misses)
        notes = ", ".join(f"{k}={v}" for k, v in o.notes.items())
        print(f"  {o.scenario}: {notes}" + (f" | {why}" if why else ""))


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
        type=float,
        default=1.0,
        help="multiplies client counts and fault durations (1: the issue's 300 storm clients, "
        "200 slow-consumer clients, a 15 s pause; default 1)",
    )
    p.add_argument("--clients", type=int, help="clients per scenario (default 50 x scale)")
    p.add_argument("--storm-clients", type=int, help="storm clients (default 300 x scale)")
    p.add_argument("--slow-clients", type=int, help="slow-consumer clients (default 200 x scale)")
    p.add_argument("--rate", type=float, default=2000.0, help="events/s published (default 2000)")
    p.add_argument("--kill-rate", type=float, help="events/s for redis-kill-aof (default 5 x rate)")
    p.add_argument("--symbols", type=int, default=10, help="symbols (2 channels each; default 10)")
    p.add_argument(
        "--channels-per-client", type=int, default=2, help="channels per client (default 2)"
    )
    p.add_argument("--pause", type=float, help="redis-pause SIGSTOP seconds (default 15 x scale)")
    p.add_argument("--hold", type=float, help="proxy fault seconds (default 8 x scale)")
    p.add_argument("--steady", type=float, help="streaming before/after faults (default 2 s)")
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
        result = {
            "command": "tickwire bench faults " + " ".join(sys.argv[3:] if argv is None else argv),
            "settings": asdict(st),
            "seconds": round(time.monotonic() - t0, 1),
            "version": __version__,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "scenarios": [o.to_json() for o in outcomes],
        }
        Path(args.json).write_text(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    return 0 if all(o.correct for o in outcomes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
