"""Simulated market: numpy-vectorised GBM mid prices, quotes and trades at random times.

Events come in fixed-size chunks drawn from one seeded generator, so the event sequence under a
seed does not depend on timing; pacing only decides *when* (and in which slices) they go out.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from tickwire.core.channels import Channel, validate_symbol
from tickwire.core.events import tick_decimals
from tickwire.feeds.bodies import PT_DIGITS, BodyEncoder, EncodedChunk

# Well-known names with believable price levels and ticks; further symbols are generated.
KNOWN_SYMBOLS: dict[str, tuple[float, float]] = {
    "BTC-USD": (64000.0, 0.5),
    "ETH-USD": (3100.0, 0.05),
    "SOL-USD": (145.0, 0.01),
    "AAPL": (190.0, 0.01),
    "MSFT": (420.0, 0.01),
    "NVDA": (880.0, 0.01),
    "EUR-USD": (1.085, 0.00001),
    "ES-FUT": (5200.0, 0.25),
    "XRP-USD": (0.52, 0.0001),
    "TSLA": (175.0, 0.01),
}
SECONDS_PER_YEAR = 365.25 * 24 * 3600
#: How often a throttled simulator hands out the events that have come due.
RELEASE_TICK_S = 0.001
#: Events a throttled simulator hands out at most in one slice, when it is behind.
MAX_SLICE_EVENTS = 16_384
#: Events a simulator's chunks are encoded ahead together, at most (see `_chunks`).
ENCODE_AHEAD_EVENTS = 256
#: Events from which `MarketSimulator.encode` groups them by channel with numpy (below, a loop
#: over a handful of events costs less than numpy's calls).
SORTED_GROUPING = 64


@dataclass(frozen=True, slots=True)
class Instrument:
    symbol: str
    price: float
    tick: float
    lot: float
    volatility: float  # annualised

    @property
    def decimals(self) -> int:
        return tick_decimals(self.tick)


def make_instruments(symbols: int | Sequence[str], seed: int) -> list[Instrument]:
    names = default_symbols(symbols) if isinstance(symbols, int) else list(symbols)
    out = []
    for name in names:
        validate_symbol(name)
        # Per-symbol draws keyed by (seed, name) so adding a symbol does not move the others.
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        if name in KNOWN_SYMBOLS:
            price, tick = KNOWN_SYMBOLS[name]
        else:
            price = float(10 ** rng.uniform(0.5, 3.5))
            tick = 0.01 if price >= 1 else 0.0001
            price = round(price, tick_decimals(tick))
        lot = 0.0001 if name.endswith("-USD") else 1.0
        out.append(Instrument(name, price, tick, lot, float(rng.uniform(0.2, 0.9))))
    return out


def default_symbols(n: int) -> list[str]:
    if n < 1:
        raise ValueError("need at least one symbol")
    known = list(KNOWN_SYMBOLS)
    return known[:n] + [f"SIM{i:04d}" for i in range(max(0, n - len(known)))]


@dataclass
class Chunk:
    """One chunk of simulated events as columns; `kind` 0 = quote, 1 = trade."""

    ts: npt.NDArray[np.int64]
    sym: npt.NDArray[np.int64]
    kind: npt.NDArray[np.int8]
    bid: npt.NDArray[np.float64]
    ask: npt.NDArray[np.float64]
    bid_size: npt.NDArray[np.float64]
    ask_size: npt.NDArray[np.float64]
    price: npt.NDArray[np.float64]
    size: npt.NDArray[np.float64]
    buy: npt.NDArray[np.bool_]
    trade_id: npt.NDArray[np.int64]
    #: The bodies of the chunk these events were sliced from, encoded ahead of their publish
    #: time (`MarketSimulator.encode_ahead`), and the index of the first of them there.
    encoded: tuple[EncodedChunk, int] | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.ts)

    @staticmethod
    def concat(a: Chunk, b: Chunk) -> Chunk:
        """The events of `a`, then those of `b` (encoded ahead if both are)."""

        def both(name: str) -> npt.NDArray[Any]:
            return np.concatenate([getattr(a, name), getattr(b, name)])

        encoded = None
        if a.encoded is not None and b.encoded is not None:
            # A paced feed joins a chunk's last events to the next chunk's: encoding them
            # again, slice by slice, cost more than encoding ahead saved.
            (ea, start), (eb, first) = a.encoded, b.encoded
            if start + len(a) == len(ea.keys) and first == 0:
                encoded = (EncodedChunk.join(ea, start, eb, len(b)), 0)
        return Chunk(
            both("ts"),
            both("sym"),
            both("kind"),
            both("bid"),
            both("ask"),
            both("bid_size"),
            both("ask_size"),
            both("price"),
            both("size"),
            both("buy"),
            both("trade_id"),
            encoded,
        )

    @staticmethod
    def joined(chunks: Sequence[Chunk]) -> Chunk:
        """The events of `chunks`, one after the other (not encoded ahead)."""

        def all_of(name: str) -> npt.NDArray[Any]:
            return np.concatenate([getattr(c, name) for c in chunks])

        return Chunk(
            all_of("ts"),
            all_of("sym"),
            all_of("kind"),
            all_of("bid"),
            all_of("ask"),
            all_of("bid_size"),
            all_of("ask_size"),
            all_of("price"),
            all_of("size"),
            all_of("buy"),
            all_of("trade_id"),
        )

    def slice(self, start: int, stop: int) -> Chunk:
        """Events [start, stop) as views of these columns."""
        if start == 0 and stop >= len(self.ts):
            return self
        # Spelled out: going through `dataclasses.fields` cost as much as encoding the slice.
        s = slice(start, stop)
        encoded = None if self.encoded is None else (self.encoded[0], self.encoded[1] + start)
        return Chunk(
            self.ts[s],
            self.sym[s],
            self.kind[s],
            self.bid[s],
            self.ask[s],
            self.bid_size[s],
            self.ask_size[s],
            self.price[s],
            self.size[s],
            self.buy[s],
            self.trade_id[s],
            encoded,
        )


@dataclass
class MarketSimulator:
    """Generates chunks of events at a nominal `rate` (events per simulated second)."""

    instruments: list[Instrument]
    rate: float
    seed: int = 0
    start_ns: int = 0
    trade_ratio: float = 0.25
    spread_ticks_mean: float = 2.0
    _rng: np.random.Generator = field(init=False)
    _logp: npt.NDArray[np.float64] = field(init=False)
    _trade_ids: npt.NDArray[np.int64] = field(init=False)
    _t: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        if self.rate <= 0:
            raise ValueError("rate must be positive")
        self._rng = np.random.default_rng(self.seed)
        self._logp = np.log([i.price for i in self.instruments])
        self._trade_ids = np.zeros(len(self.instruments), dtype=np.int64)
        self._ticks = np.array([i.tick for i in self.instruments])
        self._lots = np.array([i.lot for i in self.instruments])
        self._decimals = np.array([i.decimals for i in self.instruments])
        self._vol = np.array([i.volatility for i in self.instruments])
        # Busier symbols first: Zipf-like weights, as on real venues.
        w = 1.0 / np.arange(1, len(self.instruments) + 1) ** 0.6
        self._weights = w / w.sum()
        names = [i.symbol for i in self.instruments]
        # Built once: validating channel names per chunk was a few % of the feed's time.
        self._channels = (
            names,
            [Channel("quotes", n) for n in names],
            [Channel("trades", n) for n in names],
        )
        self._bodies = BodyEncoder(names)

    @property
    def chunk_size(self) -> int:
        # About 50 ms of events per chunk, fixed by the rate alone (determinism). Generation costs
        # mostly per numpy call: 5 ms chunks (50 events at 10 k/s, 120-370 us each) were a tenth
        # of a paced feed's CPU; a 500-event chunk costs 240 us. The feed hands events out as
        # they come due whatever the chunk size (`paced_chunks`).
        return int(max(1, min(4096, self.rate // 20)))

    def next_chunk(self, n: int | None = None) -> Chunk:
        n = n or self.chunk_size
        rng = self._rng
        nsym = len(self.instruments)
        gaps = rng.exponential(1.0 / self.rate, n)
        times = self._t + np.cumsum(gaps)
        self._t = float(times[-1])
        sym = rng.choice(nsym, size=n, p=self._weights)
        kind = (rng.random(n) < self.trade_ratio).astype(np.int8)
        # GBM: per-event log-return with variance proportional to the time since the last
        # event of *the same symbol*; approximated by the symbol's share of the rate.
        dt = gaps / np.maximum(self._weights[sym], 1e-9) / SECONDS_PER_YEAR
        sigma = self._vol[sym]
        inc = -0.5 * sigma**2 * dt + sigma * np.sqrt(dt) * rng.standard_normal(n)
        order = np.argsort(sym, kind="stable")
        inc_sorted = inc[order]
        csum = np.cumsum(inc_sorted)
        counts = np.bincount(sym, minlength=nsym)
        ends = np.cumsum(counts)
        starts = ends - counts
        before = np.where(starts > 0, csum[np.maximum(starts - 1, 0)], 0.0)
        within = csum - np.repeat(before, counts)
        logp_sorted = self._logp[sym[order]] + within
        logp = np.empty(n)
        logp[order] = logp_sorted
        has = counts > 0
        self._logp[has] = logp_sorted[ends[has] - 1]
        mid = np.exp(logp)
        tick = self._ticks[sym]
        spread = 1 + rng.poisson(self.spread_ticks_mean - 1, n)
        bid_ticks = np.floor(mid / tick - spread / 2)
        bid_ticks = np.maximum(bid_ticks, 1)
        ask_ticks = bid_ticks + spread
        dec = self._decimals[sym]
        lot = self._lots[sym]
        bid = round_to_decimals(bid_ticks * tick, dec)
        ask = round_to_decimals(ask_ticks * tick, dec)
        notional = rng.lognormal(mean=8.0, sigma=1.2, size=(3, n))  # ~3 k USD typical
        lot_dec = np.where(lot < 1, 4, 0)
        bid_size = round_to_decimals(
            np.maximum(np.round(notional[0] / mid / lot), 1) * lot, lot_dec
        )
        ask_size = round_to_decimals(
            np.maximum(np.round(notional[1] / mid / lot), 1) * lot, lot_dec
        )
        size = round_to_decimals(np.maximum(np.round(notional[2] / mid / lot), 1) * lot, lot_dec)
        buy = rng.random(n) < 0.5
        price = np.where(buy, ask, bid)
        trade_id = np.zeros(n, dtype=np.int64)
        is_trade = kind == 1
        if is_trade.any():
            tsym = sym[is_trade]
            # Per-symbol running trade ids without a Python loop.
            t_order = np.argsort(tsym, kind="stable")
            tcounts = np.bincount(tsym, minlength=nsym)
            rank = np.arange(len(tsym)) - np.repeat(np.cumsum(tcounts) - tcounts, tcounts)
            ids = np.empty(len(tsym), dtype=np.int64)
            ids[t_order] = self._trade_ids[tsym[t_order]] + rank + 1
            trade_id[is_trade] = ids
            self._trade_ids += tcounts
        ts = self.start_ns + (times * 1e9).astype(np.int64)
        return Chunk(ts, sym, kind, bid, ask, bid_size, ask_size, price, size, buy, trade_id)

    def encode(self, chunk: Chunk, pt: int) -> dict[Channel, list[bytes]]:
        """Bodies per channel, in event order, stamped with publish time `pt`."""
        ahead = chunk.encoded
        if ahead is not None and len(b"%d" % pt) == PT_DIGITS:
            encoded, start = ahead
            encoded.stamp(start, start + len(chunk), pt)
        else:
            encoded, start = self._encode_chunk(chunk, pt), 0
        stop = start + len(chunk)
        _, quote_ch, trade_ch = self._channels
        if stop - start >= SORTED_GROUPING:
            # Grouped by sorting the keys (2 * symbol + kind): a loop over the events cost as
            # much as encoding them.
            keys = encoded.keys[start:stop]
            order = np.argsort(keys, kind="stable")
            keys = keys[order]
            cuts = [0, *(np.flatnonzero(keys[1:] != keys[:-1]) + 1).tolist(), len(keys)]
            bodies = encoded.bodies_at(order + start)
            return {
                (trade_ch[key >> 1] if key & 1 else quote_ch[key >> 1]): bodies[a:b]
                for key, a, b in zip(keys[cuts[:-1]].tolist(), cuts, cuts[1:], strict=False)
            }
        bodies = encoded.bodies(start, stop)
        # Grouped by an int first: an int hashes for nothing, a channel's hash per event was a
        # fifth of the old per-event loop.
        groups: dict[int, list[bytes]] = {}
        for key, body in zip(encoded.key_list[start:stop], bodies, strict=True):
            group = groups.get(key)
            if group is None:
                groups[key] = [body]
            else:
                group.append(body)
        return {
            (trade_ch[key >> 1] if key & 1 else quote_ch[key >> 1]): group
            for key, group in groups.items()
        }

    def encode_ahead(self, chunk: Chunk) -> Chunk:
        """The chunk with its bodies encoded now, to be stamped with their publish time later:
        a paced feed hands a chunk out in many small slices, and encoding costs mostly per call.
        """
        chunk.encoded = (self._encode_chunk(chunk), 0)
        return chunk

    def _encode_chunk(self, c: Chunk, pt: int | None = None) -> EncodedChunk:
        columns = (c.ts, c.sym, c.kind, c.bid, c.ask, c.bid_size, c.ask_size, c.price, c.size)
        if pt is None:
            return self._bodies.encode_chunk(*columns, c.buy, c.trade_id)
        return self._bodies.encode_chunk(*columns, c.buy, c.trade_id, pt)


def round_to_decimals(
    values: npt.NDArray[np.float64], decimals: npt.NDArray[np.int64]
) -> npt.NDArray[np.float64]:
    # Scale to an integer, then divide by a power of ten: IEEE division is correctly rounded, so
    # the result is the double nearest the decimal and prints without noise.
    scale = 10.0 ** decimals.astype(np.float64)
    return np.rint(values * scale) / scale


async def paced_chunks(
    sim: MarketSimulator,
    *,
    count: int | None = None,
    duration: float | None = None,
    throttle: bool = True,
    monotonic: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    tick_s: float = RELEASE_TICK_S,
    venue_clock_ns: Callable[[], int] | None = None,
) -> AsyncIterator[Chunk]:
    """Yield events no earlier than their simulated time (sleeps, never spins) until done.

    Throttled, each generated chunk goes out in slices: at every wake-up, the events whose time
    has come, so events wait at most about `tick_s` for their turn. Handing out whole chunks (5 ms
    of events) made every event wait for the chunk's last one, and sent the feed, Redis and the
    server bursts five times as big (at 10 k events/s, end-to-end p50 2.1 ms against 0.9 ms).

    A slice goes out at most once per `tick_s`, however long the consumer took with the last one
    (unless it took longer than a tick). Releasing again as soon as it returned, with events come
    due meanwhile, made a slow machine's feed cycle back to back: at 10 k events/s, 1 900 slices
    of ~5 events a second and 65 % of a core (a faster cycle only made more, smaller slices), and
    as many append calls for Redis and pushes for the server.

    With `venue_clock_ns` (the wall clock the simulator's `start_ns` was read from), an event is
    due when that clock reaches its `ts`, so the time between building the simulator and pacing
    it counts (a connection set-up made every `ts` 2-3 ms older than its release). Without, the
    pacing starts at `start_ns` when this is first iterated. The pacing itself runs on
    `monotonic`, which never jumps.
    """
    chunks = _chunks(sim, count)
    t0 = monotonic()
    if venue_clock_ns is not None:
        t0 -= (venue_clock_ns() - sim.start_ns) / 1e9
    if not throttle:
        for chunk in chunks:
            if duration is not None and monotonic() - t0 >= duration:
                return
            yield chunk
        return
    released = -tick_s  # when the last slice went out, seconds from the start
    pending: Chunk | None = None  # generated and not yet released, from `i` on
    due = np.empty(0)  # seconds from the start at which each of `pending` is due
    i = 0

    def seconds_due(chunk: Chunk) -> npt.NDArray[np.float64]:
        return (chunk.ts - sim.start_ns) / 1e9

    while True:
        if pending is None or i == len(pending):
            # Encoding the next chunks ahead takes a burst of CPU (~0.3 ms for 500 events): let
            # the loop send the writes the last slice queued first, or its events wait behind it.
            await asyncio.sleep(0)
            pending = next(chunks, None)
            if pending is None:
                return
            due, i = seconds_due(pending), 0
        elapsed = monotonic() - t0
        if duration is not None and elapsed >= duration:
            return
        # The method, not np.searchsorted: its dispatch wrapper cost more than the search.
        j = min(int(due.searchsorted(elapsed, side="right")), i + MAX_SLICE_EVENTS)
        if j == len(pending) and j - i < MAX_SLICE_EVENTS:
            # All of it is due: the next chunk's due events go in the same slice. A slice
            # stopping at the chunk's end left them a tick behind their neighbours, and a
            # consumer slower than a chunk's time would fall behind the rate for good. But
            # not without bound: a consumer slower than the rate itself (`--rate 5000000`)
            # made one slice grow for ever, copied whole at every chunk (2 M events went out
            # at 59 k/s).
            await asyncio.sleep(0)  # as above
            more = next(chunks, None)
            if more is not None:
                pending = Chunk.concat(pending.slice(i, len(pending)), more)
                due, i = seconds_due(pending), 0
                continue
        # (0.999: a tick's sleep must count as a tick whatever the clock's rounding.)
        if j <= i or elapsed - released < 0.999 * tick_s:
            # Sleep at least a tick: shorter sleeps make uvloop spin (FACTS.md).
            await sleep(max(float(due[i]) - elapsed, tick_s))
            continue
        released = elapsed
        yield pending.slice(i, j)
        i = j


def _chunks(sim: MarketSimulator, count: int | None) -> Iterator[Chunk]:
    """The simulator's chunks, `count` events in all (None: for ever), encoded ahead a few at a
    time: up to `ENCODE_AHEAD_EVENTS` events or a second of them, whichever comes first.

    Encoding costs mostly per call: the 50-event chunks of the default rate (1 000/s), encoded
    one by one, made `feed sim --max` 1.8x slower than the per-event loop it replaced. The
    chunks themselves are drawn as before, so the events do not change.
    """
    made = 0
    per_second = max(1, round(1.0 / (sim.chunk_size / sim.rate)))
    while count is None or made < count:
        batch: list[Chunk] = []
        events = 0
        while (count is None or made < count) and events < ENCODE_AHEAD_EVENTS:
            chunk = sim.next_chunk(
                sim.chunk_size if count is None else min(sim.chunk_size, count - made)
            )
            made += len(chunk)
            events += len(chunk)
            batch.append(chunk)
            if len(batch) >= per_second:
                break
        yield sim.encode_ahead(batch[0] if len(batch) == 1 else Chunk.joined(batch))
