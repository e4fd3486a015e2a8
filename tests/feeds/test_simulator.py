from __future__ import annotations

import numpy as np
import numpy.typing as npt
import orjson
from hypothesis import given
from hypothesis import strategies as st

from tickwire.core.events import tick_decimals
from tickwire.feeds.simulator import (
    ENCODE_AHEAD_EVENTS,
    MAX_SLICE_EVENTS,
    MarketSimulator,
    make_instruments,
    paced_chunks,
    round_to_decimals,
)


@given(st.integers(min_value=1, max_value=10**9), st.sampled_from([0.01, 0.5, 0.25, 0.0001]))
def test_prices_rounded_to_tick_print_without_float_noise(ticks: int, tick: float) -> None:
    price = round_to_decimals(np.array([ticks * tick]), np.array([tick_decimals(tick)]))[0]
    text = orjson.dumps(float(price)).decode()
    assert len(text.split(".")[-1]) <= max(tick_decimals(tick), 1), text
    assert abs(price - ticks * tick) < tick / 2


def make_sim(seed: int = 7, rate: float = 20_000) -> MarketSimulator:
    return MarketSimulator(make_instruments(5, seed), rate=rate, seed=seed, start_ns=1_000)


def test_simulator_is_deterministic_under_a_seed() -> None:
    a, b, c = make_sim(), make_sim(), make_sim(seed=8)
    ea = [a.encode(a.next_chunk(), pt=0) for _ in range(3)]
    eb = [b.encode(b.next_chunk(), pt=0) for _ in range(3)]
    ec = [c.encode(c.next_chunk(), pt=0) for _ in range(3)]
    assert ea == eb
    assert ea != ec


def test_simulator_events_are_well_formed_quotes_and_trades() -> None:
    sim = make_sim()
    chunk = sim.next_chunk(5000)
    assert (chunk.ask > chunk.bid).all()
    assert (np.diff(chunk.ts) >= 0).all()
    assert 0.15 < chunk.kind.mean() < 0.35
    ticks = np.array([sim.instruments[s].tick for s in chunk.sym])
    assert np.allclose(np.round(chunk.bid / ticks), chunk.bid / ticks)
    encoded = sim.encode(chunk, pt=5)
    assert sum(len(v) for v in encoded.values()) == 5000
    for channel, bodies in encoded.items():
        trade_ids = []
        for body in bodies:
            doc = orjson.loads(body + b"}")
            assert doc["sym"] == channel.symbol and doc["pt"] == 5 and doc["v"] == 1
            if channel.kind == "trades":
                assert doc["side"] in ("buy", "sell") and doc["size"] > 0
                trade_ids.append(doc["trade_id"])
            else:
                assert doc["ask"] > doc["bid"]
        assert trade_ids == list(range(1, len(trade_ids) + 1))


def test_simulator_prices_move_and_persist_across_chunks() -> None:
    sim = make_sim()
    first = sim.next_chunk(2000)
    later = [sim.next_chunk(2000) for _ in range(20)][-1]
    btc = 0
    assert first.bid[first.sym == btc][0] != later.bid[later.sym == btc][-1]
    # A random walk, not a jump: the relative move between consecutive quotes is small.
    mids = (later.bid + later.ask)[later.sym == btc] / 2
    assert np.abs(np.diff(np.log(mids))).max() < 0.01


