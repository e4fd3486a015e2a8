"""`tickwire bars`: makes the on-demand bar channels servers ask for, from the trades in Redis.

Servers record demand in the sorted set `BAR_DEMAND_KEY` (a pattern such as `bars.5s:*` or
`bars.250ms:BTC-USD`, scored with the time its demand lapses). Each step the maker reads it,
and for every channel wanted (a wildcard: every symbol with a `trades` channel) it holds the
channel's writer lease (`bar_writer_key`, one key in the symbol's slot) or leaves the channel to
the process that holds it, so any number of makers can run and each channel has one writer.
For a channel it holds it reads the trades stream onward from where it was (XRANGE pages, one
symbol per call), folds them into bars (`IntervalBars`, numpy) and publishes the bars that are
due through the `Publisher`, like any feed: dense seq, epoch, history, resume, snapshots all
apply. A channel whose demand lapsed is dropped and its lease released.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from tickwire.core.acl import acl_hint
from tickwire.core.channels import (
    BAR_DEMAND_KEY,
    BAR_PREFIX,
    REGISTRY_KEY,
    Channel,
    ChannelPattern,
    bar_writer_key,
    is_on_demand,
)
from tickwire.core.commands import Arg, RedisReplyError, wrong_type
from tickwire.core.errors import ChannelError, RedisUnavailable
from tickwire.core.redis_target import RedisLink, RedisTopology
from tickwire.core.stream import seq_of
from tickwire.feeds.bars import ClosedBar
from tickwire.feeds.publisher import Publisher
from tickwire.feeds.trade_bars import IntervalBars, aggregate_groups

log = logging.getLogger("tickwire.feeds.bar_maker")

# Take the lease if it is free, keep it if it is ours: 1 if we hold it now.
LEASE_LUA = """
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if not v then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
return 0
"""
RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_MS = 1_000_000
#: Demand that lapsed this long ago is removed from the demand set, once a minute.
PRUNE_AFTER_NS = 3600 * 1_000_000_000
PRUNE_EVERY_NS = 60 * 1_000_000_000


@dataclass(frozen=True, slots=True)
class BarMakerConfig:
    redis_url: str
    # -- timing
    #: Seconds between steps at most (a step also comes when a bar is due).
    poll_s: float = 0.05
    #: A bar closes this long after its end on the venue clock, for trades still on their way.
    close_delay_s: float = 0.1
    #: A writer lease lasts this long unless renewed (renewed every third of it).
    lease_s: float = 5.0
    #: Seconds between reads of the channel registry (symbols for wildcard demand).
    registry_every_s: float = 1.0
    # -- limits
    #: Trades per XRANGE call.
    page: int = 1000
    #: At start, trades read back at most to find the open bar's.
    max_start_trades: int = 100_000


@dataclass(slots=True)
class _Job:
    """One bar channel this maker writes."""

    channel: Channel
    trades: Channel
    bars: IntervalBars
    epoch: str  # the trades stream's epoch the cursor is in
    cursor: int  # last trade seq read
    renewed: int  # clock (ns) of the last lease renewal


@dataclass
class BarMakerStats:
    steps: int = 0
    bars: int = 0
    trades: int = 0
    late_trades: int = 0
    #: Trades trimmed from their stream before this maker read them (in no bar).
    missed_trades: int = 0
    #: Entries of trades streams that are not trade events tickwire wrote (someone else wrote
    #: there): skipped.
    foreign_entries: int = 0
    started: int = 0
    stopped: int = 0
    errors: int = 0
    channels: set[Channel] = field(default_factory=set)


class BarMaker:
    """Runs the steps; `async with Publisher(cfg) as pub: await BarMaker(config, pub).run()`."""

    def __init__(
        self,
        config: BarMakerConfig,
        publisher: Publisher,
        *,
        clock_ns: Callable[[], int] = time.time_ns,
        maker_id: str | None = None,
    ) -> None:
        self.config = config
        self.publisher = publisher
        self.clock_ns = clock_ns
        self.id = maker_id or secrets.token_hex(6)
        self.stats = BarMakerStats()
        self.jobs: dict[Channel, _Job] = {}
        self._conn: RedisLink | None = None
        self._redis = RedisTopology(config.redis_url)
        self._symbols: list[str] = []
        self._registry_read = -(1 << 62)
        self._pruned = -(1 << 62)
        #: Channels whose lease another maker held when last tried: not tried again before this.
        self._busy_until: dict[Channel, int] = {}
        self._late_of_stopped = 0
        #: Channels (trades, or bars to start) waiting for a key someone else wrote, warned about
        #: once until they read right again (`_foreign_key`).
        self._foreign: set[Channel] = set()

    # -- the loop ----------------------------------------------------------------------------
    async def run(self) -> None:
        """Step until cancelled; Redis errors are logged and retried with backoff."""
        backoff = 0.1
        try:
            while True:
                try:
                    await self.step()
                    backoff = 0.1
                except RedisUnavailable as exc:
                    self.stats.errors += 1
                    log.warning("Redis: %s%s; retrying in %.1f s", exc, acl_hint(exc), backoff)
                    self._drop_connection()
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                await asyncio.sleep(self._sleep_s())
        finally:
            await self.close()

    def _sleep_s(self) -> float:
        wait = self.config.poll_s
        now = self.clock_ns()
        for job in self.jobs.values():
            wait = min(wait, max(0.001, (job.bars.due_at() - now) / 1e9))
        return wait

    async def close(self) -> None:
        """Release every lease this maker holds (best effort) and close the connection."""
        if self.jobs and self._conn is not None and not self._conn.closed:
            with contextlib.suppress(RedisUnavailable):
                await self._conn.pipeline(
                    [self._release(c) for c in self.jobs], timeout=self.config.lease_s
                )
        self.jobs.clear()
        self._drop_connection()

    def _drop_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _call(self, commands: list[list[Arg]], *, foreign: bool = False) -> list[Any]:
        """The replies; RedisUnavailable for an error reply, but with `foreign` a WRONGTYPE
        one (a key someone else wrote) is left in its place for the caller."""
        if not commands:
            return []
        if self._conn is None or self._conn.closed:
            self._conn = await self._redis.open()
        replies = await self._conn.pipeline(commands, timeout=self.config.lease_s)
        for reply in replies:
            if isinstance(reply, RedisReplyError) and not (foreign and wrong_type(reply)):
                raise RedisUnavailable(f"Redis refused a bar maker command: {reply}")
        return replies

    # -- one step ----------------------------------------------------------------------------
    async def step(self) -> list[ClosedBar]:
        """Read demand, take or keep leases, read trades, publish the bars that are due."""
        self.stats.steps += 1
        now = self.clock_ns()
        wanted = await self._wanted(now)
        await self._stop(c for c in list(self.jobs) if c not in wanted)
        await self._lease(wanted, now)
        # The trades read now include every trade stored before `now`: the bars are closed as of
        # `now`, not of when the read ends (a trade stored meanwhile would be late for nothing).
        now = self.clock_ns()
        await self._read_trades()
        out: list[ClosedBar] = []
        batches: dict[Channel, list[bytes]] = {}
        published = self.clock_ns()
        for channel, job in self.jobs.items():
            closed = job.bars.close(now)
            if closed:
                out += closed
                batches[channel] = [bar.encode(published) for bar in closed]
        if batches:
            await self.publisher.publish(batches)
            self.stats.bars += len(out)
        self.stats.late_trades = self._late_of_stopped + sum(
            j.bars.late_trades for j in self.jobs.values()
        )
        self.stats.channels = set(self.jobs)
        return out

    async def _wanted(self, now: int) -> set[Channel]:
        """The on-demand bar channels some server has demand for now."""
        if now - self._pruned >= PRUNE_EVERY_NS:
            # Patterns that lapsed long ago: nobody will raise them again.
            lapsed = (now - PRUNE_AFTER_NS) // _MS
            await self._call([["ZREMRANGEBYSCORE", BAR_DEMAND_KEY, "-inf", lapsed]])
            self._pruned = now
        (members,) = await self._call([["ZRANGEBYSCORE", BAR_DEMAND_KEY, now // _MS, "+inf"]])
        patterns: list[ChannelPattern] = []
        for m in members:
            try:
                pattern = ChannelPattern.parse(m.decode())
            except (ChannelError, UnicodeDecodeError):
                continue
            if is_on_demand(pattern.kind):
                patterns.append(pattern)
        if any(p.is_wildcard for p in patterns) and (
            now - self._registry_read >= self.config.registry_every_s * 1e9
        ):
            (registry,) = await self._call([["SMEMBERS", REGISTRY_KEY]])
            self._symbols = sorted(
                name[len("trades:") :]
                for name in (r.decode(errors="replace") for r in registry)
                if name.startswith("trades:")
            )
            self._registry_read = now
        wanted: set[Channel] = set()
        for p in patterns:
            for symbol in self._symbols if p.is_wildcard else [p.symbol]:
                with contextlib.suppress(ChannelError):
                    wanted.add(Channel.of(p.kind, symbol))
        return wanted

    def _release(self, channel: Channel) -> list[Arg]:
        return ["EVAL", RELEASE_LUA, 1, bar_writer_key(channel), self.id]

    async def _stop(self, channels: Iterable[Channel]) -> None:
        stopping = list(channels)
        if not stopping:
            return
        await self._call([self._release(c) for c in stopping])
        for channel in stopping:
            self._late_of_stopped += self.jobs.pop(channel).bars.late_trades
            self.stats.stopped += 1
            log.info("stopped %s: no demand", channel)

    async def _lease(self, wanted: set[Channel], now: int) -> None:
        """Renew the leases due for it, try to take the others; start the jobs taken."""
        every = self.config.lease_s * 1e9 / 3
        busy = self._busy_until
        for c in [c for c, until in busy.items() if until <= now or c not in wanted]:
            del busy[c]
        due = sorted(
            (
                c
                for c in wanted
                if (c not in self.jobs and c not in busy)
                or (c in self.jobs and now - self.jobs[c].renewed >= every)
            ),
            key=str,
        )
        ms = int(self.config.lease_s * 1000)
        held = await self._call(
            [["EVAL", LEASE_LUA, 1, bar_writer_key(c), self.id, ms] for c in due], foreign=True
        )
        for channel, reply in zip(due, held, strict=True):
            job = self.jobs.get(channel)
            foreign = wrong_type(reply)
            if foreign:
                self._foreign_key(channel, f"{bar_writer_key(channel)} holds another type")
            if foreign or not reply:
                if job is not None:
                    log.warning("lost the writer lease of %s to another maker", channel)
                    self._late_of_stopped += self.jobs.pop(channel).bars.late_trades
                busy[channel] = now + int(every)
                continue
            if job is not None:
                job.renewed = now
                continue
            try:
                self.jobs[channel] = await self._start(channel, now)
            except _Foreign as exc:
                # Tried again later, like a channel another maker holds; the lease lapses.
                self._foreign_key(channel, str(exc))
                busy[channel] = now + int(every)
                continue
            self._foreign.discard(channel)
            self.stats.started += 1
            log.info("started %s", channel)

    def _foreign_key(self, channel: Channel, what: str) -> None:
        """Warn once (until it reads right again) that `channel` waits for a key someone else
        wrote."""
        if channel not in self._foreign:
            self._foreign.add(channel)
            log.warning("%s waits: %s (someone else wrote there)", channel, what)

    async def _start(self, channel: Channel, now: int) -> _Job:
        """A job for `channel`: the open interval's trades read back from the stream's end;
        _Foreign if a key or entry it reads is not one tickwire wrote."""
        try:
            return await self._start_reading(channel, now)
        except _NOT_OURS as exc:
            raise _Foreign(
                f"{channel.stream_key} or trades:{channel.symbol} holds an entry tickwire did not "
                "write"
            ) from exc

    async def _start_reading(self, channel: Channel, now: int) -> _Job:
        trades = Channel("trades", channel.symbol)
        cfg = self.config
        delay = int(cfg.close_delay_s * 1e9)
        last_bar, meta = await self._call(
            [
                ["XREVRANGE", channel.stream_key, "+", "-", "COUNT", 1],
                ["HMGET", trades.meta_key, "epoch", "seq"],
            ],
            foreign=True,
        )
        for reply, key in ((last_bar, channel.stream_key), (meta, trades.meta_key)):
            if wrong_type(reply):
                raise _Foreign(f"{key} holds another type")
        done = orjson.loads(last_bar[0][1][1])["end"] if last_bar else -(1 << 62)
        epoch = meta[0].decode() if meta[0] is not None else ""
        cursor = int(meta[1] or 0)
        interval = channel.kind[len(BAR_PREFIX) :]
        # Pages backwards until a trade older than the open interval (by a close delay).
        pages: list[list[Any]] = []
        bars: IntervalBars | None = None
        upper = "+"
        read = 0
        while read < cfg.max_start_trades:
            (raw,) = await self._call(
                [["XREVRANGE", trades.stream_key, upper, "-", "COUNT", cfg.page]], foreign=True
            )
            if wrong_type(raw):
                raise _Foreign(f"{trades.stream_key} holds another type")
            if not raw:
                break
            read += len(raw)
            upper = f"({raw[-1][0].decode()}"
            # Entries someone else wrote into the stream are skipped, as `_read_trades` does.
            page = raw if _Trades.of(raw)[1] == 0 else [e for e in raw if _is_trade(e)]
            if not page:
                continue
            pages.append(page)
            if bars is None:
                # The latest trade sets the venue clock; the interval it is in (less the close
                # delay) is the first this maker closes, unless a bar already covers it.
                cursor = seq_of(page[0][0])
                latest = orjson.loads(page[0][1][1])
                ts, pt = latest["ts"], latest["pt"]
                edge = max(ts, now - (pt - ts)) - delay
                bars = IntervalBars(
                    channel.symbol, interval, closed_until=max(done, edge), close_delay_ns=delay
                )
                bars.observe(ts, ts, pt)
            oldest = orjson.loads(page[-1][1][1])["ts"]
            if oldest < bars.closed_until - delay or len(raw) < cfg.page:
                break
        if bars is None:  # no trades yet: the wall clock
            bars = IntervalBars(
                channel.symbol, interval, closed_until=max(done, now - delay), close_delay_ns=delay
            )
        docs = [
            doc
            for page in reversed(pages)
            for doc in (orjson.loads(fields[1]) for _, fields in reversed(page))
            if doc["ts"] >= bars.closed_until
        ]
        bars.add(*_columns(docs))
        self.stats.trades += len(docs)
        return _Job(channel, trades, bars, epoch, cursor, now)

    async def _read_trades(self) -> None:
        """Every trade appended since the last step: one read per symbol for all its jobs, page
        by page, then one numpy pass per interval for all its channels."""
        by_symbol: dict[Channel, list[_Job]] = {}
        for job in self.jobs.values():
            by_symbol.setdefault(job.trades, []).append(job)
        reading = list(by_symbol.items())
        page = self.config.page
        read: list[tuple[_Job, _Trades]] = []
        while reading:
            commands: list[list[Arg]] = []
            for trades, jobs in reading:
                cursor = min(j.cursor for j in jobs)
                commands.append(["HMGET", trades.meta_key, "epoch", "seq", "start"])
                commands.append(["XRANGE", trades.stream_key, f"({cursor}-0", "+", "COUNT", page])
            replies = await self._call(commands, foreign=True)
            more = []
            for (trades, jobs), meta, entries in zip(
                reading, replies[::2], replies[1::2], strict=True
            ):
                if wrong_type(meta) or wrong_type(entries):
                    # Its bars wait; the other symbols' go on.
                    self._foreign_key(trades, "its stream or meta key holds another type")
                    continue
                self._foreign.discard(trades)
                epoch = meta[0].decode() if meta[0] is not None else ""
                again = False
                for j in jobs:
                    if epoch != j.epoch and j.epoch:
                        # The stream was lost and recreated, or went on in a new epoch: read
                        # the new epoch from its start (trades of closed intervals in it are
                        # late), not what came before it, read already.
                        log.warning("%s: trades epoch %s → %s", j.channel, j.epoch, epoch)
                        j.cursor = _epoch_start(meta) - 1
                        again = True
                    j.epoch = epoch
                if again:
                    more.append((trades, jobs))
                    continue
                if not entries:
                    continue
                columns, foreign = _Trades.of(entries)
                if foreign:
                    self.stats.foreign_entries += foreign
                    log.warning(
                        "%s: skipped %d entries that are not trades tickwire wrote",
                        trades,
                        foreign,
                    )
                self.stats.trades += len(entries) - foreign
                first, cursor = seq_of(entries[0][0]), min(j.cursor for j in jobs)
                if cursor and first > cursor + 1:
                    # Trimmed (MAXLEN) before this maker read them: the bars miss them.
                    self.stats.missed_trades += first - cursor - 1
                    log.warning(
                        "%s: trades %d..%d were trimmed unread", trades, cursor + 1, first - 1
                    )
                for j in jobs:
                    taken = None if columns is None else columns.after(j.cursor)
                    if taken is not None:
                        read.append((j, taken))
                    j.cursor = max(j.cursor, seq_of(entries[-1][0]))
                if len(entries) == page:
                    more.append((trades, jobs))
            reading = more
        self._fold(read)

    @staticmethod
    def _fold(read: list[tuple[_Job, _Trades]]) -> None:
        """Trades read, per job, into each job's bars: one `aggregate_groups` per interval."""
        by_interval: dict[int, list[tuple[_Job, _Trades]]] = {}
        for job, trades in read:
            on_time = job.bars.admit(trades.ts, trades.pt)
            if on_time.any():
                by_interval.setdefault(job.bars.interval_ns, []).append((job, trades[on_time]))
        for interval_ns, parts in by_interval.items():
            groups = np.repeat(np.arange(len(parts)), [len(t.ts) for _, t in parts])
            owners, bars = aggregate_groups(
                np.concatenate([t.ts for _, t in parts]),
                np.concatenate([t.price for _, t in parts]),
                np.concatenate([t.size for _, t in parts]),
                groups,
                interval_ns,
            )
            for owner, bar in zip(owners, bars, strict=True):
                parts[owner][0].bars.fold(bar)


