"""On-demand bars from trade columns: exact against a Decimal reference, closing, late trades."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tickwire.feeds.bars import ClosedBar
from tickwire.feeds.trade_bars import IntervalBars, aggregate, aggregate_groups, decimals_of

MS = 1_000_000
S = 1_000 * MS
T0 = 1_764_230_400 * S  # a multiple of every interval here

Trade = tuple[int, float, float]  # ts, price, size


def reference_bars(
    symbol: str, interval: str, interval_ns: int, trades: Sequence[Trade]
) -> list[dict[str, Any]]:
    """Bars of `trades` (stream order) computed with Decimals of the values' shortest forms."""
    groups: dict[int, list[tuple[Decimal, Decimal]]] = {}
    for ts, price, size in trades:
        groups.setdefault(ts - ts % interval_ns, []).append(
            (Decimal(repr(price)), Decimal(repr(size)))
        )
    out = []
    for start in sorted(groups):
        rows = groups[start]
        prices = [p for p, _ in rows]
        volume = sum((s for _, s in rows), Decimal(0))
        # The decimals of a price's shortest form, an integral one having none (`repr` writes
        # 625.0, but `decimals_of` reads 64123.0 as 0 decimals, as docs/protocol.md says).
        dp = max(
            0 if p == p.to_integral_value() else -p.as_tuple().exponent  # type: ignore[operator]
            for p in prices
        )
        vwap = sum((p * s for p, s in rows), Decimal(0)) / volume
        out.append(
            {
                "sym": symbol,
                "interval": interval,
                "start": start,
                "end": start + interval_ns,
                "open": prices[0],
                "high": max(prices),
                "low": min(prices),
                "close": prices[-1],
                "volume": volume,
                "vwap": vwap.quantize(Decimal(1).scaleb(-dp), rounding=ROUND_HALF_EVEN),
                "trades": len(rows),
            }
        )
    return out


def as_decimals(bars: Sequence[ClosedBar]) -> list[dict[str, Any]]:
    out = []
    for b in bars:
        doc: dict[str, Any] = {"sym": b.symbol, **b.fields()}
        for k in ("open", "high", "low", "close", "volume", "vwap"):
            doc[k] = Decimal(repr(doc[k]))
        out.append(doc)
    return out


def columns(trades: Sequence[Trade]) -> tuple[Any, Any, Any]:
    ts = np.array([t for t, _, _ in trades], dtype=np.int64)
    price = np.array([p for _, p, _ in trades], dtype=np.float64)
    size = np.array([s for _, _, s in trades], dtype=np.float64)
    return ts, price, size


def test_decimals_of_reads_the_shortest_form() -> None:
    values = np.array([64123.5, 0.1, 0.25, 3.0, 1e-8, 100.125, 0.30000000000000004])
    assert decimals_of(values).tolist() == [1, 1, 2, 0, 8, 3, 12]


def test_aggregate_gives_exact_ohlc_volume_vwap_count_start_end() -> None:
    trades = [
        (T0 + 10 * MS, 0.1, 0.1),
        (T0 + 20 * MS, 0.2, 0.2),
        (T0 + 5 * MS, 0.3, 0.7),  # out of ts order, in the same bar: stream order decides
        (T0 + 260 * MS, 64123.5, 0.0123),
    ]
    bars = [b.closed("X", "250ms", 250 * MS) for b in aggregate(*columns(trades), 250 * MS)]
    first, second = bars
    assert (first.start, first.end) == (T0, T0 + 250 * MS)
    assert (first.open, first.high, first.low, first.close) == (0.1, 0.3, 0.1, 0.3)
    assert first.volume == 1.0  # 0.1 + 0.2 + 0.7 in floats would be 0.9999999999999999
    assert first.vwap == 0.3  # (0.01 + 0.04 + 0.21) / 1.0 = 0.26 → one decimal, half-even
    assert first.trades == 3
    assert (second.start, second.open, second.volume, second.vwap) == (
        T0 + 250 * MS,
        64123.5,
        0.0123,
        64123.5,
    )
    assert as_decimals(bars) == reference_bars("X", "250ms", 250 * MS, trades)