def assert_every_event_once_in_order(released: list[int]) -> None:
    """`released` (event times) is every event of `make_sim(rate=10_000)`, once, in order, for
    at least 90 % of 0.5 s."""
    again = make_sim(rate=10_000)
    expected = np.concatenate([again.next_chunk().ts for _ in range(len(released) // 50 + 2)])
    assert released == expected[: len(released)].tolist()
    assert len(released) > 0.9 * 0.5 * 10_000


async def test_paced_chunks_keep_the_target_rate_within_5_percent() -> None:
    now = [0.0]

    async def fake_sleep(seconds: float) -> None:
        now[0] += max(seconds, 1e-6)

    sim = make_sim(rate=10_000)
    sent = 0
    async for chunk in paced_chunks(sim, duration=3.0, monotonic=lambda: now[0], sleep=fake_sleep):
        sent += len(chunk)
    assert abs(sent / 3.0 - 10_000) / 10_000 < 0.05


async def test_paced_events_go_out_when_due_never_early_and_at_most_a_tick_late() -> None:
    now = [0.0]

    async def fake_sleep(seconds: float) -> None:
        now[0] += seconds

    sim = make_sim(rate=10_000)
    tick = 0.001
    released: list[int] = []
    async for chunk in paced_chunks(
        sim, duration=0.5, monotonic=lambda: now[0], sleep=fake_sleep, tick_s=tick
    ):
        due = (chunk.ts - sim.start_ns) / 1e9
        assert due.max() <= now[0], "an event went out before its time"
        assert now[0] - due.min() <= tick + 1e-9, "an event waited more than a tick"
        released += chunk.ts.tolist()
    assert_every_event_once_in_order(released)


async def test_on_a_venue_clock_events_are_due_at_their_ts_however_late_pacing_began() -> None:
    now = [0.0]  # monotonic seconds

    async def fake_sleep(seconds: float) -> None:
        now[0] += seconds

    sim = make_sim(rate=10_000)
    late = 0.25  # between reading `start_ns` and pacing (a connection set-up, say)

    def wall() -> int:
        return sim.start_ns + round((late + now[0]) * 1e9)

    tick = 0.001
    slices: list[tuple[float, npt.NDArray[np.int64]]] = []
    async for chunk in paced_chunks(
        sim,
        duration=0.5,
        monotonic=lambda: now[0],
        sleep=fake_sleep,
        tick_s=tick,
        venue_clock_ns=wall,
    ):
        slices.append((wall(), chunk.ts.copy()))
    first_at, first = slices[0]
    # Everything due during the set-up goes out at once, then each event within a tick of its
    # `ts` on that clock, never before it; the run ends at `start_ns` + duration.
    assert first_at == sim.start_ns + round(late * 1e9)
    assert first.max() <= first_at
    assert len(first) == sum(int((ts <= first_at).sum()) for _, ts in slices) > 2000
    for at, ts in slices[1:]:
        assert ts.max() <= at and at - ts.min() <= tick * 1e9 + 1
    assert max(ts.max() for _, ts in slices) <= sim.start_ns + 0.5e9
    assert_every_event_once_in_order([t for _, ts in slices for t in ts.tolist()])


async def test_a_slow_consumer_still_gets_one_slice_per_tick_not_back_to_back() -> None:
    now = [0.0]

    async def fake_sleep(seconds: float) -> None:
        now[0] += seconds

    sim = make_sim(rate=10_000)
    tick, work = 0.001, 0.0007  # each slice takes the consumer 0.7 ms to publish
    starts: list[float] = []
    released: list[int] = []
    async for chunk in paced_chunks(
        sim, duration=0.5, monotonic=lambda: now[0], sleep=fake_sleep, tick_s=tick
    ):
        due = (chunk.ts - sim.start_ns) / 1e9
        assert due.max() <= now[0], "an event went out before its time"
        assert now[0] - due.min() <= tick + work + 1e-9, "an event waited past the tick and work"
        starts.append(now[0])
        released += chunk.ts.tolist()
        now[0] += work
    assert min(np.diff(starts)) >= tick - 1e-9, "slices went out back to back"
    assert_every_event_once_in_order(released)


async def test_a_consumer_slower_than_a_tick_gets_the_next_slice_at_once() -> None:
    now = [0.0]
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    sim = make_sim(rate=10_000)
    sizes: list[int] = []
    async for chunk in paced_chunks(
        sim, duration=0.1, monotonic=lambda: now[0], sleep=fake_sleep, tick_s=0.001
    ):
        sizes.append(len(chunk))
        now[0] += 0.002  # publishing takes two ticks: never wait on top of that
    assert slept[1:] == [], "waited although the consumer was already late"
    assert sum(sizes) > 0.9 * 0.1 * 10_000


async def test_a_consumer_behind_by_several_chunks_gets_them_all_and_the_feed_goes_on() -> None:
    now = [0.0]

    async def fake_sleep(seconds: float) -> None:
        now[0] += seconds

    sim = make_sim(rate=300)  # 15-event chunks
    sizes: list[int] = []
    async for chunk in paced_chunks(
        sim, duration=3.0, monotonic=lambda: now[0], sleep=fake_sleep, tick_s=0.001
    ):
        sizes.append(len(chunk))
        now[0] += 0.2  # 60 events come due while it publishes one slice
    assert max(sizes) >= 2 * sim.chunk_size
    assert sum(sizes) > 0.9 * 3.0 * 300


async def test_paced_chunks_stop_at_count() -> None:
    sim = make_sim()
    sizes = [len(c) async for c in paced_chunks(sim, count=1234, throttle=False)]
    assert sum(sizes) == 1234


async def test_a_consumer_slower_than_the_rate_gets_bounded_slices_in_order() -> None:
    now = [0.0]

    async def fake_sleep(seconds: float) -> None:
        now[0] += seconds

    sim = make_sim(rate=1_000_000)  # 4096-event chunks, 100 000 events due per 0.1 s
    sizes: list[int] = []
    released: list[int] = []
    async for chunk in paced_chunks(
        sim, duration=0.5, monotonic=lambda: now[0], sleep=fake_sleep, tick_s=0.001
    ):
        sizes.append(len(chunk))
        released += chunk.ts.tolist()
        now[0] += 0.1
    assert max(sizes) <= MAX_SLICE_EVENTS
    assert len(sizes) >= 4
    again = make_sim(rate=1_000_000)
    expected = np.concatenate([again.next_chunk().ts for _ in range(len(released) // 4096 + 1)])
    assert released == expected[: len(released)].tolist()


async def test_unthrottled_chunks_are_encoded_ahead_in_batches_same_events() -> None:
    sim, again = make_sim(rate=1_000), make_sim(rate=1_000)  # 50-event chunks
    chunks = [c async for c in paced_chunks(sim, count=5_000, throttle=False)]
    # Whole chunks until ENCODE_AHEAD_EVENTS is reached, a second of them at most.
    size = min(1_000, -(-ENCODE_AHEAD_EVENTS // 50) * 50)
    assert [len(c) for c in chunks] == [size] * (5_000 // size) + (
        [5_000 % size] if 5_000 % size else []
    )
    assert all(c.encoded is not None for c in chunks)
    expected = np.concatenate([again.next_chunk().ts for _ in range(100)])
    assert np.concatenate([c.ts for c in chunks]).tolist() == expected.tolist()
