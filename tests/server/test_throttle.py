"""The per-subscription throttle (`max_hz`): its state machine on an injected clock, its place in
the hub's groups, the outbox's accounting of skipped seqs, and the request's validation."""

from __future__ import annotations

import itertools
import random
from collections import defaultdict
from typing import Any

import orjson
import pytest

from tests.server.test_hub import Client
from tests.server.test_outbox import Q, T, batch, drain, seqs
from tickwire.bench.invariant import InvariantChecker
from tickwire.core.channels import Channel, ChannelPattern
from tickwire.core.config import Limits
from tickwire.core.errors import ProtocolError
from tickwire.server.batch import Batch
from tickwire.server.hub import Hub
from tickwire.server.outbox import Outbox
from tickwire.server.session import ClientSession, Rejected, Subscribe
from tickwire.server.throttle import MAX_HZ, MIN_HZ, Throttle, parse_max_hz

QUOTES = ChannelPattern.parse("quotes:*")
TRADES = ChannelPattern.parse("trades:*")
Q2 = Channel.parse("quotes:ETH-USD")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def events_of(batches: list[Batch]) -> list[dict[str, Any]]:
    return [orjson.loads(b.frame) for b in batches]


# -- the state machine -------------------------------------------------------------------------
def test_max_hz_bounds() -> None:
    assert parse_max_hz(None) is None
    assert parse_max_hz(4) == 4.0 and parse_max_hz(MIN_HZ) == MIN_HZ
    assert parse_max_hz(MAX_HZ) == MAX_HZ
    for bad in (0, -1, MIN_HZ / 2, MAX_HZ + 1, True, "4", float("nan"), float("inf"), [4]):
        with pytest.raises(ProtocolError) as info:
            parse_max_hz(bad)
        assert info.value.code == "bad_request" and "max_hz" in info.value.message


def test_quotes_wait_for_the_next_tick_and_go_as_the_latest_saying_what_it_skipped() -> None:
    t = Throttle(frozenset({QUOTES}), {QUOTES: 4.0})
    # Ticks at whole multiples of 1/4 s: what comes at 10.1 waits for 10.25.
    assert t.offer([batch(Q, 1, 3)], 10.1) == []
    assert t.offer([batch(Q, 4, 1)], 10.2) == []
    assert t.next_due() == 10.25
    assert t.due(10.2) == []  # not yet
    (latest,) = t.due(10.25)
    assert (latest.start, latest.first_seq, latest.skipped) == (1, 4, 3)
    assert orjson.loads(latest.frame)["skipped"] == 3
    assert orjson.loads(latest.frame)["events"][0]["seq"] == 4
    assert t.next_due() is None and t.due(11.0) == []
    # Right on a tick: the next one. A lone update goes as it is (it skips nothing).
    assert t.offer([batch(Q, 5, 1)], 10.5) == []
    assert t.next_due() == 10.75
    (alone,) = t.due(10.75)
    assert alone.skipped == 0 and b'"skipped"' not in alone.frame


def test_a_timer_that_fires_a_little_early_does_not_send_twice_in_one_tick() -> None:
    t = Throttle(frozenset({QUOTES}), {QUOTES: 4.0})
    t.offer([batch(Q, 1, 1)], 10.1)
    assert len(t.due(10.2495)) == 1  # within the timers' slack of 10.25: due
    t.offer([batch(Q, 2, 1)], 10.2497)  # still before 10.25: waits for 10.5, not 10.25
    assert t.next_due() == 10.5


def test_trades_are_held_and_go_together_in_order_never_dropped() -> None:
    t = Throttle(frozenset({TRADES}), {TRADES: 2.0})
    for i, at in enumerate((0.0, 0.1, 0.2, 0.3, 0.4)):
        assert t.offer([batch(T, 1 + 2 * i, 2)], at) == []
    (together,) = t.due(0.5)
    assert (together.first_seq, together.last_seq, together.skipped) == (1, 10, 0)
    assert seqs(events_of([together])) == list(range(1, 11))


