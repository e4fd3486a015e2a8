from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

import numpy as np
import orjson
import pytest

from tests.contract.schemas import load_contract
from tickwire.cli import build_parser
from tickwire.core.channels import Channel
from tickwire.core.config import PublisherConfig
from tickwire.core.errors import UnknownChannelType
from tickwire.core.events import Bar, decode_event, tick_decimals
from tickwire.core.redis_process import RedisProcess
from tickwire.core.redis_wire import RedisConnection
from tickwire.core.stream import complete_body
from tickwire.feeds.bars import BarAggregator, ClosedBar, interval_ns
from tickwire.feeds.publisher import Publisher
from tickwire.feeds.runner import BARS_PER_RELEASE, ChunkBars, run_simulator
from tickwire.feeds.simulator import MarketSimulator, make_instruments

S = 1_000_000_000
MS = 1_000_000
#: A whole minute (hence a whole second) since the Unix epoch: 2025-11-27 08:00:00 UTC.
T = 1_764_230_400 * S


@dataclass(frozen=True)
class Spec:
    symbol: str
    tick: float
    lot: float


ETH = Spec("ETH-USD", 0.05, 0.0001)
BTC = Spec("BTC-USD", 0.5, 0.0001)
AAPL = Spec("AAPL", 0.01, 1.0)


def bar(sym: str, start: int, o: float, h: float, lo: float, c: float, **kw: Any) -> ClosedBar:
    interval = kw.pop("interval", "1s")
    return ClosedBar(
        sym, interval, start, start + interval_ns(interval), o, h, lo, c, kw["volume"],
        kw["vwap"], kw["trades"],
    )  # fmt: skip


def test_bar_is_the_ohlcv_of_its_trades() -> None:
    agg = BarAggregator([ETH])
    assert agg.add_trade("ETH-USD", T + 100 * MS, 3100.05, 0.5) == []
    assert agg.add_trade("ETH-USD", T + 200 * MS, 3100.25, 0.25) == []
    assert agg.add_trade("ETH-USD", T + 300 * MS, 3099.90, 1.0) == []
    assert agg.add_trade("ETH-USD", T + 900 * MS, 3100.10, 0.25) == []
    # Notional 1550.025 + 775.0625 + 3099.9 + 775.025 = 6200.0125 over 2.0: VWAP 3100.00625,
    # written at the tick's two decimals.
    closed = agg.add_trade("ETH-USD", T + S, 3100.0, 1.0)
    assert closed == [
        bar("ETH-USD", T, 3100.05, 3100.25, 3099.90, 3100.10, volume=2.0, vwap=3100.01, trades=4)
    ]
    assert closed[0].end == T + S


def test_bar_encodes_as_a_bar_event_stamped_at_its_end() -> None:
    b = bar("ETH-USD", T, 3100.05, 3100.25, 3099.9, 3100.1, volume=2.0, vwap=3100.01, trades=4)
    body = complete_body(b.encode(pt=T + S + 7), "e0", 9)
    assert body == (
        b'{"v":1,"type":"bar","sym":"ETH-USD","ts":1764230401000000000,"pt":1764230401000000007,'
        b'"interval":"1s","open":3100.05,"high":3100.25,"low":3099.9,"close":3100.1,'
        b'"volume":2.0,"vwap":3100.01,"trades":4,"start":1764230400000000000,'
        b'"end":1764230401000000000,"epoch":"e0","seq":9}'
    )
    event = decode_event(body)
    assert isinstance(event, Bar) and event.channel_name == b.channel.name == "bars.1s:ETH-USD"
    load_contract().validate_server_message(
        {"type": "events", "ch": "bars.1s:ETH-USD", "epoch": "e0", "events": [orjson.loads(body)]}
    )


