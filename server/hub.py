"""Who follows which channel, and the fan-out of each batch to its subscribers' outboxes."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType

from tickwire.core.channels import WILDCARD, Channel, ChannelPattern
from tickwire.core.stream import StreamPosition
from tickwire.server.batch import Batch
from tickwire.server.frames import text_frame
from tickwire.server.outbox import Outbox, message_of, step, unstep
from tickwire.server.projection import Fields, Projection
from tickwire.server.throttle import Rate, Throttle

#: A group's identity: its patterns, the fields of those that are projected, and the rates
#: (`max_hz`) of those that are throttled.
GroupKey = tuple[
    frozenset[ChannelPattern],
    frozenset[tuple[ChannelPattern, frozenset[str]]],
    frozenset[tuple[ChannelPattern, float]],
]
NO_GROUP: GroupKey = (frozenset(), frozenset(), frozenset())


#: Every `Subscriber.holding` that holds nothing: read-only, so that a write to it fails.
_NOT_HOLDING: Mapping[Channel, list[Batch]] = MappingProxyType({})


class Subscriber:
    """The hub's view of one connection: its outbox, the channels held back during catch-up,
    a callback that writes what the outbox holds, and, optionally, one that writes a message
    at once if the connection can take it right now (the fan-out's shortcut, see `Hub`), and
    one told when delivering to it raised (see `Hub`)."""

    __slots__ = (
        "_held_bytes",
        "flush",
        "hold_limit",
        "holding",
        "on_error",
        "outbox",
        "write_now",
    )

    def __init__(
        self,
        outbox: Outbox,
        flush: Callable[[], None],
        hold_limit: int = 8 * 1024 * 1024,
        write_now: Callable[[bytes, bytes], bool] | None = None,
        on_error: Callable[[Exception], None] | None = None,
    ) -> None:
        self.outbox = outbox
        self.flush = flush
        #: Told, once the hub has let the subscriber go, of an exception delivering to it
        #: raised (the connection closes); None: the exception propagates.
        self.on_error = on_error
        #: Writes a message now and returns True, or writes nothing and returns False. It gets
        #: the message and the same as one final text frame (`text_frame`), built once for all.
        self.write_now = write_now
        #: Live batches of channels being caught up from history (see `tickwire.server.catchup`):
        #: the shared empty `_NOT_HOLDING` while none is, so that an idle connection does not
        #: keep a dict of its own (read-only: `hold_back` makes one).
        self.holding: Mapping[Channel, list[Batch]] = _NOT_HOLDING
        #: Bytes held in all of them together, at most `hold_limit` (plus one batch).
        self.hold_limit = hold_limit
        self._held_bytes = 0

    def hold_back(self, channel: Channel) -> None:
        """Hold live batches of `channel` from now on (a catch-up starts)."""
        holding = self.holding
        if not isinstance(holding, dict):
            holding = self.holding = {}
        holding.setdefault(channel, [])

    def hold(self, batch: Batch) -> None:
        self.holding[batch.channel].append(batch)
        self._held_bytes += batch.nbytes
        if self._held_bytes > self.hold_limit:
            # A catch-up reads history up to where the reader stands before it joins live, so
            # what is dropped here is read again from Redis: holding it all would let one
            # connection resuming many channels pin their whole history in memory.
            for held in self.holding.values():
                held.clear()
            self._held_bytes = 0

    def release(self, channel: Channel) -> None:
        """Stop holding `channel` and drop what was held (its catch-up ended without a join)."""
        if not isinstance(self.holding, dict):
            return
        held = self.holding.pop(channel, None)
        if held:
            self._held_bytes = max(0, self._held_bytes - sum(b.nbytes for b in held))
        self._settle()

    def join_live(self, channel: Channel) -> None:
        """The catch-up of `channel` is done: queue what was held, and take live batches again."""
        held = self.holding.pop(channel, []) if isinstance(self.holding, dict) else []
        for batch in held:
            self._held_bytes -= batch.nbytes
            self.outbox.add(batch)
        self._held_bytes = max(0, self._held_bytes)
        self._settle()
        self.flush()

    def _settle(self) -> None:
        if not self.holding:
            self.holding = _NOT_HOLDING


class Group:
    """The subscribers that follow exactly the same patterns with the same fields and rates: a
    batch reaches all or none of them, in the same bytes, so the fan-out sorts batches once per
    group, not once per subscriber. `projection` is None when no pattern of the group is
    projected, `throttle` when none is throttled: a throttled group's batches pass its throttle
    once for all its members.

    Members in step with each other share one positions dict (`Outbox.share`), moved once per
    dispatch for all of them; a member leaves it (`Outbox.own`) before anything else changes
    its positions.
    """

    __slots__ = ("key", "members", "patterns", "positions", "projection", "throttle")

    def __init__(self, key: GroupKey) -> None:
        self.key = key
        self.patterns = key[0]
        self.projection = Projection(key[0], dict(key[1])) if key[1] else None
        self.throttle = Throttle(key[0], dict(key[2])) if key[2] else None
        self.members: set[Subscriber] = set()
        self.positions: dict[Channel, StreamPosition] | None = None


class Hub:
    """Subscriptions and the fan-out.

    Subscribers are kept in groups by their set of patterns. Per dispatch each group gets its
    batches once, and a member that is in step (nothing queued, nothing held back, every batch
    continuing exactly what it was sent) and whose connection can take data now gets one frame
    built once for the whole group. Members in step share one positions dict, moved once per
    dispatch for the group, so such a member costs one write and no bookkeeping (see
    docs/benchmarks.md, shared positions). Any other member goes
    through its outbox, batch by batch. The bytes a member gets are the same either way. When
    every client follows different channels, each group has one member and only the saving on
    the frame is lost.

    A subscriber whose delivery raises (a bug in its connection, say) is detached and its
    `on_error` told, after the others of its group got their batches: one connection's failure
    never stops the fan-out to the rest, nor the reader that dispatches.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        #: The throttles' time (seconds; `on_wake` deadlines are in it).
        self.clock = clock
        self._exact: dict[Channel, set[Group]] = {}
        self._wild: dict[str, set[Group]] = {}
        self._groups: dict[GroupKey, Group] = {}
        self._group_of: dict[Subscriber, Group] = {}
        self._cache: dict[Channel, tuple[Group, ...]] = {}
        #: Subscribers per channel, for the latency histogram's weights (once per batch read).
        self._counts: dict[Channel, int] = {}
        self._live: set[Channel] | None = None
        self.subscribers: set[Subscriber] = set()
        #: Channels that exist in Redis, as far as the registry says.
        self.known: set[Channel] = set()
        #: True whenever the set of live channels may have changed (the reader clears it).
        self.changed = False
        #: Called then too: the reader's wake-up while it waits for pushes.
        self.on_change: Callable[[], None] | None = None
        #: Called with a deadline (in `clock` time) when a throttle holds batches due earlier
        #: than any deadline given before: call `release_due` then (the I/O edge's timer).
        self.on_wake: Callable[[float], None] | None = None
        self._wake_at: float | None = None
        self._throttled: set[Group] = set()

    # -- bookkeeping ---------------------------------------------------------------------------
    def attach(self, sub: Subscriber) -> None:
        self.subscribers.add(sub)

    def detach(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)
        self._move(sub, NO_GROUP)

    def subscribe(
        self,
        sub: Subscriber,
        *patterns: ChannelPattern,
        fields: Fields = None,
        max_hz: Rate = None,
    ) -> None:
        """Add `patterns`, their events cut to `fields` (None: whole), at most `max_hz` frames
        per second per channel (None: live). A pattern `sub` follows already would take the new
        fields and rate: the session refuses other ones for a subscribed pattern before it gets
        here (`ClientSession._subscribe`)."""
        old = self._group_of.get(sub)
        kept, projected, rated = old.key if old is not None else NO_GROUP
        added = frozenset(patterns)
        projected = frozenset((p, f) for p, f in projected if p not in added)
        if fields is not None:
            projected |= {(p, fields) for p in added}
        rated = frozenset((p, r) for p, r in rated if p not in added)
        if max_hz is not None:
            rated |= {(p, max_hz) for p in added}
        self._move(sub, (kept | added, projected, rated))

    def unsubscribe(self, sub: Subscriber, *patterns: ChannelPattern) -> None:
        old = self._group_of.get(sub)
        if old is None:
            return
        removed = frozenset(patterns)
        kept, projected, rated = old.key
        self._move(
            sub,
            (
                kept - removed,
                frozenset((p, f) for p, f in projected if p not in removed),
                frozenset((p, r) for p, r in rated if p not in removed),
            ),
        )

    def patterns_of(self, sub: Subscriber) -> frozenset[ChannelPattern]:
        group = self._group_of.get(sub)
        return group.patterns if group is not None else frozenset()

    def follows(self, sub: Subscriber, channel: Channel) -> bool:
        patterns = self.patterns_of(sub)
        return (
            ChannelPattern(channel.kind, channel.symbol) in patterns
            or ChannelPattern(channel.kind, WILDCARD) in patterns
        )

    def add_known(self, channels: Iterable[Channel]) -> list[Channel]:
        new = [c for c in channels if c not in self.known]
        if new:
            self.known.update(new)
            self._invalidate()
        return new

    def known_matching(self, pattern: ChannelPattern) -> list[Channel]:
        if not pattern.is_wildcard:
            return [pattern.as_channel()]
        return sorted((c for c in self.known if pattern.matches(c)), key=str)

    def live_channels(self) -> set[Channel]:
        """The channels someone follows (do not change the set: it is kept until the next
        change of subscriptions or known channels)."""
        if self._live is None:
            live = {c for c, groups in self._exact.items() if groups}
            kinds = {k for k, groups in self._wild.items() if groups}
            if kinds:
                live.update(c for c in self.known if c.kind in kinds)
            self._live = live
        return self._live

    def groups_of(self, channel: Channel) -> tuple[Group, ...]:
        groups = self._cache.get(channel)
        if groups is None:
            groups = tuple(self._exact.get(channel, set()) | self._wild.get(channel.kind, set()))
            self._cache[channel] = groups
        return groups

    def subscriber_count(self, channel: Channel) -> int:
        n = self._counts.get(channel)
        if n is None:
            n = self._counts[channel] = sum(len(g.members) for g in self.groups_of(channel))
        return n

    def _move(self, sub: Subscriber, key: GroupKey) -> None:
        old = self._group_of.get(sub)
        if old is not None and old.key == key:
            return
        sub.outbox.own()
        sub.outbox.projection = None
        waiting: list[Batch] = []
        if old is not None:
            old.members.discard(sub)
            del self._group_of[sub]
            if old.throttle is not None:
                # Trades never wait in vain: what the old group's throttle holds goes now.
                waiting = old.throttle.waiting()
            if not old.members:
                self._index(old, remove=True)
                del self._groups[old.key]
                self._throttled.discard(old)
        if key[0]:
            group = self._groups.get(key)
            if group is None:
                group = self._groups[key] = Group(key)
                self._index(group)
                if group.throttle is not None:
                    self._throttled.add(group)
            group.members.add(sub)
            self._group_of[sub] = group
            # What the outbox queues is rendered with the group's projection (`Outbox.take`).
            sub.outbox.projection = group.projection
        if waiting and sub in self.subscribers:
            self._queue(sub, waiting)
        self._invalidate()

    def throttles(self, sub: Subscriber, channel: Channel) -> bool:
        """Whether `sub` gets `channel` throttled (its history is then replayed conflated)."""
        group = self._group_of.get(sub)
        return (
            group is not None
            and group.throttle is not None
            and group.throttle.interval_of(channel) is not None
        )

    def _index(self, group: Group, *, remove: bool = False) -> None:
        for p in group.patterns:
            index: set[Group]
            if p.is_wildcard:
                index = self._wild.setdefault(p.kind, set())
            else:
                index = self._exact.setdefault(p.as_channel(), set())
            if remove:
                index.discard(group)
            else:
                index.add(group)

    def _invalidate(self) -> None:
        # Every change of a group's members or patterns comes through here (`_move`).
        self._cache.clear()
        self._counts.clear()
        self._live = None
        self.mark_changed()

    def mark_changed(self) -> None:
        """The reader is owed a sync of its channels (`changed`): wake it for one."""
        self.changed = True
        if self.on_change is not None:
            self.on_change()

    # -- fan-out -------------------------------------------------------------------------------
    def dispatch(self, batches: list[Batch]) -> int:
        """Queue or write each batch for its subscribers; returns the (subscriber, event)
        deliveries made.

        Subscriber by subscriber: the first one's frame goes out after its own batches are
        handled, not after every subscriber's (the writes are most of the cost; the first
        subscribers should not wait for the queueing of the last).
        """
        # One channel twice (a hole or a new epoch split it; only catch-up reads do that): the
        # outboxes sort that out, batch by batch. Checked once, not per group.
        distinct = len({b.channel for b in batches}) == len(batches)
        per_group: dict[Group, list[Batch]] = {}
        for batch in batches:
            for group in self.groups_of(batch.channel):
                mine = per_group.get(group)
                if mine is None:
                    per_group[group] = [batch]
                else:
                    mine.append(batch)
        deliveries = 0
        now: float | None = None
        for group, mine in per_group.items():
            throttle = group.throttle
            if throttle is None:
                deliveries += self._deliver(group, mine, distinct)
                continue
            if now is None:
                now = self.clock()
            now_going = throttle.offer(mine, now)
            due = throttle.next_due()
            if due is not None and (self._wake_at is None or due < self._wake_at):
                self._wake_at = due
                if self.on_wake is not None:
                    self.on_wake(due)
            if now_going:
                deliveries += self._deliver(group, now_going, _distinct(now_going))
        return deliveries

    def release_due(self) -> int:
        """Send what the throttles held until now (the timer `on_wake` asked for); returns the
        deliveries made. Names the next deadline through `on_wake`."""
        now = self.clock()
        self._wake_at = None
        deliveries = 0
        wake: float | None = None
        for group in list(self._throttled):
            throttle = group.throttle
            assert throttle is not None
            due = throttle.due(now)
            if due:
                deliveries += self._deliver(group, due, _distinct(due))
            later = throttle.next_due()
            if later is not None and (wake is None or later < wake):
                wake = later
        if wake is not None:
            self._wake_at = wake
            if self.on_wake is not None:
                self.on_wake(wake)
        return deliveries

    def _deliver(self, group: Group, mine: list[Batch], distinct: bool) -> int:
        """Write or queue `mine` for each member of `group`; returns the deliveries made."""
        deliveries = 0
        frame = wire = b""
        events = 0
        projection = group.projection
        common = group.positions
        stepped = common is not None and distinct and step(common, mine)
        if not stepped:
            # Whoever shared it leaves it below; a stale dict must not be joined.
            group.positions = common = None
        sharing = 0
        failed: list[tuple[Subscriber, Exception]] | None = None
        for sub in group.members:
            # (A try costs nothing in CPython 3.11 while nothing raises.)
            try:
                outbox = sub.outbox
                write_now = sub.write_now
                was_shared = outbox.shared
                if was_shared:
                    # Its positions moved with `common` already: one write and it is done.
                    fast = stepped and not outbox and not sub.holding
                else:
                    fast = (
                        distinct
                        and write_now is not None
                        and not sub.holding
                        and not outbox
                        and outbox.step(mine)
                    )
                if fast and write_now is not None:
                    if not frame:
                        if projection is None:
                            frame = message_of([b.frame for b in mine])
                        else:
                            frame = message_of(
                                [b.frame_for(projection.of(b.channel)) for b in mine]
                            )
                        wire = text_frame(frame)
                        events = sum([len(b.events) for b in mine])
                    if write_now(frame, wire):
                        deliveries += events
                        if not was_shared:
                            positions = outbox.positions
                            if common is None:
                                group.positions = common = positions
                                outbox.share(common)
                            elif len(positions) == len(common) and positions == common:
                                outbox.share(common)
                        sharing += outbox.shared
                        continue
                if was_shared:
                    outbox.own()
                    if stepped:
                        unstep(outbox.positions, mine)
                elif fast:
                    outbox.unstep(mine)
                deliveries += self._queue(sub, mine)
            except Exception as exc:
                if failed is None:
                    failed = []
                failed.append((sub, exc))
        if not sharing:
            group.positions = None
        if failed is not None:
            self._let_go(failed)
        return deliveries

    def _let_go(self, failed: list[tuple[Subscriber, Exception]]) -> None:
        """Detach the subscribers whose delivery raised (after the loop over the members: that
        changes them), then tell each; one without `on_error` gets the exception back."""
        for sub, _ in failed:
            self.detach(sub)
        for sub, exc in failed:
            if sub.on_error is None:
                raise exc
            sub.on_error(exc)

    @staticmethod
    def _queue(sub: Subscriber, batches: list[Batch]) -> int:
        """Hold or queue `batches` for `sub` (the outbox's way); returns the deliveries."""
        deliveries = 0
        touched = False
        outbox = sub.outbox
        for batch in batches:
            if sub.holding and batch.channel in sub.holding:
                sub.hold(batch)
            elif outbox.add(batch):
                touched = True
                deliveries += len(batch.events)
        if touched:
            sub.flush()
        return deliveries

    def announce_epoch(self, channel: Channel, position: StreamPosition) -> int:
        """The follower moved `channel` to a new epoch (Redis lost or recreated its stream):
        tell each subscriber who got events of another epoch at once, with a `reset` placing it
        at `position`, rather than with the channel's next event, which may be long in coming
        (a failover's lost tail of a quiet channel). Returns the resets sent.

        Members catching the channel up from history are left to their catch-up, which places
        them. A throttle drops what it holds of the old epoch: it must not follow the reset."""
        sent = 0
        for group in self.groups_of(channel):
            if group.throttle is not None:
                group.throttle.keep_epoch(channel, position.epoch)
            failed: list[tuple[Subscriber, Exception]] = []
            for sub in group.members:
                if channel in sub.holding:
                    continue
                outbox = sub.outbox
                pos = outbox.positions.get(channel)
                if pos is None or not pos.epoch or pos.epoch == position.epoch:
                    continue
                try:
                    outbox.reset(channel, position.epoch, position.seq)
                    sub.flush()
                except Exception as exc:
                    failed.append((sub, exc))
                    continue
                sent += 1
            if failed:
                self._let_go(failed)
        return sent

    def broadcast_control(self, message: bytes) -> None:
        failed: list[tuple[Subscriber, Exception]] = []
        for sub in self.subscribers:
            try:
                sub.outbox.control(message)
                sub.flush()
            except Exception as exc:
                failed.append((sub, exc))
        if failed:
            self._let_go(failed)


def _distinct(batches: list[Batch]) -> bool:
    """No channel twice among `batches`."""
    return len({b.channel for b in batches}) == len(batches)