def test_a_new_epoch_or_a_hole_splits_what_waited() -> None:
    t = Throttle(frozenset({TRADES, QUOTES}), {TRADES: 1.0, QUOTES: 1.0})
    t.offer([batch(T, 2, 2), batch(Q, 2, 3)], 0.1)
    t.offer([batch(T, 6, 1), batch(Q, 1, 2, epoch="e2"), batch(T, 1, 1, epoch="e2")], 0.2)
    out = t.due(1.0)
    got = sorted((b.channel.kind, b.epoch, b.first_seq, b.last_seq, b.skipped) for b in out)
    assert got == [
        ("quotes", "e1", 4, 4, 2),
        ("quotes", "e2", 2, 2, 1),
        ("trades", "e1", 2, 3, 0),
        ("trades", "e1", 6, 6, 0),  # after a hole (a catch-up read's): its own batch
        ("trades", "e2", 1, 1, 0),
    ]


def test_a_channel_gets_the_fastest_rate_of_its_patterns_or_none() -> None:
    exact = ChannelPattern.parse("quotes:BTC-USD")
    t = Throttle(frozenset({QUOTES, exact}), {QUOTES: 2.0, exact: 8.0})
    assert t.interval_of(Q) == 1 / 8 and t.interval_of(Q2) == 1 / 2
    live = Throttle(frozenset({QUOTES, exact}), {QUOTES: 2.0})
    assert live.interval_of(Q) is None and live.interval_of(Q2) == 1 / 2
    assert live.offer([batch(Q, 1, 5)], 0.0)[0].skipped == 0  # unthrottled: as it came


def test_random_offers_send_at_most_max_hz_the_latest_and_every_trade() -> None:
    rng = random.Random(5)
    hz = 4.0
    t = Throttle(frozenset({QUOTES, TRADES}), {QUOTES: hz, TRADES: hz})
    channels = [Q, Q2, T]
    next_seq = dict.fromkeys(channels, 1)
    sent_at: dict[Channel, list[float]] = defaultdict(list)
    out: list[Batch] = []
    now = 0.0
    for _ in range(2000):
        now += rng.choice((0.001, 0.01, 0.05, 0.3))
        for b in t.due(now):
            sent_at[b.channel].append(now)
            out.append(b)
        offered = []
        for ch in rng.sample(channels, rng.randint(1, 3)):
            n = rng.randint(1, 4)
            offered.append(batch(ch, next_seq[ch], n))
            next_seq[ch] += n
        for b in t.offer(offered, now):
            sent_at[b.channel].append(now)
            out.append(b)
    for b in t.due(now + 10):
        out.append(b)
    checker = InvariantChecker()
    for b in out:
        checker.feed(orjson.loads(b.frame))
    assert checker.ok, checker.violations[:5]
    for ch, times in sent_at.items():
        # At most one message per tick: over any stretch no more than max_hz a second (plus
        # the tick it started in), however late `due` was asked.
        for i, j in itertools.combinations(range(0, len(times), 7), 2):
            assert j - i <= (times[j] - times[i]) * hz + 1, ch
    # Every trade, in order; the quotes end on their latest.
    assert seqs([orjson.loads(b.frame) for b in out if b.channel == T]) == list(
        range(1, next_seq[T])
    )
    for ch in (Q, Q2):
        assert [b for b in out if b.channel == ch][-1].last_seq == next_seq[ch] - 1
    assert checker.skipped > 0


# -- in the hub --------------------------------------------------------------------------------
def throttled_client(hub: Hub, *patterns: str, max_hz: float | None, fast: bool = True) -> Client:
    client = Client(hub, fast=fast)
    hub.subscribe(client.sub, *(ChannelPattern.parse(p) for p in patterns), max_hz=max_hz)
    return client


def test_clients_of_one_rate_share_a_group_and_one_throttle() -> None:
    clock = Clock()  # 100.0
    hub = Hub(clock)
    wakes: list[float] = []
    hub.on_wake = wakes.append
    a, b = (throttled_client(hub, "quotes:*", max_hz=4) for _ in range(2))
    live = throttled_client(hub, "quotes:*", max_hz=None)
    other = throttled_client(hub, "quotes:*", max_hz=2)
    assert len(hub.groups_of(Q)) == 3
    for c in (a, b, live, other):
        c.outbox.expect(Q, "e1", 0)
    hub.dispatch([batch(Q, 1, 1)])
    hub.dispatch([batch(Q, 2, 1)])
    hub.dispatch([batch(Q, 3, 2)])
    assert wakes[-1] == 100.25 and len(wakes) <= 2  # the earliest tick, named once
    assert seqs(live.messages()) == [1, 2, 3, 4]
    assert a.frames == b.frames == other.frames == []
    clock.now = 100.25
    hub.release_due()
    assert wakes[-1] == 100.5  # the 2 Hz group's tick is next
    assert seqs(a.messages()) == [4] and a.frames == b.frames  # the same bytes for both
    assert a.messages()[-1]["skipped"] == 3
    clock.now = 100.5
    hub.release_due()
    assert seqs(other.messages()) == [4]
    for c in (a, b, live, other):
        checker = InvariantChecker()
        checker.expect_from(Q.name, "e1", 0)
        for m in c.messages():
            checker.feed(m)
        assert checker.ok, checker.violations