def test_boundary_belongs_to_the_next_bar_and_closes_the_previous() -> None:
    agg = BarAggregator([AAPL])
    agg.add_trade("AAPL", T + S - 1, 190.0, 5)  # last nanosecond of [T, T+1s)
    assert agg.advance(T + S - 1) == []
    closed = agg.add_trade("AAPL", T + S, 191.0, 7)  # first nanosecond of [T+1s, T+2s)
    assert closed == [bar("AAPL", T, 190.0, 190.0, 190.0, 190.0, volume=5.0, vwap=190.0, trades=1)]
    assert agg.advance(T + 2 * S - 1) == []
    assert agg.advance(T + 2 * S) == [
        bar("AAPL", T + S, 191.0, 191.0, 191.0, 191.0, volume=7.0, vwap=191.0, trades=1)
    ]
    assert agg.advance(T + 9 * S) == []


def test_bars_align_to_whole_intervals_of_venue_time() -> None:
    agg = BarAggregator([AAPL], "1m")
    agg.add_trade("AAPL", T + 59 * S + 900 * MS, 190.0, 1)
    (closed,) = agg.add_trade("AAPL", T + 61 * S, 190.5, 1)
    assert (closed.start, closed.end, closed.interval) == (T, T + 60 * S, "1m")
    assert closed.channel == Channel.parse("bars.1m:AAPL")
    agg = BarAggregator([AAPL])
    agg.add_trade("AAPL", T + 2 * S + 123_456_789, 190.0, 1)
    (closed,) = agg.advance(T + 5 * S)
    assert (closed.start, closed.end) == (T + 2 * S, T + 3 * S)


def test_one_symbol_crossing_the_boundary_closes_every_symbols_bar() -> None:
    agg = BarAggregator([BTC, AAPL])
    assert agg.add_trade("AAPL", T + 10 * MS, 190.01, 10) == []
    assert agg.add_trade("BTC-USD", T + 20 * MS, 64000.5, 0.25) == []
    assert agg.add_trade("AAPL", T + 30 * MS, 190.03, 30) == []
    assert agg.add_trade("BTC-USD", T + 40 * MS, 64001.0, 0.75) == []
    # BTC: notional 16000.125 + 48000.75 = 64000.875 over 1.0 → 64000.875, at one decimal
    # 64000.9. AAPL: 1900.1 + 5700.9 = 7601.0 over 40 → 190.025, half-even 190.02.
    # Bars come in the instruments' order, not the order the symbols first traded in.
    assert agg.add_trade("AAPL", T + S + 5 * MS, 190.0, 1) == [
        bar("BTC-USD", T, 64000.5, 64001.0, 64000.5, 64001.0, volume=1.0, vwap=64000.9, trades=2),
        bar("AAPL", T, 190.01, 190.03, 190.01, 190.03, volume=40.0, vwap=190.02, trades=2),
    ]
    # BTC did not trade in [T+1s, T+2s): only AAPL has a bar there.
    assert agg.advance(T + 2 * S) == [
        bar("AAPL", T + S, 190.0, 190.0, 190.0, 190.0, volume=1.0, vwap=190.0, trades=1)
    ]


def test_intervals_without_trades_have_no_bar() -> None:
    agg = BarAggregator([AAPL])
    agg.add_trade("AAPL", T + 500 * MS, 190.0, 1)
    assert agg.advance(T + 2500 * MS) == [
        bar("AAPL", T, 190.0, 190.0, 190.0, 190.0, volume=1.0, vwap=190.0, trades=1)
    ]
    assert agg.add_trade("AAPL", T + 3500 * MS, 191.0, 2) == []
    assert agg.advance(T + 10 * S) == [
        bar("AAPL", T + 3 * S, 191.0, 191.0, 191.0, 191.0, volume=2.0, vwap=191.0, trades=1)
    ]
    assert agg.advance(T + 20 * S) == []