prices = st.decimals(min_value=Decimal("0.0001"), max_value=Decimal(10**7), places=4).map(float)
sizes = st.decimals(min_value=Decimal("0.00000001"), max_value=Decimal(1000), places=8).map(float)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 3 * S), prices, sizes).map(lambda t: (T0 + t[0], t[1], t[2])),
        min_size=1,
        max_size=300,
    ),
    st.sampled_from([("100ms", 100 * MS), ("250ms", 250 * MS), ("1500ms", 1500 * MS)]),
)
# Every price integral, the VWAP not: rounded to 0 decimals (found by a fresh clone's run).
@example([(T0, 625.0, 1e-08), (T0, 78125.0, 2e-08)], ("100ms", 100 * MS))
def test_aggregate_matches_the_decimal_reference(
    trades: list[Trade], interval: tuple[str, int]
) -> None:
    name, ns = interval
    got = [b.closed("X", name, ns) for b in aggregate(*columns(trades), ns)]
    assert as_decimals(got) == reference_bars("X", name, ns, trades)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 2 * S), prices, sizes).map(lambda t: (T0 + t[0], t[1], t[2])),
        min_size=1,
        max_size=100,
    ),
    st.integers(1, 7),
)
def test_bars_fed_in_pieces_equal_bars_fed_at_once(trades: list[Trade], pieces: int) -> None:
    whole = IntervalBars("X", "250ms", closed_until=T0, close_delay_ns=0)
    parts = IntervalBars("X", "250ms", closed_until=T0, close_delay_ns=0)
    ts, price, size = columns(trades)
    whole.add(ts, ts, price, size)
    for chunk in np.array_split(np.arange(len(trades)), pieces):
        parts.add(ts[chunk], ts[chunk], price[chunk], size[chunk])
    end = T0 + 3 * S
    assert parts.close(end) == whole.close(end)


def test_a_bar_closes_on_time_without_a_later_trade_and_empty_intervals_give_none() -> None:
    bars = IntervalBars("X", "250ms", closed_until=T0, close_delay_ns=50 * MS)
    ts, price, size = columns([(T0 + 100 * MS, 10.5, 1.0)])
    bars.add(ts, ts + 1 * MS, price, size)  # published 1 ms after its venue time
    assert bars.due_at() == T0 + 250 * MS + 50 * MS + 1 * MS
    assert bars.close(T0 + 300 * MS) == []  # venue clock 299 ms: not yet
    (bar,) = bars.close(T0 + 301 * MS)
    assert (bar.start, bar.end, bar.close, bar.trades) == (T0, T0 + 250 * MS, 10.5, 1)
    # Three more intervals pass with no trade: no bar, but they are closed.
    assert bars.close(T0 + 1051 * MS) == []
    assert bars.closed_until == T0 + 1000 * MS
    assert bars.open_bars == 0


def test_a_late_trade_is_in_no_bar_and_counted() -> None:
    bars = IntervalBars("X", "250ms", closed_until=T0, close_delay_ns=50 * MS)
    ts, price, size = columns([(T0 + 10 * MS, 10.0, 1.0), (T0 + 260 * MS, 11.0, 1.0)])
    bars.add(ts, ts, price, size)
    (first,) = bars.close(T0 + 300 * MS)
    assert first.close == 10.0
    # Stamped in the first interval (closed and published) but read only now: late.
    ts, price, size = columns([(T0 + 200 * MS, 99.0, 5.0), (T0 + 270 * MS, 12.0, 1.0)])
    bars.add(ts, ts + 100 * MS, price, size)
    assert bars.late_trades == 1
    # Within the close delay a trade of the open bar still counts, even after a later one.
    ts, price, size = columns([(T0 + 510 * MS, 13.0, 1.0), (T0 + 490 * MS, 9.0, 1.0)])
    bars.add(ts, ts, price, size)
    second, third = bars.close(T0 + 800 * MS)
    assert (second.open, second.high, second.low, second.close, second.trades) == (
        11.0,
        12.0,
        9.0,
        9.0,
        3,
    )
    assert (third.start, third.close) == (T0 + 500 * MS, 13.0)
    assert bars.late_trades == 1


def test_a_replayed_feed_runs_the_venue_clock_from_its_own_timestamps() -> None:
    old = T0 - 86_400 * S  # recorded a day ago, published now
    bars = IntervalBars("X", "5s", closed_until=old, close_delay_ns=100 * MS)
    ts, price, size = columns([(old + 1 * S, 1.5, 2.0)])
    bars.add(ts, ts + 86_400 * S, price, size)
    assert bars.close(T0 + 1 * S) == []
    assert bars.late_trades == 0
    (bar,) = bars.close(T0 + 5 * S + 100 * MS)
    assert bar.start == old


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 2 * S), prices, sizes, st.integers(0, 4)).map(
            lambda t: (T0 + t[0], t[1], t[2], t[3])
        ),
        min_size=1,
        max_size=200,
    )
)
def test_one_pass_over_many_channels_equals_one_per_channel(
    rows: list[tuple[int, float, float, int]],
) -> None:
    ts, price, size = columns([(t, p, s) for t, p, s, _ in rows])
    groups = np.array([g for *_, g in rows], dtype=np.int64)
    owners, bars = aggregate_groups(ts, price, size, groups, 250 * MS)
    expected = []
    for g in sorted(set(groups.tolist())):
        mine = groups == g
        expected += [(g, b) for b in aggregate(ts[mine], price[mine], size[mine], 250 * MS)]
    assert list(zip(owners, bars, strict=True)) == expected