def test_every_channel_of_a_group_goes_at_the_same_tick_in_one_frame() -> None:
    clock = Clock()
    hub = Hub(clock)
    c = throttled_client(hub, "quotes:*", "trades:*", max_hz=4)
    for ch in (Q, Q2, T):
        c.outbox.expect(ch, "e1", 0)
    for i, ch in enumerate((Q, Q2, T)):
        clock.now = 100.01 + 0.05 * i
        hub.dispatch([batch(ch, 1, 3)])
    clock.now = 100.25
    hub.release_due()
    (frame,) = c.frames
    assert sorted(m["ch"] for m in orjson.loads(frame)) == sorted(ch.name for ch in (Q, Q2, T))


def test_a_client_leaving_a_throttled_group_gets_the_trades_that_waited() -> None:
    clock = Clock()
    hub = Hub(clock)
    c = throttled_client(hub, "trades:*", max_hz=1)
    c.outbox.expect(T, "e1", 0)
    hub.dispatch([batch(T, 1, 1)])
    hub.dispatch([batch(T, 2, 3)])  # waits for 101.0
    assert c.frames == []
    hub.subscribe(c.sub, QUOTES)  # another group now: what waited comes at once
    assert seqs(c.messages()) == [1, 2, 3, 4]
    hub.dispatch([batch(T, 5, 1)])  # the new group's throttle: the next tick
    clock.now = 101.0
    hub.release_due()
    assert seqs(c.messages()) == [1, 2, 3, 4, 5]


def test_random_dispatches_to_throttled_clients_on_both_paths_keep_the_invariant() -> None:
    rng = random.Random(19)
    clock = Clock()
    hub = Hub(clock)
    deadline: list[float] = []
    hub.on_wake = deadline.append
    clients = [
        throttled_client(hub, "quotes:*", "trades:*", max_hz=rng.choice((2, 4, None)), fast=fast)
        for fast in (True, True, False, True, False, True)
    ]
    channels = [Q, Q2, T]
    next_seq = dict.fromkeys(channels, 1)
    for c in clients:
        for ch in channels:
            c.outbox.expect(ch, "e1", 0)
    for _ in range(600):
        clock.now += rng.choice((0.002, 0.02, 0.1))
        if deadline and deadline[-1] <= clock.now:
            deadline.clear()
            hub.release_due()
        for c in clients:
            c.room = rng.random() > 0.2
            if c.room:
                c.flush()
        batches = []
        for ch in rng.sample(channels, rng.randint(1, 3)):
            n = rng.randint(1, 3)
            batches.append(batch(ch, next_seq[ch], n))
            next_seq[ch] += n
        hub.dispatch(batches)
    clock.now += 10
    hub.release_due()
    skipped = 0
    for c in clients:
        c.room = True
        c.flush()
        checker = InvariantChecker()
        for ch in channels:
            checker.expect_from(ch.name, "e1", 0)
        for m in c.messages():
            checker.feed(m)
        assert checker.ok, checker.violations[:5]
        assert seqs([m for m in c.messages() if m.get("ch") == T.name]) == list(
            range(1, next_seq[T])
        )
        for ch in (Q, Q2):
            assert seqs([m for m in c.messages() if m.get("ch") == ch.name])[-1] == next_seq[ch] - 1
        skipped += checker.skipped
    assert skipped > 0


# -- the outbox's accounting -------------------------------------------------------------------
def test_the_outbox_counts_skipped_seqs_from_where_its_client_stands() -> None:
    latest = batch(Q, 9, 1).with_skipped(3)  # supersedes 6..8
    behind = Outbox(1 << 20)
    behind.expect(Q, "e1", 2)
    assert behind.add(latest)
    (m,) = drain(behind)
    assert m["skipped"] == 6 and seqs([m]) == [9]
    level = Outbox(1 << 20)
    level.expect(Q, "e1", 8)
    assert level.add(latest)
    assert "skipped" not in drain(level)[0]
    new = Outbox(1 << 20)  # no position: nothing owed, nothing skipped
    assert new.add(latest)
    assert "skipped" not in drain(new)[0]
    other_epoch = Outbox(1 << 20)
    other_epoch.expect(Q, "e0", 50)
    assert other_epoch.add(latest)
    reset, events = drain(other_epoch)
    assert reset["type"] == "reset" and "skipped" not in events
    ahead = Outbox(1 << 20)
    ahead.expect(Q, "e1", 9)
    assert not ahead.add(latest)


