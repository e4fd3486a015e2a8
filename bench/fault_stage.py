"""The stage every fault scenario plays on: Redis, a server process, a publishing flow, clients."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from tickwire.bench.fault_clients import LibraryClient, RawClient, Watch
from tickwire.bench.fault_report import Outcome
from tickwire.bench.harness import ServerProcess
from tickwire.bench.load import spread_channels
from tickwire.bench.proxy import Proxy
from tickwire.core.channels import Channel
from tickwire.core.config import PublisherConfig
from tickwire.core.redis_process import RedisProcess
from tickwire.core.redis_wire import RedisConnection
from tickwire.feeds.publisher import Publisher
from tickwire.feeds.simulator import MarketSimulator, make_instruments


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
        async with asyncio.timeout(60):
            await self.pub.flush()
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
        return spread_channels([c.name for c in self.flow.channels], n, per)

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
        server = ServerProcess(url, workers=workers)
        undo.push_async_callback(asyncio.to_thread, server.stop)
        await asyncio.to_thread(server.start, workdir / f"{name}.log")
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
