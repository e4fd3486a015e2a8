"""Sans-I/O bars of any interval from stored trades, with numpy: columns in, closed bars out.

This is what `tickwire bars` (`tickwire.feeds.bar_maker`) runs per bar channel. Unlike the
simulator's `BarAggregator` it needs no instrument table: a stored trade's price and size are
written in shortest round-trip form (`64123.5`), so their decimals are read off the values.

Rules (docs/protocol.md, "On-demand bars"):

- A bar covers venue time `[start, start + interval)`, `start` a multiple of the interval since
  the Unix epoch, and holds the trades of that span in stream order: `open` the first, `close`
  the last, `high`/`low`, `volume` = Σ size, `vwap` = Σ price·size / Σ size, `trades` = count.
  Every sum is exact: prices and sizes become integers in units of the most decimals any trade
  of the bar has, and the VWAP is that exact ratio rounded half-even to the price decimals.
- A bar closes when the venue clock reaches `end + close_delay`, whether or not a trade came
  after it. An interval without trades gives no bar.
- The venue clock is the latest trade's `ts` plus the wall-clock time since its publish time
  `pt` (so a replay of old timestamps runs its own clock), or the latest `ts` seen if that is
  later; before any trade, the wall clock. It never goes back.
- A trade that arrives once its bar's interval is closed (its `ts` before `closed_until`) is
  late: it is in no bar, and counted in `late_trades`. Bars already published never change.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

import numpy as np
import numpy.typing as npt

from tickwire.core.channels import bar_interval_ns
from tickwire.feeds.bars import ClosedBar

#: Most decimals a price or size may have (a value with more is taken at this many).
MAX_DECIMALS = 12
#: Integers in float64 are exact below this: past it the units are computed with Decimal.
_EXACT_FLOAT = float(1 << 52)

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]


def decimals_of(values: F64) -> I64:
    """The fewest decimals (0..MAX_DECIMALS) that write each value: those of its shortest
    round-trip form (`0.25` → 2, `64123.0` → 0). Exact: v·10^k rounded, divided back by 10^k
    (a correctly rounded division), gives v itself only when v is the double nearest a number
    of k decimals."""
    out = np.full(len(values), MAX_DECIMALS, dtype=np.int64)
    todo = np.ones(len(values), dtype=bool)
    for k in range(MAX_DECIMALS + 1):
        scale = 10.0**k
        ok = todo & (np.rint(values * scale) / scale == values)
        out[ok] = k
        todo &= ~ok
        if not todo.any():
            break
    return out


def _units(values: F64, decimals: I64) -> I64 | npt.NDArray[np.object_]:
    """`values` as integers in units of 10^-decimals (exactly; int64 unless that overflows)."""
    scaled = values * np.power(10.0, decimals)
    if len(scaled) and float(np.abs(scaled).max()) >= _EXACT_FLOAT:
        return np.array(
            [
                int(Decimal(repr(float(v))).scaleb(int(d)).to_integral_value())
                for v, d in zip(values, decimals, strict=True)
            ],
            dtype=object,
        )
    return np.rint(scaled).astype(np.int64)


@dataclass(slots=True)
class PartialBar:
    """Trades of one interval so far, as integers: prices in 10^-dp, sizes in 10^-ds."""

    start: int
    dp: int
    ds: int
    open: int
    high: int
    low: int
    close: int
    volume: int
    notional: int  # Σ price·size in 10^-(dp+ds)
    trades: int

    def rescaled(self, dp: int, ds: int) -> PartialBar:
        """The same bar in units of at least as many decimals."""
        fp, fs = 10 ** (dp - self.dp), 10 ** (ds - self.ds)
        return PartialBar(
            self.start,
            dp,
            ds,
            self.open * fp,
            self.high * fp,
            self.low * fp,
            self.close * fp,
            self.volume * fs,
            self.notional * fp * fs,
            self.trades,
        )

    def merged(self, later: PartialBar) -> PartialBar:
        """This bar followed by `later` trades of the same interval."""
        dp, ds = max(self.dp, later.dp), max(self.ds, later.ds)
        a, b = self.rescaled(dp, ds), later.rescaled(dp, ds)
        return PartialBar(
            a.start,
            dp,
            ds,
            a.open,
            max(a.high, b.high),
            min(a.low, b.low),
            b.close,
            a.volume + b.volume,
            a.notional + b.notional,
            a.trades + b.trades,
        )

    def closed(self, symbol: str, interval: str, interval_ns: int) -> ClosedBar:
        pdiv, sdiv = 10**self.dp, 10**self.ds
        return ClosedBar(
            symbol,
            interval,
            self.start,
            self.start + interval_ns,
            self.open / pdiv,
            self.high / pdiv,
            self.low / pdiv,
            self.close / pdiv,
            self.volume / sdiv,
            self.vwap_units() / pdiv,
            self.trades,
        )

    def vwap_units(self) -> int:
        """Σ price·size / Σ size in 10^-dp, rounded half-even (the close if no volume)."""
        if self.volume <= 0:
            return self.close
        q, r = divmod(self.notional, self.volume)
        if 2 * r > self.volume or (2 * r == self.volume and q % 2):
            q += 1
        return q


def aggregate(ts: I64, price: F64, size: F64, interval_ns: int) -> list[PartialBar]:
    """Trades (columns in stream order) grouped into their intervals, ordered by start."""
    return aggregate_groups(ts, price, size, None, interval_ns)[1]


def aggregate_groups(
    ts: I64, price: F64, size: F64, groups: I64 | None, interval_ns: int
) -> tuple[list[int], list[PartialBar]]:
    """Trades of several channels at once (`groups[i]`: whose trade i is, e.g. the index of its
    channel; None: all one), grouped by channel and interval in one pass: each bar's group and
    the bars, by group then start. One call for many channels costs about what one costs."""
    n = len(ts)
    if n == 0:
        return [], []
    bucket = np.asarray(ts, dtype=np.int64) // interval_ns
    if groups is None:
        order = np.argsort(bucket, kind="stable")  # stream order within an interval
        group = np.zeros(n, dtype=np.int64)
    else:
        order = np.lexsort((bucket, groups))  # stable too
        group = np.asarray(groups, dtype=np.int64)[order]
    bucket = bucket[order]
    price = np.asarray(price, dtype=np.float64)[order]
    size = np.asarray(size, dtype=np.float64)[order]
    change = (bucket[1:] != bucket[:-1]) | (group[1:] != group[:-1])
    starts = np.flatnonzero(np.concatenate(([True], change)))
    lengths = np.diff(np.concatenate((starts, [n])))
    last = starts + lengths - 1
    dp = np.maximum.reduceat(decimals_of(price), starts)
    ds = np.maximum.reduceat(decimals_of(size), starts)
    pu = _units(price, np.repeat(dp, lengths))
    su = _units(size, np.repeat(ds, lengths))
    wide = object in (pu.dtype, su.dtype) or int(np.abs(pu).max()) * int(su.max()) * n >= 1 << 63
    notional = np.add.reduceat(
        pu.astype(object) * su.astype(object) if wide else pu * su, starts
    ).tolist()
    bars = [
        PartialBar(int(b) * interval_ns, d_p, d_s, o, h, lo, c, v, notl, k)
        for b, d_p, d_s, o, h, lo, c, v, notl, k in zip(
            bucket[starts].tolist(),
            dp.tolist(),
            ds.tolist(),
            pu[starts].tolist(),
            np.maximum.reduceat(pu, starts).tolist(),
            np.minimum.reduceat(pu, starts).tolist(),
            pu[last].tolist(),
            np.add.reduceat(su, starts).tolist(),
            notional,
            lengths.tolist(),
            strict=True,
        )
    ]
    return group[starts].tolist(), bars


class IntervalBars:
    """One bar channel's state: the open bars, the venue clock, what is closed.

    `add` the trades read from the stream (in stream order), then `close(now)` with the wall
    clock: it returns the bars that are due, by start. `due_at` says when the next one is.
    """

    def __init__(
        self, symbol: str, interval: str, *, closed_until: int, close_delay_ns: int
    ) -> None:
        self.symbol = symbol
        self.interval = interval
        self.interval_ns = bar_interval_ns(interval)
        #: Intervals ending at or before this are done: a trade stamped before it is late.
        self.closed_until = closed_until - closed_until % self.interval_ns
        self.close_delay_ns = close_delay_ns
        self.late_trades = 0
        self._open: dict[int, PartialBar] = {}
        self._latest_ts: int | None = None  # the highest venue time seen
        self._lag: int | None = None  # pt - ts of the last trade read
        self._venue = closed_until

    def add(self, ts: I64, pt: I64, price: F64, size: F64) -> None:
        """Trades in stream order (`pt`: their publish times)."""
        if not len(ts):
            return
        on_time = self.admit(ts, pt)
        for bar in aggregate(ts[on_time], price[on_time], size[on_time], self.interval_ns):
            self.fold(bar)

    def admit(self, ts: I64, pt: I64) -> npt.NDArray[np.bool_]:
        """The first half of `add`: set the clock by these trades (in stream order, at least
        one), count the late ones, and say which are not (their bars go to `fold`)."""
        self.observe(int(ts.max()), int(ts[-1]), int(pt[-1]))
        on_time = ts >= self.closed_until
        self.late_trades += int(len(ts) - np.count_nonzero(on_time))
        return on_time

    def fold(self, bar: PartialBar) -> None:
        """Add a bar of trades that `admit` let in (later trades than any folded before)."""
        held = self._open.get(bar.start)
        self._open[bar.start] = bar if held is None else held.merged(bar)

    def observe(self, top: int, ts: int, pt: int) -> None:
        """Set the venue clock by trades read: `top` the highest `ts`, `ts`/`pt` the last's."""
        self._lag = pt - ts
        self._latest_ts = top if self._latest_ts is None else max(self._latest_ts, top)

    def venue_now(self, now: int) -> int:
        """The venue clock at wall-clock time `now` (ns), never going back."""
        venue = now - (self._lag or 0)
        if self._latest_ts is not None and self._latest_ts > venue:
            venue = self._latest_ts
        self._venue = max(self._venue, venue)
        return self._venue

    def close(self, now: int) -> list[ClosedBar]:
        """The bars due at wall-clock time `now`, by start; intervals up to them are closed."""
        edge = self.venue_now(now) - self.close_delay_ns
        edge -= edge % self.interval_ns
        if edge <= self.closed_until:
            return []
        self.closed_until = edge
        due = sorted(s for s in self._open if s + self.interval_ns <= edge)
        return [self._open.pop(s).closed(self.symbol, self.interval, self.interval_ns) for s in due]

    def due_at(self) -> int:
        """Wall-clock time (ns) at which the open interval closes."""
        lag = self._lag or 0
        return self.closed_until + self.interval_ns + self.close_delay_ns + lag

    @property
    def open_bars(self) -> int:
        return len(self._open)