def test_a_shed_outbox_with_skipped_batches_keeps_the_invariant() -> None:
    box = Outbox(100)
    box.expect(Q, "e1", 0)
    box.add(batch(Q, 3, 1).with_skipped(2))
    box.add(batch(Q, 6, 1).with_skipped(2))
    box.add(batch(Q, 9, 1).with_skipped(2))
    box.shed()
    out = drain(box)
    checker = InvariantChecker()
    checker.expect_from(Q.name, "e1", 0)
    for m in out:
        checker.feed(m)
    assert checker.ok, checker.violations
    assert seqs(out) == [9]
    alone = Outbox(100)
    alone.expect(Q, "e1", 0)
    alone.add(batch(Q, 3, 1).with_skipped(2))
    alone.shed()
    (m,) = drain(alone)
    assert m["skipped"] == 2


# -- the request -------------------------------------------------------------------------------
def test_a_pattern_keeps_its_rate_until_unsubscribed() -> None:
    s = ClientSession(Limits())

    def subscribe(**doc: Any) -> object:
        return s.receive(orjson.dumps({"op": "subscribe", "channels": ["quotes:*"], **doc}), 0.0)

    bad = subscribe(max_hz=0)
    assert isinstance(bad, Rejected) and bad.code == "bad_request" and b"max_hz" in bad.message
    first = subscribe(max_hz=4)
    assert isinstance(first, Subscribe) and first.max_hz == 4.0 and first.added == (QUOTES,)
    again = subscribe(max_hz=4.0)
    assert isinstance(again, Subscribe) and again.added == ()
    for other in ({"max_hz": 5}, {}):
        refused = subscribe(**other)
        assert isinstance(refused, Rejected) and refused.code == "bad_request"
        assert b"already subscribed with other max_hz" in refused.message
    s.receive(b'{"op":"unsubscribe","channels":["quotes:*"]}', 0.0)
    live = subscribe()
    assert isinstance(live, Subscribe) and live.added == (QUOTES,) and live.max_hz is None


def test_clients_moving_between_throttled_groups_get_every_trade_once_in_order() -> None:
    """A client whose other subscriptions come and go moves between groups (and throttles):
    the trades its old group's throttle held come with the move, none twice, none lost."""
    rng = random.Random(23)
    clock = Clock()
    hub = Hub(clock)
    deadline: list[float] = []
    hub.on_wake = deadline.append
    clients = [
        throttled_client(hub, T.name, max_hz=rng.choice((2, 4)), fast=rng.random() < 0.7)
        for _ in range(8)
    ]
    for c in clients:
        c.outbox.expect(T, "e1", 0)
    channels = [T, Q, Q2]
    next_seq = dict.fromkeys(channels, 1)
    for _ in range(500):
        clock.now += rng.choice((0.003, 0.03, 0.12))
        if deadline and deadline[-1] <= clock.now:
            deadline.clear()
            hub.release_due()
        for c in clients:
            c.room = rng.random() > 0.2
            if c.room:
                c.flush()
            if rng.random() < 0.05:
                other = rng.choice((QUOTES, ChannelPattern.parse(Q2.name)))
                if other in hub.patterns_of(c.sub):
                    hub.unsubscribe(c.sub, other)
                    for ch in (Q, Q2):
                        if not hub.follows(c.sub, ch):
                            c.outbox.forget(ch)
                else:
                    hub.subscribe(c.sub, other, max_hz=rng.choice((1, 4, None)))
        batches = []
        for ch in rng.sample(channels, rng.randint(1, 3)):
            n = rng.randint(1, 3)
            batches.append(batch(ch, next_seq[ch], n))
            next_seq[ch] += n
        hub.dispatch(batches)
    clock.now += 10
    hub.release_due()
    for c in clients:
        c.room = True
        c.flush()
        assert seqs([m for m in c.messages() if m.get("ch") == T.name]) == list(
            range(1, next_seq[T])
        )
        for ch in (Q, Q2):
            got = seqs([m for m in c.messages() if m.get("ch") == ch.name])
            assert got == sorted(set(got)), ch