def test_prices_snap_to_the_tick_and_sums_carry_no_float_noise() -> None:
    agg = BarAggregator([BTC, ETH])
    agg.add_trade("BTC-USD", T + 1, 64123.3, 0.1)  # off the 0.5 tick: 64123.5
    agg.add_trade("BTC-USD", T + 2, 64123.2, 0.2)  # 64123.0
    agg.add_trade("ETH-USD", T + 3, 0.1 + 3100.2, 0.1 + 0.2)  # 3100.2999…, 0.30000000000000004
    agg.add_trade("ETH-USD", T + 4, 3100.0499999999997, 0.0001)
    btc, eth = agg.advance(T + S)
    # 0.1 + 0.2 in floats is 0.30000000000000004; the bar's volume is exactly 0.3.
    # VWAP: (6412.35 + 12824.6) / 0.3 = 64123.1666… → 64123.2.
    assert btc == bar(
        "BTC-USD", T, 64123.5, 64123.5, 64123.0, 64123.0, volume=0.3, vwap=64123.2, trades=2
    )
    # VWAP: (930.09 + 0.310005) / 0.3001 = 3100.29991… → 3100.3.
    assert eth == bar(
        "ETH-USD", T, 3100.3, 3100.3, 3100.05, 3100.05, volume=0.3001, vwap=3100.3, trades=2
    )
    assert b'"volume":0.3,' in btc.encode(0) and b'"volume":0.3001,' in eth.encode(0)
    for b, spec in ((btc, BTC), (eth, ETH)):
        doc = orjson.loads(b.encode(0) + b"}")
        places = tick_decimals(spec.tick)
        for name in ("open", "high", "low", "close", "vwap"):
            assert decimals_in(doc[name]) <= max(places, 1), doc
        assert decimals_in(doc["volume"]) <= tick_decimals(spec.lot), doc


def decimals_in(x: float) -> int:
    return len(repr(x).partition(".")[2])


def test_vwap_rounds_half_to_even_at_the_ticks_decimals() -> None:
    agg = BarAggregator([AAPL, Spec("MSFT", 0.01, 1.0)])
    agg.add_trade("AAPL", T + 1, 100.00, 1)
    agg.add_trade("AAPL", T + 2, 100.01, 1)  # 100.005 → 100.0 (even)
    agg.add_trade("MSFT", T + 3, 100.01, 1)
    agg.add_trade("MSFT", T + 4, 100.02, 1)  # 100.015 → 100.02 (even)
    aapl, msft = agg.advance(T + S)
    assert (aapl.vwap, msft.vwap) == (100.0, 100.02)
    assert aapl.low <= aapl.vwap <= aapl.high


def test_trades_stamped_before_the_open_interval_are_late_and_in_no_bar() -> None:
    agg = BarAggregator([AAPL])
    agg.add_trade("AAPL", T + 100 * MS, 190.0, 1)
    agg.add_trade("AAPL", T + S + 100 * MS, 191.0, 1)
    assert agg.add_trade("AAPL", T + 900 * MS, 1.0, 1) == []  # [T, T+1s) is already out
    agg.add_trade("AAPL", T + S + 50 * MS, 192.0, 1)  # earlier than the latest, same interval
    (closed,) = agg.advance(T + 2 * S)
    assert closed == bar(
        "AAPL", T + S, 191.0, 192.0, 191.0, 192.0, volume=2.0, vwap=191.5, trades=2
    )
    assert agg.late_trades == 1


def columns(
    rows: list[tuple[int, int, float, float]],
) -> tuple[Any, Any, Any, Any]:
    ts, sym, price, size = zip(*rows, strict=True)
    return (
        np.array(ts, dtype=np.int64),
        np.array(sym, dtype=np.int64),
        np.array(price, dtype=np.float64),
        np.array(size, dtype=np.float64),
    )


