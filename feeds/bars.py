"""Sans-I/O OHLCV bars: trades in, closed bars out, aligned to interval boundaries of venue time.

Venue time is one clock per aggregator: the latest trade `ts` (or a `now` handed in) is the
watermark. Bars cover `[start, start + interval)` with `start` a multiple of the interval since the
Unix epoch, so every feed and every restart cuts the same bars. Once the watermark reaches a bar's
end, every open bar closes: all open bars are always in the interval the watermark is in, and a
trade stamped before that interval arrives too late for its bar (it is in no bar, and counted in
`late_trades`). An interval in which a symbol did not trade produces no bar for that symbol.

Prices are snapped to the symbol's tick and sizes rounded to the decimals of its lot, then kept as
integers in units of those decimals, so open/high/low/close, the volume and the VWAP (the exact
ratio of integer sums, rounded half-even to the tick's decimals) are exact, and the floats put on
the wire are the doubles nearest those decimals: no binary noise.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from tickwire.core.channels import BAR_INTERVALS, Channel, validate_symbol
from tickwire.core.errors import UnknownChannelType
from tickwire.core.events import encode_body, tick_decimals

DEFAULT_INTERVAL = "1s"
_UNIT_NS = {"s": 1_000_000_000, "m": 60_000_000_000, "h": 3_600_000_000_000}
_INTERVAL_RE = re.compile(r"^([1-9][0-9]*)([smh])$")
# Below this many trades a plain loop beats numpy's grouping, whose fixed cost is ~25 µs
# (measured: equal at about 50 trades).
_LOOP_BELOW = 48
# Watermark before the first trade: below any venue time.
_NEVER = -(1 << 62)


def interval_ns(interval: str) -> int:
    """Length in ns of a bar interval that channel names allow (`1s`, `1m`)."""
    match = _INTERVAL_RE.match(interval)
    if interval not in BAR_INTERVALS or match is None:
        raise UnknownChannelType(
            f"bar interval {interval!r} has no channel: use one of {', '.join(BAR_INTERVALS)}"
        )
    return int(match[1]) * _UNIT_NS[match[2]]


class InstrumentSpec(Protocol):
    """What the aggregator needs of a symbol (`feeds.simulator.Instrument` has it)."""

    @property
    def symbol(self) -> str: ...

    @property
    def tick(self) -> float: ...

    @property
    def lot(self) -> float: ...


@dataclass(frozen=True, slots=True)
class ClosedBar:
    """One finished bar; `end` is exclusive and is also the event's venue `ts`."""

    symbol: str
    interval: str
    start: int
    end: int
    open: float
    high: float
    low: float
    close: float
    volume: float
    vwap: float
    trades: int

    @property
    def channel(self) -> Channel:
        return Channel(f"bars.{self.interval}", self.symbol)

    def fields(self) -> dict[str, Any]:
        """The bar's type fields, in `BAR_FIELDS` order."""
        return {
            "interval": self.interval,
            "open": self.open,
            "high": self.high,
            "low": self.low,
            "close": self.close,
            "volume": self.volume,
            "vwap": self.vwap,
            "trades": self.trades,
            "start": self.start,
            "end": self.end,
        }

    def encode(self, pt: int) -> bytes:
        """The event body for the publisher (see `encode_body`), stamped with publish time `pt`."""
        return encode_body("bar", self.symbol, self.end, pt, self.fields())


class _OpenBar:
    """A bar still collecting trades; prices and sizes as integers in decimal units."""

    __slots__ = ("close", "high", "low", "notional", "open", "trades", "volume")

    def __init__(self, price: int, size: int, notional: int, trades: int) -> None:
        self.open = self.high = self.low = self.close = price
        self.volume = size
        self.notional = notional
        self.trades = trades


