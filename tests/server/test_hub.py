"""The hub's groups of subscribers and its shortcut past the outbox, without sockets."""

from __future__ import annotations

import random
from itertools import pairwise
from typing import Any

import orjson
import pytest

from tests.server.test_outbox import Q, T, batch, seqs
from tickwire.bench.invariant import InvariantChecker
from tickwire.core.channels import Channel, ChannelPattern
from tickwire.core.stream import StreamPosition
from tickwire.server.batch import Batch
from tickwire.server.frames import text_frame
from tickwire.server.hub import Hub, Subscriber
from tickwire.server.outbox import Outbox

E = Channel.parse("trades:ETH-USD")


class Client:
    """A subscriber whose frames are kept: written at once (`fast`, a socket with room) or
    queued and flushed (the outbox path, as for a socket that is full)."""

    def __init__(self, hub: Hub, *patterns: str, fast: bool = True) -> None:
        self.frames: list[bytes] = []
        self.room = True  # whether `write_now` may write
        self.outbox = Outbox(1 << 20)
        self.sub = Subscriber(self.outbox, self.flush, write_now=self.write_now if fast else None)
        hub.attach(self.sub)
        hub.subscribe(self.sub, *(ChannelPattern.parse(p) for p in patterns))

    def write_now(self, message: bytes, wire: bytes) -> bool:
        assert wire == text_frame(message)
        if self.room:
            self.frames.append(message)
        return self.room

    def flush(self) -> None:
        if self.room:
            message = self.outbox.take()
            if message is not None:
                self.frames.append(message)

    def messages(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for frame in self.frames:
            doc = orjson.loads(frame)
            out += doc if isinstance(doc, list) else [doc]
        return out


def random_batches(
    rng: random.Random, channels: list[Channel], next_seq: dict[Channel, int], most: int
) -> list[Batch]:
    """Batches of 1 to `most` events on some of `channels`, each continuing `next_seq`."""
    batches: list[Batch] = []
    for channel in rng.sample(channels, rng.randint(1, len(channels))):
        n = rng.randint(1, most)
        batches.append(batch(channel, next_seq[channel], n))
        next_seq[channel] += n
    return batches


def assert_sharers_hold_their_groups_positions(
    hub: Hub, clients: list[Client], channels: list[Channel]
) -> None:
    for client in clients:
        if client.outbox.shared:
            (group,) = {g for c in channels for g in hub.groups_of(c) if client.sub in g.members}
            assert client.outbox.positions is group.positions


def test_subscribers_with_the_same_patterns_share_a_group_and_move_when_theirs_change() -> None:
    hub = Hub()
    a, b = Client(hub, "trades:BTC-USD", "quotes:*"), Client(hub, "quotes:*", "trades:BTC-USD")
    assert len(hub.groups_of(T)) == 1 and hub.subscriber_count(T) == 2
    hub.unsubscribe(b.sub, ChannelPattern.parse("trades:BTC-USD"))
    assert hub.subscriber_count(T) == 1 and hub.subscriber_count(Q) == 2
    assert not hub.follows(b.sub, T) and hub.follows(b.sub, Q) and hub.follows(a.sub, T)
    hub.known.update({T, Q, E})
    assert hub.live_channels() == {T, Q}
    hub.detach(a.sub)
    assert hub.subscriber_count(T) == 0 and hub.subscriber_count(Q) == 1
    hub.detach(b.sub)
    assert hub.live_channels() == set() and hub.groups_of(Q) == ()
    assert hub.subscriber_count(Q) == 0


def test_a_group_gets_the_same_bytes_by_the_shortcut_as_through_the_outbox() -> None:
    hub = Hub()
    fast = Client(hub, "trades:*", "quotes:BTC-USD")
    slow = Client(hub, "trades:*", "quotes:BTC-USD", fast=False)
    other = Client(hub, "trades:ETH-USD")  # another group, fed from the same dispatch
    hub.dispatch([batch(T, 1, 1), batch(Q, 1, 2), batch(E, 1, 1)])  # first events: positions
    for client in (fast, slow, other):
        client.frames.clear()
    deliveries = hub.dispatch([batch(T, 2, 3), batch(Q, 3, 1), batch(E, 2, 2)])
    assert deliveries == 2 * 6 + 2
    assert fast.frames == slow.frames and len(fast.frames) == 1
    assert [(m["ch"], [e["seq"] for e in m["events"]]) for m in fast.messages()] == [
        (T.name, [2, 3, 4]),
        (Q.name, [3]),
        (E.name, [2, 3]),
    ]
    assert fast.outbox.positions == slow.outbox.positions
    assert seqs(other.messages()) == [2, 3]


def test_a_client_out_of_step_or_without_room_takes_the_outbox_path() -> None:
    hub = Hub()
    a, b, c, d = (Client(hub, "trades:BTC-USD") for _ in range(4))
    hub.dispatch([batch(T, 1, 2)])
    for client in (a, b, c, d):
        client.frames.clear()
    b.outbox.control(b'{"type":"pong","id":1,"ts":0}')  # something queued already
    c.room = False  # its socket is full: nothing is written, the outbox keeps it
    d.outbox.expect(T, "e1", 0)  # behind: seqs 1-2 again would be duplicates
    assert a.outbox.positions[T] == ("e1", 2)  # d's positions are its own from here on
    hub.dispatch([batch(T, 3, 2)])
    assert seqs(a.messages()) == [3, 4]
    assert [m["type"] for m in b.messages()] == ["pong", "events"]
    assert c.frames == [] and c.outbox.positions[T] == ("e1", 4)
    c.room = True
    c.flush()
    assert seqs(c.messages()) == [3, 4]
    # The outbox saw 3 follow 0 and announced the hole: what the invariant asks for.
    assert [(m["type"], m.get("from_seq")) for m in d.messages()] == [("gap", 1), ("events", None)]


def test_members_in_step_share_their_positions_until_one_falls_out_of_step() -> None:
    hub = Hub()
    a, b, c = (Client(hub, "trades:*") for _ in range(3))
    hub.dispatch([batch(T, 1, 1), batch(E, 1, 1)])  # first events: nothing before is owed
    (group,) = hub.groups_of(T)
    assert all(x.outbox.shared and x.outbox.positions is group.positions for x in (a, b, c))
    hub.dispatch([batch(T, 2, 2)])
    assert group.positions == {T: ("e1", 3), E: ("e1", 1)}
    assert all(len(x.frames) == 2 for x in (a, b, c))
    c.room = False  # c leaves the shared dict, at where it stood before the batch it missed
    hub.dispatch([batch(E, 2, 1)])
    assert not c.outbox.shared and c.outbox.positions[E] == ("e1", 2)
    assert c.outbox.positions is not group.positions and len(c.frames) == 2
    c.room = True
    c.flush()
    hub.dispatch([batch(T, 4, 1)])  # in step again: c joins the others
    assert c.outbox.positions is group.positions and a.outbox.positions is group.positions
    hub.unsubscribe(b.sub, ChannelPattern.parse("trades:*"))
    hub.subscribe(b.sub, ChannelPattern.parse("trades:BTC-USD"))
    assert not b.outbox.shared and b.outbox.positions is not group.positions
    hub.dispatch([batch(T, 5, 1), batch(E, 3, 1)])
    assert group.positions == {T: ("e1", 5), E: ("e1", 3)}
    assert b.outbox.positions == {T: ("e1", 5), E: ("e1", 2)}  # E no longer reaches b
    for x in (a, b, c):
        checker = InvariantChecker()
        for message in x.messages():
            checker.feed(message)
        assert checker.ok and checker.gap_events == 0


def test_a_member_in_step_on_some_channels_only_keeps_its_own_positions() -> None:
    hub = Hub()
    a, b = Client(hub, "trades:*"), Client(hub, "trades:*")
    hub.dispatch([batch(T, 1, 1), batch(E, 1, 1)])
    b.outbox.expect(E, "e0", 5)  # b resumed E in an older epoch
    hub.dispatch([batch(T, 2, 1)])  # b is in step on T, but not on E
    assert a.outbox.shared and not b.outbox.shared
    hub.dispatch([batch(E, 2, 1)])
    assert [m["type"] for m in b.messages()][-2:] == ["reset", "events"]


def test_random_dispatches_with_clients_moving_between_groups_keep_the_invariant() -> None:
    """Subscribes, unsubscribes, resumes and full sockets between dispatches: a client that
    leaves a group, or whose positions change, must never move the others' shared positions."""
    rng = random.Random(11)
    channels = [T, Q, E]
    names = [c.name for c in channels]
    hub = Hub()
    clients = [Client(hub, *rng.sample(names, rng.randint(1, 3))) for _ in range(10)]
    followed = {id(c): set(hub.patterns_of(c.sub)) for c in clients}
    #: Per client and channel: subscriptions to it after the first (each may start a new run).
    again: dict[tuple[int, str], int] = {}
    next_seq = dict.fromkeys(channels, 1)
    for _ in range(300):
        for client in clients:
            client.room = rng.random() > 0.15
            if client.room:
                client.flush()
            roll = rng.random()
            if roll < 0.05:
                # Subscribe to one more channel: its first events start it, nothing is owed.
                name = rng.choice(names)
                if ChannelPattern.parse(name) not in hub.patterns_of(client.sub):
                    again[id(client), name] = again.get((id(client), name), 0) + 1
                hub.subscribe(client.sub, ChannelPattern.parse(name))
            elif roll < 0.08 and len(hub.patterns_of(client.sub)) > 1:
                gone = rng.choice(sorted(hub.patterns_of(client.sub), key=str))
                hub.unsubscribe(client.sub, gone)
                client.outbox.forget(gone.as_channel())
            followed[id(client)] = set(hub.patterns_of(client.sub))
        hub.dispatch(random_batches(rng, channels, next_seq, most=3))
        assert_sharers_hold_their_groups_positions(hub, clients, channels)
    for client in clients:
        client.room = True
        client.flush()
        # Per channel, what it got since it last started following it runs on without a hole.
        per_channel: dict[str, list[int]] = {}
        for m in client.messages():
            assert m["type"] == "events", m
            per_channel.setdefault(m["ch"], []).extend(e["seq"] for e in m["events"])
        for name, got in per_channel.items():
            assert got == sorted(set(got)), f"{name}: out of order or twice"
            jumps = sum(1 for a, b in pairwise(got) if b != a + 1)
            assert jumps <= again.get((id(client), name), 0), (name, got)
        for channel in channels:
            if ChannelPattern.parse(channel.name) in followed[id(client)]:
                assert per_channel[channel.name][-1] == next_seq[channel] - 1


def test_held_channels_and_a_channel_twice_in_one_dispatch_go_through_the_outbox() -> None:
    hub = Hub()
    a, b = Client(hub, "trades:BTC-USD"), Client(hub, "trades:BTC-USD")
    hub.dispatch([batch(T, 1, 1)])
    a.frames.clear()
    b.frames.clear()
    a.sub.hold_back(T)  # a catch-up is reading history for it
    hub.dispatch([batch(T, 2, 1), batch(T, 3, 2, epoch="e2")])  # split by a new epoch
    assert a.frames == [] and [len(h.events) for h in a.sub.holding[T]] == [1, 2]
    assert [m["type"] for m in b.messages()] == ["events", "reset", "events"]


def test_random_dispatches_keep_every_client_gapless_on_both_paths() -> None:
    rng = random.Random(7)
    channels = [T, Q, E]
    hub = Hub()
    clients = [
        Client(hub, *(c.name for c in rng.sample(channels, rng.randint(1, 3))), fast=i % 3 > 0)
        for i in range(12)
    ]
    next_seq = dict.fromkeys(channels, 1)
    for _ in range(200):
        for client in clients:
            client.room = rng.random() > 0.2
            if client.room:
                client.flush()  # a full socket drains later
        hub.dispatch(random_batches(rng, channels, next_seq, most=4))
        assert_sharers_hold_their_groups_positions(hub, clients, channels)
    for client in clients:
        client.room = True
        client.flush()
        checker = InvariantChecker()
        for message in client.messages():
            checker.feed(message)
        assert checker.ok, checker.violations
        assert checker.gap_events == 0
        followed = [c for c in channels if hub.follows(client.sub, c)]
        # Everything from its first event on each channel, and nothing of the others.
        got = {m["ch"] for m in client.messages()}
        assert got <= {c.name for c in followed}
        for c in followed:
            last = max(
                e["seq"] for m in client.messages() if m["ch"] == c.name for e in m["events"]
            )
            assert last == next_seq[c] - 1


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_new_epoch_is_announced_at_once_to_those_who_got_the_old_one() -> None:
    clock = _Clock()
    hub = Hub(clock)
    got, catching_up, idle = (Client(hub, "trades:BTC-USD") for _ in range(3))
    slow = Client(hub, "trades:*", fast=False)
    throttled = Client(hub)
    hub.subscribe(throttled.sub, ChannelPattern.parse("trades:BTC-USD"), max_hz=4)
    hub.dispatch([batch(T, 1, 5)])
    clock.now = 100.25
    hub.release_due()  # the throttled client gets 1..5 at its tick
    hub.dispatch([batch(T, 6, 3)])  # 6..8: the throttled client's wait for the next tick
    for c in (got, catching_up, idle, slow, throttled):
        c.frames.clear()
    idle.outbox.forget(T)  # as if it had never had an event of the channel
    catching_up.sub.hold_back(T)
    # Redis lost 6..8: the channel goes on in e2 after 5.
    assert hub.announce_epoch(T, StreamPosition("e2", 5)) == 3
    for c in (got, slow, throttled):
        assert [(m["type"], m["epoch"]) for m in c.messages()] == [("reset", "e2")]
    # Held back (its catch-up places it), or never given an event: no reset now.
    assert catching_up.frames == [] and idle.frames == []
    # What the throttle held of the old epoch never follows the reset.
    clock.now = 100.5
    hub.release_due()
    assert [m["type"] for m in throttled.messages()] == ["reset"]
    # The new epoch's events then continue the announced position: no second reset.
    hub.dispatch([batch(T, 6, 2, epoch="e2")])
    assert [m["type"] for m in got.messages()] == ["reset", "events"]
    assert [e["seq"] for e in got.messages()[1]["events"]] == [6, 7]
    # The same epoch again: nothing to say.
    assert hub.announce_epoch(T, StreamPosition("e2", 7)) == 0


class Broken(Client):
    """A client whose writes raise from the `n`th on: a stand-in for a bug in its connection."""

    def __init__(self, hub: Hub, *patterns: str, fast: bool = True, after: int = 0) -> None:
        super().__init__(hub, *patterns, fast=fast)
        self.writes_left = after
        self.errors: list[Exception] = []
        self.sub.on_error = self.errors.append

    def write_now(self, message: bytes, wire: bytes) -> bool:
        self._count()
        return super().write_now(message, wire)

    def flush(self) -> None:
        self._count()
        super().flush()

    def _count(self) -> None:
        self.writes_left -= 1
        if self.writes_left < 0:
            raise TypeError("a bug in one connection")


def test_a_subscriber_whose_delivery_raises_is_let_go_and_the_others_get_theirs() -> None:
    hub = Hub()
    # Each way a delivery can go: the shared shortcut, the outbox, a control broadcast.
    before = Client(hub, "trades:*")
    fast = Broken(hub, "trades:*", after=1)
    slow = Broken(hub, "trades:*", fast=False, after=1)
    after = Client(hub, "trades:*", fast=False)
    control = Broken(hub, "quotes:*", after=1)
    hub.dispatch([batch(T, 1, 2)])  # the first write of each goes through
    hub.dispatch([batch(T, 3, 2), batch(Q, 1, 1)])
    for broken in (fast, slow):
        assert [str(e) for e in broken.errors] == ["a bug in one connection"]
        assert broken.sub not in hub.subscribers and not hub.patterns_of(broken.sub)
    for client in (before, after):
        assert seqs(client.messages()) == [1, 2, 3, 4]
    hub.dispatch([batch(T, 5, 1)])  # the detached ones are not asked again
    assert seqs(before.messages())[-1] == seqs(after.messages())[-1] == 5
    assert len(fast.errors) == len(slow.errors) == 1
    assert control.errors == []
    hub.broadcast_control(b'{"type":"status","redis":"down"}')
    assert len(control.errors) == 1 and control.sub not in hub.subscribers
    assert before.messages()[-1]["type"] == after.messages()[-1]["type"] == "status"


def test_without_on_error_a_delivery_that_raises_propagates() -> None:
    hub = Hub()
    broken = Broken(hub, "trades:*")
    broken.sub.on_error = None
    with pytest.raises(TypeError, match="a bug"):
        hub.dispatch([batch(T, 1, 1)])