def test_columns_and_single_trades_give_the_same_bars() -> None:
    specs = [BTC, AAPL]
    rows = [
        (T + 10 * MS, 1, 190.01, 10.0),
        (T + 20 * MS, 0, 64000.5, 0.25),
        (T + 30 * MS, 1, 190.03, 30.0),
        (T + S + 5 * MS, 1, 190.0, 1.0),
        (T + 990 * MS, 0, 1.0, 1.0),  # late
        (T + 3 * S, 0, 64010.0, 0.5),
        (T + 3 * S + 1, 0, 64011.0, 0.5),
    ] * 10  # in the copies, the early trades come late; those of the last interval count
    one = BarAggregator(specs)
    by_one = [b for t, s, p, z in rows for b in one.add_trade(specs[s].symbol, t, p, z)]
    by_one += one.advance(T + 9 * S)
    for size in (1, 3, 70):  # in batches below and above the looping threshold
        many = BarAggregator(specs)
        got = []
        for i in range(0, len(rows), size):
            got += many.add_trades(*columns(rows[i : i + size]))
        got += many.advance(T + 9 * S)
        assert got == by_one, size
        assert many.late_trades == one.late_trades == 1 + 9 * 5
    assert [(b.symbol, b.start, b.trades) for b in by_one] == [
        ("BTC-USD", T, 1),
        ("AAPL", T, 2),
        ("AAPL", T + S, 1),
        ("BTC-USD", T + 3 * S, 20),
    ]


