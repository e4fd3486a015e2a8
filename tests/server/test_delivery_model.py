"""Stateful model test of one client's sans-I/O delivery path: reader → Outbox → frames → client.

The model keeps, per channel, a stream (epoch, dense seqs, a retained window that trimming moves)
and the reader's position in it. Rules publish, trim, change epochs, hand the outbox batches
(overlapping what it already has, or re-sending old ones, as resume + hold does), shed when over
the limit, unsubscribe/subscribe, and drop the connection and resume on a new outbox through
catch-up's `_start`. After every `take()` the client side checks protocol v1's invariant with
`InvariantChecker`, and the model checks that everything handed to the outbox after the client's
subscription point reached the client exactly once or inside an announced gap / after a reset.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import hypothesis
import orjson
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from tickwire.bench.invariant import InvariantChecker
from tickwire.core.channels import Channel
from tickwire.core.events import encode_body
from tickwire.core.stream import StreamPosition, complete_body
from tickwire.server.batch import Batch
from tickwire.server.catchup import _start
from tickwire.server.hub import Subscriber
from tickwire.server.outbox import Outbox

CHANNELS = (
    Channel.parse("trades:BTC-USD"),
    Channel.parse("quotes:BTC-USD"),
    Channel.parse("quotes:ETH-USD"),
)
FIELDS: dict[str, dict[str, object]] = {
    "trades": {"price": 1.5, "size": 1, "side": "buy", "trade_id": 7},
    "quotes": {"bid": 1.5, "bid_size": 1, "ask": 1.75, "ask_size": 2},
}
#: Reasons a gap may carry for a channel kind (slow-consumer policy differs per kind).
REASONS = {
    "trades": {"trimmed", "resume_limit", "slow_consumer"},
    "quotes": {"trimmed", "resume_limit", "conflated"},
}
channels = st.sampled_from(CHANNELS)
limits = st.sampled_from([300, 800, 2000, 1 << 20])


@functools.cache
def body(channel: Channel, seq: int) -> bytes:
    # ts = seq, so a delivered event shows which stored event it is.
    return encode_body(channel.event_type, channel.symbol, seq, 0, FIELDS[channel.kind])


def event(channel: Channel, epoch: str, seq: int) -> bytes:
    return complete_body(body(channel, seq), epoch, seq)


def make_batch(channel: Channel, epoch: str, lo: int, hi: int) -> Batch:
    return Batch(channel, epoch, lo, [event(channel, epoch, s) for s in range(lo, hi + 1)])


@dataclass
class Stream:
    """One channel's stream in Redis: an epoch, dense seqs `base..last`, events `first..last` kept."""

    epoch: str
    base: int = 1
    first: int = 1
    last: int = 0
    epochs: int = 1
    #: The reader's position: (epoch, last seq it read and dispatched).
    read: tuple[str, int] = ("", 0)

    def meta(self) -> tuple[str, int, int] | None:
        """What `History.metas` answers: None for a channel never published."""
        if self.epochs == 1 and self.last == 0:
            return None
        return (self.epoch, self.last, self.base)


@dataclass
class View:
    """What the client knows of one channel it follows (its resume point is `epoch`, `last`)."""

    checker: InvariantChecker = field(default_factory=InvariantChecker)
    epoch: str | None = None
    last: int | None = None
    #: Accounting for the current epoch: seqs `seg_start+1 .. last` are delivered or gapped.
    seg_start: int | None = None
    delivered: int = 0
    gapped: int = 0
    #: The previous message of this channel, as (type, reason, to_seq) for gaps.
    previous: tuple[str, str, int] = ("", "", 0)

    def expect_from(self, name: str, epoch: str, last: int) -> None:
        self.checker.expect_from(name, epoch, last)
        self.epoch, self.last, self.seg_start = epoch, last, last
        self.delivered = self.gapped = 0


class DeliveryModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.streams = {c: Stream(epoch=f"{c.symbol}.{c.kind}.e1") for c in CHANNELS}
        self.views: dict[Channel, View] = {}
        self.outbox = Outbox(1 << 20)
        self.sub = Subscriber(self.outbox, lambda: None)
        #: Where the outbox must say each channel stands (what was handed to it, or declared).
        self.pos: dict[Channel, tuple[str, int]] = {}
        #: Seqs handed to the current outbox as new, per (channel, epoch).
        self.handed: dict[tuple[Channel, str], set[int]] = {}
        self.next_pong = 0
        self.pongs_expected: list[int] = []
        #: The socket cannot take more: the outbox accumulates and sheds past its limit.
        self.blocked = False
        self.max_events = 100_000

    # -- helpers -------------------------------------------------------------------------------
    def _check_positions(self) -> None:
        assert self.outbox.positions == self.pos

    def _flush(self) -> None:
        """What the connection's `flush()` does after queueing: while the socket is full, apply
        the slow-consumer policy once over the limit (otherwise `take` writes, at random points)."""
        if self.blocked and self.outbox.over_limit:
            hypothesis.event("shed")
            self.outbox.shed()
            self._check_positions()  # shedding changes what is sent, not where the client stands

    def _add(self, batch: Batch) -> None:
        """Hand the outbox a batch; the model says what it must make of it."""
        ch = batch.channel
        cur = self.pos.get(ch)
        if cur is None or cur[0] != batch.epoch:
            new_from = batch.first_seq
            self.pos[ch] = (batch.epoch, batch.last_seq)
        else:
            new_from = max(batch.first_seq, cur[1] + 1)
            self.pos[ch] = (cur[0], max(cur[1], batch.last_seq))
        added = self.outbox.add(batch)
        assert added == (new_from <= batch.last_seq), (batch, cur)
        self.handed.setdefault((ch, batch.epoch), set()).update(range(new_from, batch.last_seq + 1))
        self._check_positions()

    def _dispatch(self, ch: Channel, overlap: int, chunk: int) -> None:
        """The reader reads what it has not read yet (from the retained window) and fans it out."""
        s = self.streams[ch]
        lo = s.first if s.read[0] != s.epoch else max(s.first, s.read[1] + 1)
        if lo > s.last:
            return
        s.read = (s.epoch, s.last)
        if ch not in self.views:
            return
        # Some older events come along, as when held live batches overlap a history replay.
        lo = max(s.base, lo - overlap)
        for first in range(lo, s.last + 1, chunk):
            self._add(make_batch(ch, s.epoch, first, min(first + chunk - 1, s.last)))
        self._flush()

    def _replay(self, ch: Channel, after: int, page: int) -> None:
        """Catch-up: history pages after `after`, from what Redis still keeps."""
        s = self.streams[ch]
        for first in range(max(after + 1, s.first), s.last + 1, page):
            self._add(make_batch(ch, s.epoch, first, min(first + page - 1, s.last)))
            self._flush()

    def _follow(self, ch: Channel, resume: StreamPosition | None, snapshot: bool) -> int | None:
        """Subscribe `ch` on the current outbox; returns the replay start, None when live only."""
        if resume is None and not snapshot:
            return None
        s = self.streams[ch]
        after = _start(self.sub, ch, resume, s.meta(), self.max_events)
        declared = self.outbox.positions.get(ch)
        if declared is not None:
            self.pos[ch] = declared
        self._check_positions()
        if resume is None and declared is not None:
            # A snapshot: the client gets the latest event, then what follows it.
            assert declared == (s.epoch, max(s.last - 1, s.base - 1))
            self.views[ch].expect_from(ch.name, *declared)
        return after

    def _feed(self, ch: Channel, m: dict[str, Any]) -> None:
        view = self.views.get(ch)
        assert view is not None, f"{m} for a channel the client does not follow"
        view.checker.feed(m)
        kind = m["type"]
        flag = " conflated" if m.get("conflated") else ""
        hypothesis.event(f"{ch.kind}: {kind} {m.get('reason', '')}{flag}")
        if kind == "reset":
            view.epoch, view.last, view.seg_start = m["epoch"], None, None
            view.delivered = view.gapped = 0
            view.previous = ("reset", "", 0)
            return
        if kind == "gap":
            a, b, reason = m["from_seq"], m["to_seq"], m["reason"]
            assert a <= b, m
            assert reason in REASONS[ch.kind], m
            if reason in {"trimmed", "resume_limit"} and view.epoch is not None:
                # Only events this outbox never had may be announced as missing from Redis.
                lost = self.handed.get((ch, view.epoch), set()) & set(range(a, b + 1))
                assert not lost, f"{m} covers events the outbox was given: {sorted(lost)}"
            if view.last is None:
                view.seg_start = a - 1
            view.last = b
            view.gapped += b - a + 1
            view.previous = ("gap", reason, b)
        else:
            assert kind == "events", m
            epoch, events = m["epoch"], m["events"]
            assert events, m
            first = events[0]["seq"]
            for i, ev in enumerate(events):
                assert ev["seq"] == first + i, f"not consecutive: {m}"
                assert (ev["epoch"], ev["sym"], ev["ts"]) == (epoch, ch.symbol, ev["seq"]), ev
                assert ev["type"] == ch.event_type, ev
            if m.get("conflated"):
                assert ch.kind != "trades", m
                assert len(events) == 1, m
                assert view.previous == ("gap", "conflated", first - 1), (
                    f"conflated frame {ch.name} seq {first} not preceded by its conflated gap "
                    f"(previous message: {view.previous})"
                )
            if view.epoch is None:
                view.epoch = epoch  # gaps carry no epoch: the first events tell it
            if view.last is None or view.seg_start is None:
                view.seg_start = first - 1
            view.last = events[-1]["seq"]
            view.delivered += len(events)
            view.previous = ("events", "", view.last)

    # -- setup ---------------------------------------------------------------------------------
    @initialize(
        limit=limits,
        max_events=st.sampled_from([2, 5, 100_000]),
        history=st.lists(st.tuples(st.integers(0, 15), st.integers(0, 15)), min_size=3, max_size=3),
        modes=st.lists(st.sampled_from(["live", "snapshot", "none"]), min_size=3, max_size=3),
        blocked=st.booleans(),
    )
    def setup(
        self,
        limit: int,
        max_events: int,
        history: list[tuple[int, int]],
        modes: list[str],
        blocked: bool,
    ) -> None:
        self.max_events = max_events
        self.blocked = blocked
        self.outbox = Outbox(limit)
        self.sub = Subscriber(self.outbox, lambda: None)
        for ch, (n, trimmed), mode in zip(CHANNELS, history, modes, strict=True):
            s = self.streams[ch]
            s.last = n
            s.first = min(1 + trimmed, n + 1)
            s.read = (s.epoch, n)
            if mode == "none":
                continue
            self.views[ch] = View()
            after = self._follow(ch, None, mode == "snapshot")
            if after is not None:
                self._replay(ch, after, 4)

    # -- the stream and the reader -------------------------------------------------------------
    @rule(
        ch=channels,
        n=st.integers(0, 12),
        deliver=st.booleans(),
        overlap=st.sampled_from([0, 0, 0, 1, 3, 8]),
        chunk=st.integers(1, 6),
    )
    def publish(self, ch: Channel, n: int, deliver: bool, overlap: int, chunk: int) -> None:
        """n events appended; the reader dispatches them now, or later (it lags)."""
        self.streams[ch].last += n
        if deliver:
            self._dispatch(ch, overlap, chunk)

    @rule(ch=channels, k=st.integers(1, 12))
    def trim(self, ch: Channel, k: int) -> None:
        """Redis trims the oldest events: a lagging reader's next batch starts later (a gap)."""
        s = self.streams[ch]
        s.first = min(s.first + k, s.last + 1)

    @rule(ch=channels, restart=st.booleans())
    def new_epoch(self, ch: Channel, restart: bool) -> None:
        """The stream is lost and recreated: seqs restart at 1, or continue after the old last."""
        s = self.streams[ch]
        s.epochs += 1
        s.epoch = f"{ch.symbol}.{ch.kind}.e{s.epochs}"
        s.base = 1 if restart else s.last + 1
        s.first, s.last = s.base, s.base - 1

    @precondition(lambda self: self.pos)
    @rule(data=st.data(), back=st.integers(0, 10), length=st.integers(1, 10))
    def resend(self, data: st.DataObject, back: int, length: int) -> None:
        """A batch of events the outbox already has (a held batch after the replay passed it)."""
        ch = data.draw(st.sampled_from(sorted(self.pos, key=lambda c: c.name)))
        epoch, seq = self.pos[ch]
        base = self.streams[ch].base if epoch == self.streams[ch].epoch else 1
        lo = max(base, seq - back)
        hi = min(seq, lo + length - 1)
        if lo <= hi:
            self._add(make_batch(ch, epoch, lo, hi))
            self._flush()

    # -- the connection ------------------------------------------------------------------------
    @rule()
    def control(self) -> None:
        self.outbox.control(b'{"type":"pong","id":%d}' % self.next_pong)
        self.pongs_expected.append(self.next_pong)
        self.next_pong += 1
        self._flush()

    @rule()
    def block(self) -> None:
        """The client stops reading: the socket fills up (until the next `take`)."""
        self.blocked = True
        self._flush()

    @rule()
    def take(self) -> None:
        """The socket takes data again: everything queued goes as one frame."""
        self.blocked = False
        frame = self.outbox.take()
        assert not self.outbox and self.outbox.nbytes == 0
        if frame is not None:
            doc = orjson.loads(frame)
            messages = doc if isinstance(doc, list) else [doc]
            assert messages
            if isinstance(doc, list):
                assert len(messages) > 1, "a one-message array"
            seen_channel_message = False
            for m in messages:
                if m["type"] == "pong":
                    assert not seen_channel_message, "control messages go first"
                    assert self.pongs_expected and m["id"] == self.pongs_expected.pop(0), m
                    continue
                seen_channel_message = True
                self._feed(Channel.parse(m["ch"]), m)
        assert not self.pongs_expected, f"pongs lost: {self.pongs_expected}"
        self._check_after_take()

    def _check_after_take(self) -> None:
        for ch, view in self.views.items():
            t = view.checker
            assert t.ok, (ch.name, t.violations)
            assert t.duplicates == 0 and t.lost == 0
            if view.last is not None and view.seg_start is not None:
                # Every seq since the subscription point (or the last reset) is accounted for.
                span = view.last - view.seg_start
                assert view.delivered + view.gapped == span, (ch, view)
                if t.resets == 0:
                    assert t.delivered + t.gap_events == span, (ch, view)
            # Nothing is left queued: everything handed to this outbox (and every position it
            # declared) has reached the client, delivered or announced.
            pos = self.pos.get(ch)
            if pos is None:
                continue
            # (A client that so far saw only gaps, which carry no epoch, does not know it.)
            assert view.epoch in {None, pos[0]}, (ch.name, view.epoch, pos)
            if view.last is None:
                assert view.previous[0] == "reset", (ch.name, view, pos)
            else:
                assert view.last == pos[1], (ch.name, view.last, pos)

    @precondition(lambda self: any(c not in self.views for c in CHANNELS))
    @rule(data=st.data(), snapshot=st.booleans())
    def subscribe(self, data: st.DataObject, snapshot: bool) -> None:
        ch = data.draw(st.sampled_from([c for c in CHANNELS if c not in self.views]))
        self.views[ch] = View()
        after = self._follow(ch, None, snapshot)
        if after is not None:
            self._replay(ch, after, 3)

    @precondition(lambda self: self.views)
    @rule(data=st.data())
    def unsubscribe(self, data: st.DataObject) -> None:
        ch = data.draw(st.sampled_from([c for c in CHANNELS if c in self.views]))
        self.outbox.forget(ch)
        del self.views[ch]
        self.pos.pop(ch, None)
        self.handed = {k: v for k, v in self.handed.items() if k[0] != ch}
        self._check_positions()
        if not self.outbox:
            assert self.outbox.nbytes == 0

    @rule(
        limit=limits,
        max_events=st.sampled_from([2, 5, 100_000]),
        snapshot=st.booleans(),
        page=st.integers(1, 7),
        overlap=st.sampled_from([0, 2, 10]),
        blocked=st.booleans(),
    )
    def reconnect(
        self, limit: int, max_events: int, snapshot: bool, page: int, overlap: int, blocked: bool
    ) -> None:
        """The connection drops (what was queued is lost); the client resumes where it stands."""
        self.max_events = max_events
        self.blocked = blocked
        self.outbox = Outbox(limit)
        self.sub = Subscriber(self.outbox, lambda: None)
        self.pos = {}
        self.handed = {}
        self.pongs_expected = []
        # As catch_up does: every starting point first, then each channel's replay and join.
        starts: dict[Channel, int] = {}
        for ch, view in list(self.views.items()):
            resume = (
                StreamPosition(view.epoch, view.last)
                if view.epoch and view.last is not None
                else None
            )
            if resume is None:
                self.views[ch] = View()  # nothing to resume from: a fresh subscription
            after = self._follow(ch, resume, snapshot)
            if after is not None:
                starts[ch] = after
        for ch, after in starts.items():
            self._replay(ch, after, page)
            # The live batches held meanwhile, overlapping what the replay sent.
            s = self.streams[ch]
            if overlap and s.last >= s.first:
                self._add(make_batch(ch, s.epoch, max(s.first, s.last + 1 - overlap), s.last))
                self._flush()

    @rule()
    def settle(self) -> None:
        """One more event everywhere, the reader catches up, the client reads everything: then
        it stands exactly at the end of each stream it follows."""
        self.blocked = False
        for ch in CHANNELS:
            self.streams[ch].last += 1
            self._dispatch(ch, 0, 5)
        self.take()
        for ch, view in self.views.items():
            s = self.streams[ch]
            assert (view.epoch, view.last) == (s.epoch, s.last), (ch.name, view, s)


TestDeliveryModel = DeliveryModel.TestCase
TestDeliveryModel.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
