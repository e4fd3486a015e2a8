from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from tickwire.core.channels import Channel
from tickwire.core.events import encode_body
from tickwire.feeds.bodies import PT_DIGITS
from tickwire.feeds.simulator import Chunk, MarketSimulator, make_instruments

# Ticks of 1 down to 0.00001 and lots of 1 and 0.0001: decimals 0 to 5 for prices, 0 and 4 for
# sizes.
SYMBOLS = ["BTC-USD", "EUR-USD", "AAPL", "XRP-USD", "ES-FUT", "SIM0001", "SIM0002"]
PTS = [0, 5, 10**18, 1_765_000_000_123_456_789, 2**63 - 1]

# Where orjson changes notation or a double stops holding 15 digits, and what is not a number.
EDGES = [
    1e-5,
    1.5e-5,
    9.99e-6,
    1e-6,
    1e-7,
    5e-324,
    0.0,
    -0.0,
    -1.5,
    0.1 + 0.2,
    1e15,
    1e15 - 0.5,
    999_999_999_999_999.9,
    99_999_999_999_999.98,
    9_999_999_999_999_998.0,
    1e16,
    2.0**53,
    1e21,
    1e22,
    1.7976931348623157e308,
    float("nan"),
    float("inf"),
    float("-inf"),
]


def reference(sim: MarketSimulator, chunk: Chunk, pt: int) -> dict[Channel, list[bytes]]:
    """`encode_body` event by event: the bytes the event model defines."""
    names = [i.symbol for i in sim.instruments]
    out: dict[Channel, list[bytes]] = {}
    for i in range(len(chunk)):
        name, ts = names[int(chunk.sym[i])], int(chunk.ts[i])
        if chunk.kind[i] == 0:
            quote = {
                "bid": float(chunk.bid[i]),
                "bid_size": float(chunk.bid_size[i]),
                "ask": float(chunk.ask[i]),
                "ask_size": float(chunk.ask_size[i]),
            }
            body = encode_body("quote", name, ts, pt, quote)
            out.setdefault(Channel("quotes", name), []).append(body)
        else:
            trade = {
                "price": float(chunk.price[i]),
                "size": float(chunk.size[i]),
                "side": "buy" if chunk.buy[i] else "sell",
                "trade_id": int(chunk.trade_id[i]),
            }
            body = encode_body("trade", name, ts, pt, trade)
            out.setdefault(Channel("trades", name), []).append(body)
    return out


def make_sim(symbols: int | list[str] = SYMBOLS, rate: float = 50_000) -> MarketSimulator:
    return MarketSimulator(make_instruments(symbols, 3), rate=rate, seed=3, start_ns=1_000)


def test_bulk_bodies_are_encode_body_bytes_on_simulated_chunks() -> None:
    sim = make_sim(100, rate=1_000_000)
    sim.start_ns = 1_765_000_000_000_000_000
    for pt in PTS:
        chunk = sim.next_chunk(3000)
        assert sim.encode(chunk, pt) == reference(sim, chunk, pt)


def test_slices_of_a_chunk_encoded_ahead_are_stamped_with_their_own_publish_time() -> None:
    sim = make_sim(rate=20_000)
    chunk = sim.encode_ahead(sim.next_chunk(1000))
    cuts = [0, 1, 2, 40, 41, 500, 999, 1000]
    for n, (i, j) in enumerate(itertools.pairwise(cuts)):
        part = chunk.slice(i, j)
        pt = 1_765_000_000_000_000_000 + n
        assert part.encoded is not None
        assert sim.encode(part, pt) == reference(sim, part, pt)
    # A publish time of another width encodes the slice anew.
    part = chunk.slice(10, 30)
    assert sim.encode(part, 7) == reference(sim, part, 7)


def values(tick_multiples: bool = True) -> st.SearchStrategy[float]:
    # Whole numbers of 10**-d, as the simulator rounds them (any d: some match a symbol's
    # decimals, some do not), and anything else a float can be.
    decimal = st.builds(
        lambda k, d: float(k) / 10.0**d,
        st.integers(0, 10**17),
        st.integers(0, 17),
    )
    return st.one_of(decimal, st.sampled_from(EDGES), st.floats())


@st.composite
def chunks(draw: st.DrawFn) -> Chunk:
    n = draw(st.integers(1, 40))
    col = st.lists(values(), min_size=n, max_size=n)
    ints = st.lists(
        st.one_of(st.integers(0, 2**63 - 1), st.integers(-(2**63), -1), st.integers(0, 10**6)),
        min_size=n,
        max_size=n,
    )

    def f64(xs: list[float]) -> np.typing.NDArray[np.float64]:
        return np.array(xs, dtype=np.float64)

    return Chunk(
        np.array(draw(ints), dtype=np.int64),
        np.array(draw(st.lists(st.integers(0, len(SYMBOLS) - 1), min_size=n, max_size=n))),
        np.array(draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)), dtype=np.int8),
        f64(draw(col)),
        f64(draw(col)),
        f64(draw(col)),
        f64(draw(col)),
        f64(draw(col)),
        f64(draw(col)),
        np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n))),
        np.array(draw(ints), dtype=np.int64),
    )


@settings(max_examples=300, deadline=None)
@given(chunks(), st.sampled_from(PTS))
def test_bulk_bodies_are_encode_body_bytes_on_any_columns(chunk: Chunk, pt: int) -> None:
    sim = make_sim()
    assert sim.encode(chunk, pt) == reference(sim, chunk, pt)
    ahead = sim.encode_ahead(chunk)
    stamp = 1_765_000_000_000_000_000 + pt % 1000
    assert len(str(stamp)) == PT_DIGITS
    assert sim.encode(ahead.slice(0, len(chunk) // 2), stamp) == reference(
        sim, chunk.slice(0, len(chunk) // 2), stamp
    )


def test_a_chunk_joined_to_the_next_keeps_the_bodies_encoded_ahead() -> None:
    sim = make_sim(rate=20_000)
    first = sim.encode_ahead(sim.next_chunk(300))
    second = sim.encode_ahead(sim.next_chunk(200))
    early = first.slice(0, 100)
    assert sim.encode(early, 1_765_000_000_000_000_001) == reference(
        sim, early, 1_765_000_000_000_000_001
    )
    joined = Chunk.concat(first.slice(100, 300), second)
    assert joined.encoded is not None
    for i, j in [(0, 7), (7, 250), (250, 400)]:
        part = joined.slice(i, j)
        pt = 1_765_000_000_000_000_000 + i
        assert sim.encode(part, pt) == reference(sim, part, pt)