def reference_bars(
    specs: list[Spec], rows: list[tuple[int, int, float, float]], interval: int, until: int
) -> list[tuple[Any, ...]]:
    """Bars computed the slow, obvious way with decimals (trades sorted by time)."""
    groups: dict[tuple[int, int], list[tuple[Decimal, Decimal]]] = defaultdict(list)
    for ts, s, p, z in rows:
        tick = Decimal(repr(specs[s].tick))
        price = (Decimal(repr(p)) / tick).quantize(Decimal(1), ROUND_HALF_EVEN) * tick
        lot = Decimal(1).scaleb(-tick_decimals(specs[s].lot))
        size = Decimal(repr(z)).quantize(lot, ROUND_HALF_EVEN)
        groups[(ts // interval, s)].append((price, size))
    out = []
    for (b, s), trades in sorted(groups.items()):
        if (b + 1) * interval > until:
            continue
        prices = [p for p, _ in trades]
        volume = sum((z for _, z in trades), Decimal(0))
        vwap = sum((p * z for p, z in trades), Decimal(0)) / volume
        places = Decimal(1).scaleb(-tick_decimals(specs[s].tick))
        out.append(
            (specs[s].symbol, b * interval, prices[0], max(prices), min(prices), prices[-1],
             volume, vwap.quantize(places, ROUND_HALF_EVEN), len(trades))
        )  # fmt: skip
    return out


def as_decimals(bars: list[ClosedBar]) -> list[tuple[Any, ...]]:
    return [
        (b.symbol, b.start, *(Decimal(repr(x)) for x in (b.open, b.high, b.low, b.close)),
         Decimal(repr(b.volume)), Decimal(repr(b.vwap)), b.trades)
        for b in bars
    ]  # fmt: skip


@pytest.mark.parametrize("interval", ["1s", "1m"])
def test_simulated_trades_match_a_decimal_reference(interval: str) -> None:
    sim = MarketSimulator(make_instruments(12, 3), rate=3000, seed=3, start_ns=T + 7 * S)
    specs = [Spec(i.symbol, i.tick, i.lot) for i in sim.instruments]
    agg = BarAggregator(sim.instruments, interval)
    rows: list[tuple[int, int, float, float]] = []
    got: list[ClosedBar] = []
    for _ in range(1200 if interval == "1m" else 120):  # 120 s or 12 s of trading
        chunk = sim.next_chunk(300)
        m = chunk.kind == 1
        got += agg.add_trades(chunk.ts[m], chunk.sym[m], chunk.price[m], chunk.size[m])
        rows += zip(
            chunk.ts[m].tolist(),
            chunk.sym[m].tolist(),
            chunk.price[m].tolist(),
            chunk.size[m].tolist(),
            strict=True,
        )
    until = agg.watermark
    assert len(got) > 20
    # Equal as decimals read from the shortest repr: the floats carry no binary noise.
    assert as_decimals(got) == reference_bars(specs, rows, interval_ns(interval), until)


@pytest.mark.parametrize("max_pending_events", [16_384, 50])
def test_chunk_bars_are_the_bars_of_each_chunk_fed_at_once(max_pending_events: int) -> None:
    # 5-event chunks over 70 s: ChunkBars holds them back until a boundary (or its cap).
    sim = MarketSimulator(make_instruments(5, 2), rate=1000, seed=2, start_ns=T + 300 * MS)
    direct = [BarAggregator(sim.instruments, "1s"), BarAggregator(sim.instruments, "1m")]
    batched = ChunkBars(sim.instruments, ["1s", "1m"], max_pending_events=max_pending_events)
    closed = 0
    for k in range(14_000):
        chunk = sim.next_chunk(5)
        m = chunk.kind == 1
        now = int(chunk.ts[-1])
        expected = [
            bar
            for agg in direct
            for bar in agg.add_trades(chunk.ts[m], chunk.sym[m], chunk.price[m], chunk.size[m])
            + agg.advance(now)
        ]
        assert batched.add(chunk) == expected, k
        closed += len(expected)
    assert closed == 5 * (70 + 1)  # per symbol: [T, T+1s) … [T+69s, T+70s) and [T, T+60s)


def test_only_intervals_with_channels_are_accepted() -> None:
    assert interval_ns("1s") == S and interval_ns("1m") == 60 * S
    for bad in ("5s", "1h", "0s", "s"):
        with pytest.raises(UnknownChannelType):
            BarAggregator([AAPL], bad)


def test_bad_trades_are_refused_before_any_is_taken() -> None:
    agg = BarAggregator([AAPL])
    with pytest.raises(ValueError):
        agg.add_trade("AAPL", T, float("nan"), 1)
    with pytest.raises(ValueError):
        agg.add_trade("AAPL", T, 190.0, 0)
    with pytest.raises(KeyError):
        agg.add_trade("MSFT", T, 190.0, 1)
    for n in (2, 100):
        ts, sym, price, size = columns([(T + i, 0, 190.0, 1.0) for i in range(n)])
        size[-1] = -1.0
        with pytest.raises(ValueError):
            agg.add_trades(ts, sym, price, size)
    assert agg.advance(T + S) == []


def test_feed_sim_publishes_1s_bars_unless_told_otherwise() -> None:
    parse = build_parser().parse_args
    assert parse(["feed", "sim"]).bars == ("1s",)
    assert parse(["feed", "sim", "--bars", "1m,1s,1m"]).bars == ("1m", "1s")
    assert parse(["feed", "sim", "--bars", "off"]).bars == ()
    with pytest.raises(SystemExit):
        parse(["feed", "sim", "--bars", "5s"])


# -- with Redis


async def read_stream(conn: RedisConnection, channel: Channel) -> list[dict[str, Any]]:
    """Stored events with their numbers as decimals, exactly as written."""
    entries = await conn.execute("XRANGE", channel.stream_key, "-", "+")
    return [json.loads(fields[1], parse_float=Decimal) for _id, fields in entries]


async def test_simulator_bars_in_redis_agree_with_its_trades_and_the_contract(
    redis: RedisConnection, redis_server: RedisProcess
) -> None:
    # Starts 3.3 s before a minute boundary and runs ~5 s of venue time: 1 s bars, one 1 m bar.
    sim = MarketSimulator(make_instruments(3, 5), rate=4000, seed=5, start_ns=T + 56_700 * MS)
    async with Publisher(PublisherConfig(redis_url=redis_server.url)) as pub:
        report = await run_simulator(
            pub, sim, bar_intervals=("1s", "1m"), count=20_000, throttle=False
        )
    contract = load_contract()
    last_ts = 0
    trades: dict[str, list[dict[str, Any]]] = {}
    for inst in sim.instruments:
        trades[inst.symbol] = await read_stream(redis, Channel("trades", inst.symbol))
        quotes = await read_stream(redis, Channel("quotes", inst.symbol))
        last_ts = max(last_ts, trades[inst.symbol][-1]["ts"], quotes[-1]["ts"])
    published = 0
    for interval, length in (("1s", S), ("1m", 60 * S)):
        for inst in sim.instruments:
            channel = Channel(f"bars.{interval}", inst.symbol)
            raw = await redis.execute("XRANGE", channel.stream_key, "-", "+")
            events = [orjson.loads(fields[1]) for _id, fields in raw]
            contract.validate_server_message(
                {
                    "type": "events",
                    "ch": channel.name,
                    "epoch": events[0]["epoch"],
                    "events": events,
                }
            )
            bars = await read_stream(redis, channel)
            published += len(bars)
            by_start: dict[int, list[dict[str, Any]]] = defaultdict(list)
            for t in trades[inst.symbol]:
                by_start[t["ts"] - t["ts"] % length].append(t)
            # A bar for every interval with trades, bar the one still open at the end.
            expected = sorted(s for s in by_start if s + length <= last_ts)
            assert [b["start"] for b in bars] == expected
            assert len(expected) == (5 if interval == "1s" else 1)
            places = Decimal(1).scaleb(-inst.decimals)
            for b in bars:
                ts = by_start[b["start"]]
                prices = [t["price"] for t in ts]
                volume = sum((t["size"] for t in ts), Decimal(0))
                vwap = sum((t["price"] * t["size"] for t in ts), Decimal(0)) / volume
                assert b["end"] == b["ts"] == b["start"] + length and b["interval"] == interval
                assert (b["open"], b["high"], b["low"], b["close"]) == (
                    prices[0], max(prices), min(prices), prices[-1],
                )  # fmt: skip
                assert (b["volume"], b["trades"]) == (volume, len(ts))
                assert b["vwap"] == vwap.quantize(places, ROUND_HALF_EVEN)
    assert report.bars == published == 3 * 5 + 3


class RecordingPublisher(Publisher):
    """A publisher that notes the channels and event counts of each `publish` call."""

    calls: list[dict[Channel, int]]

    async def publish(
        self, batches: Mapping[Channel, Sequence[bytes]] | Iterable[tuple[Channel, Sequence[bytes]]]
    ) -> None:
        assert isinstance(batches, Mapping)
        self.calls.append({ch: len(bodies) for ch, bodies in batches.items()})
        await super().publish(batches)


async def test_bars_follow_their_releases_quotes_and_trades_a_bounded_number_at_a_time(
    fresh_redis: RedisProcess,
) -> None:
    # 60 symbols: each second's 60 bars close at once, more than a release may carry.
    sim = MarketSimulator(make_instruments(60, 7), rate=20_000, seed=7, start_ns=T + 300 * MS)
    pub = RecordingPublisher(PublisherConfig(redis_url=fresh_redis.url))
    pub.calls = []
    async with pub:
        report = await run_simulator(pub, sim, bar_intervals=("1s",), count=60_000, throttle=False)
    is_bar = [[ch.kind == "bars.1s" for ch in call] for call in pub.calls]
    # Never in one call with quotes or trades, so they never wait for bars.
    assert all(all(kinds) or not any(kinds) for kinds in is_bar)
    bar_calls = [call for call, kinds in zip(pub.calls, is_bar, strict=True) if all(kinds)]
    sizes = [sum(call.values()) for call in bar_calls]
    assert max(sizes[:-1]) == BARS_PER_RELEASE and report.bars == sum(sizes) >= 2 * 60
    # Each bar call but the last (the end of the run drains what is left) comes right after a
    # release of quotes and trades: a second's bars spread over several releases.
    assert not any(is_bar[0])
    for i in range(1, len(pub.calls) - 1):
        if all(is_bar[i]):
            assert not any(is_bar[i - 1]), f"bar call {i} follows another"
    assert len(bar_calls) >= 2 * 60 // BARS_PER_RELEASE + 2
    # All of them stored, in order on each channel.
    stored = 0
    for inst in sim.instruments:
        ch = Channel("bars.1s", inst.symbol)
        entries = await RedisConnection.open(fresh_redis.url)
        try:
            raw = await entries.execute("XRANGE", ch.stream_key, "-", "+")
        finally:
            entries.close()
        starts = [orjson.loads(fields[1])["start"] for _id, fields in raw]
        assert starts == sorted(starts) and len(set(starts)) == len(starts)
        stored += len(starts)
    assert stored == report.bars