class BarAggregator:
    """Bars of one interval for a fixed list of symbols; feed it trades in venue-time order.

    `add_trades` takes numpy columns (symbols as indices into `instruments`, as the simulator's
    chunks hold them), `add_rows` the same as tuples, `add_trade` one trade by symbol name,
    `advance` only the time. Each returns the bars that closed, ordered by start, then by the
    symbol's index.
    """

    def __init__(
        self, instruments: Sequence[InstrumentSpec], interval: str = DEFAULT_INTERVAL
    ) -> None:
        self.interval = interval
        self.interval_ns = interval_ns(interval)
        self.symbols = [validate_symbol(i.symbol) for i in instruments]
        self._index = {s: n for n, s in enumerate(self.symbols)}
        if len(self._index) != len(self.symbols):
            raise ValueError("symbols must be distinct")
        price_dec = [tick_decimals(i.tick) for i in instruments]
        size_dec = [tick_decimals(i.lot) for i in instruments]
        self._price_div: list[int] = [10**d for d in price_dec]
        self._size_div: list[int] = [10**d for d in size_dec]
        self._ticks = [float(i.tick) for i in instruments]
        self._size_scale = [10.0**d for d in size_dec]
        # The tick in price units (0.25 at 2 decimals → 25): snapped prices are multiples of it.
        self._tick_units: list[int] = [
            round(i.tick * 10**d) for i, d in zip(instruments, price_dec, strict=True)
        ]
        self._ticks_np = np.array(self._ticks, dtype=np.float64)
        self._tick_units_np = np.array(self._tick_units, dtype=np.int64)
        self._size_scale_np = np.array(self._size_scale, dtype=np.float64)
        self._open: dict[int, _OpenBar] = {}
        self._watermark = _NEVER
        self._bucket = _NEVER // self.interval_ns  # interval the watermark is in
        #: Trades stamped before the open interval: in no bar.
        self.late_trades = 0

    @property
    def watermark(self) -> int:
        """Latest venue time seen (ns)."""
        return self._watermark

    # -- input

    def advance(self, now: int) -> list[ClosedBar]:
        """Venue time has reached `now` (ns): close the bars that end at or before it."""
        if now <= self._watermark:
            return []
        self._watermark = now
        bucket = now // self.interval_ns
        if bucket == self._bucket:
            return []
        out = self._close_all()
        self._bucket = bucket
        return out

    def add_trade(self, symbol: str, ts: int, price: float, size: float) -> list[ClosedBar]:
        """One trade at venue time `ts` (ns); returns the bars it closed."""
        i = self._index.get(symbol)
        if i is None:
            raise KeyError(f"{symbol!r} is not one of this aggregator's symbols")
        if not (math.isfinite(price) and math.isfinite(size) and size > 0):
            raise ValueError(f"bad trade for {symbol}: price {price!r}, size {size!r}")
        out: list[ClosedBar] = []
        self._add_one(i, ts, self._price_units(i, price), round(size * self._size_scale[i]), out)
        return out

    def add_trades(
        self,
        ts: npt.NDArray[np.int64],
        sym: npt.NDArray[np.int64],
        price: npt.NDArray[np.float64],
        size: npt.NDArray[np.float64],
        *,
        now: int | None = None,
    ) -> list[ClosedBar]:
        """Trades as columns, in arrival order, then optionally `advance(now)`; returns closed bars.

        `sym` holds indices into the instruments. Raises ValueError, before taking any of them,
        if a price is not finite or a size is not positive.
        """
        out: list[ClosedBar] = []
        n = len(ts)
        if 0 < n < _LOOP_BELOW:
            rows = zip(ts.tolist(), sym.tolist(), price.tolist(), size.tolist(), strict=True)
            return self.add_rows(list(rows), now=now)
        if n:
            if not (np.isfinite(price).all() and np.isfinite(size).all() and (size > 0).all()):
                raise ValueError("trades need finite prices and positive finite sizes")
            self._add_grouped(ts, sym, price, size, out)
        if now is not None:
            out.extend(self.advance(now))
        return out

    def add_rows(
        self, rows: Sequence[tuple[int, int, float, float]], *, now: int | None = None
    ) -> list[ClosedBar]:
        """Trades as `(ts, symbol index, price, size)` tuples, like `add_trades`.

        For a handful of trades this is cheaper than columns: no numpy call at all.
        """
        for _t, _i, p, s in rows:
            if not (math.isfinite(p) and math.isfinite(s) and s > 0):
                raise ValueError("trades need finite prices and positive finite sizes")
        out: list[ClosedBar] = []
        scale = self._size_scale
        for t, i, p, s in rows:
            self._add_one(i, t, self._price_units(i, p), round(s * scale[i]), out)
        if now is not None:
            out.extend(self.advance(now))
        return out

    # -- internals

    def _price_units(self, i: int, price: float) -> int:
        # Same float operations as the numpy path, so both snap a price identically.
        return round(price / self._ticks[i]) * self._tick_units[i]

    def _add_one(self, i: int, ts: int, pu: int, su: int, out: list[ClosedBar]) -> None:
        bucket = ts // self.interval_ns
        if bucket != self._bucket:
            if bucket < self._bucket:
                self.late_trades += 1
                return
            out.extend(self._close_all())
            self._bucket = bucket
        self._watermark = max(self._watermark, ts)
        bar = self._open.get(i)
        if bar is None:
            self._open[i] = _OpenBar(pu, su, pu * su, 1)
        else:
            if pu > bar.high:
                bar.high = pu
            elif pu < bar.low:
                bar.low = pu
            bar.close = pu
            bar.volume += su
            bar.notional += pu * su
            bar.trades += 1

    def _add_grouped(
        self,
        ts: npt.NDArray[np.int64],
        sym: npt.NDArray[np.int64],
        price: npt.NDArray[np.float64],
        size: npt.NDArray[np.float64],
        out: list[ClosedBar],
    ) -> None:
        ts = np.asarray(ts, dtype=np.int64)
        sym = np.asarray(sym, dtype=np.int64)
        interval = self.interval_ns
        first, latest = int(ts.min()) // interval, int(ts.max()) // interval
        if first == latest and first >= self._bucket:
            # All in one interval, none late: the usual case (a chunk is a few ms of trading).
            bucket = None
            key = sym.astype(np.int16) if len(self.symbols) <= 1 << 15 else sym  # radix sort
        else:
            bucket = ts // interval
            # The interval in force when each trade arrives: the latest one seen before it. A
            # trade earlier than that is late; the others come in non-decreasing interval order.
            before = np.empty_like(bucket)
            before[0] = self._bucket
            before[1:] = bucket[:-1]
            np.maximum.accumulate(before, out=before)
            kept = bucket >= before
            if not kept.all():
                self.late_trades += int(len(kept) - np.count_nonzero(kept))
                ts, sym, price, size, bucket = (
                    ts[kept],
                    sym[kept],
                    price[kept],
                    size[kept],
                    bucket[kept],
                )
                if not len(ts):
                    return
            key = (bucket - bucket[0]) * len(self.symbols) + sym
        pu = np.rint(price / self._ticks_np[sym]).astype(np.int64) * self._tick_units_np[sym]
        su = np.rint(size * self._size_scale_np[sym]).astype(np.int64)
        # Group by (interval, symbol), keeping arrival order inside a group (stable sort).
        order = np.argsort(key, kind="stable")
        key = key[order]
        pu = pu[order]
        su = su[order]
        n = len(key)
        starts = np.flatnonzero(np.concatenate(([True], key[1:] != key[:-1])))
        last = np.concatenate((starts[1:], [n])) - 1
        if int(np.abs(pu).max()) * int(su.max()) * n < 1 << 63:
            notional = np.add.reduceat(pu * su, starts).tolist()
        else:  # int64 could overflow: exact Python integers instead (slow, never in practice)
            notional = np.add.reduceat(pu.astype(object) * su.astype(object), starts).tolist()
        heads = order[starts]
        groups = zip(
            [latest] * len(starts) if bucket is None else bucket[heads].tolist(),
            sym[heads].tolist(),
            pu[starts].tolist(),
            np.maximum.reduceat(pu, starts).tolist(),
            np.minimum.reduceat(pu, starts).tolist(),
            pu[last].tolist(),
            np.add.reduceat(su, starts).tolist(),
            notional,
            (last - starts + 1).tolist(),
            strict=True,
        )
        opened = self._open
        for b, i, op, hi, lo, cl, vol, notl, count in groups:
            if b != self._bucket:
                out.extend(self._close_all())
                self._bucket = b
            bar = opened.get(i)
            if bar is None:
                bar = opened[i] = _OpenBar(op, vol, notl, count)
                bar.high, bar.low, bar.close = hi, lo, cl
                continue
            # Comparisons, not max()/min(): a call per group is measurable here.
            if hi > bar.high:  # noqa: PLR1730
                bar.high = hi
            if lo < bar.low:  # noqa: PLR1730
                bar.low = lo
            bar.close = cl
            bar.volume += vol
            bar.notional += notl
            bar.trades += count
        self._watermark = max(self._watermark, int(ts.max()))

    def _close_all(self) -> list[ClosedBar]:
        if not self._open:
            return []
        start = self._bucket * self.interval_ns
        end = start + self.interval_ns
        out = []
        for i, bar in sorted(self._open.items()):
            pdiv = self._price_div[i]
            out.append(
                ClosedBar(
                    self.symbols[i],
                    self.interval,
                    start,
                    end,
                    bar.open / pdiv,
                    bar.high / pdiv,
                    bar.low / pdiv,
                    bar.close / pdiv,
                    bar.volume / self._size_div[i],
                    _vwap_units(bar) / pdiv,
                    bar.trades,
                )
            )
        self._open.clear()  # in place: `_add_grouped` holds a reference to it
        return out


def _vwap_units(bar: _OpenBar) -> int:
    """Σ price·size / Σ size in price units, rounded half-even; the close if no volume counted."""
    if bar.volume <= 0:
        return bar.close
    q, r = divmod(bar.notional, bar.volume)
    if 2 * r > bar.volume or (2 * r == bar.volume and q % 2):
        q += 1
    return q