@dataclass(frozen=True, slots=True)
class _Trades:
    """Trades read from one stream, as columns in stream order."""

    seq: npt.NDArray[np.int64]
    ts: npt.NDArray[np.int64]
    pt: npt.NDArray[np.int64]
    price: npt.NDArray[np.float64]
    size: npt.NDArray[np.float64]

    @classmethod
    def of(cls, entries: list[Any]) -> tuple[_Trades | None, int]:
        """The trades of stream entries (None if there are none), and how many entries were
        skipped: not trade events tickwire wrote (someone else wrote into the stream)."""
        try:
            docs = [orjson.loads(fields[1]) for _, fields in entries]
            columns = _columns(docs)
        except _NOT_OURS:
            good = [e for e in entries if _is_trade(e)]
            return (cls.of(good)[0] if good else None), len(entries) - len(good)
        return cls(np.array([seq_of(e[0]) for e in entries], dtype=np.int64), *columns), 0

    def after(self, seq: int) -> _Trades | None:
        """The trades after `seq` (None if none)."""
        if self.seq[0] > seq:
            return self
        if self.seq[-1] <= seq:
            return None
        return self[self.seq > seq]

    def __getitem__(self, mask: npt.NDArray[np.bool_]) -> _Trades:
        return _Trades(
            self.seq[mask], self.ts[mask], self.pt[mask], self.price[mask], self.size[mask]
        )


#: What reading an entry that is not an event tickwire wrote raises (JSONDecodeError is a
#: ValueError).
_NOT_OURS = (ValueError, KeyError, TypeError, IndexError)


def _is_trade(entry: Any) -> bool:
    try:
        _columns([orjson.loads(entry[1][1])])
    except _NOT_OURS:
        return False
    return True


class _Foreign(Exception):
    """A key or entry a bar channel needs is not one tickwire wrote: the channel waits."""


def _epoch_start(meta: list[Any]) -> int:
    """The first seq of a trades channel's epoch, from its meta's (epoch, seq, start)."""
    try:
        return max(1, int(meta[2] or 1))
    except ValueError:
        return 1


def _columns(
    docs: list[Any],
) -> tuple[
    npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.float64]
]:
    """ts, pt, price, size columns of decoded trade events."""
    return (
        np.array([d["ts"] for d in docs], dtype=np.int64),
        np.array([d["pt"] for d in docs], dtype=np.int64),
        np.array([d["price"] for d in docs], dtype=np.float64),
        np.array([d["size"] for d in docs], dtype=np.float64),
    )
