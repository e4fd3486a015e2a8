"""Who follows which channel, and the fan-out of each batch to its subscribers' outboxes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from tickwire.core.channels import WILDCARD, Channel, ChannelPattern
from tickwire.server.batch import Batch
from tickwire.server.outbox import Outbox, message_of


class Subscriber:
    """The hub's view of one connection: its outbox, the channels held back during catch-up,
    a callback that writes what the outbox holds, and, optionally, one that writes a message
    at once if the connection can take it right now (the fan-out's shortcut, see `Hub`)."""

    __slots__ = ("_held_events", "flush", "hold_limit", "holding", "outbox", "write_now")

    def __init__(
        self,
        outbox: Outbox,
        flush: Callable[[], None],
        hold_limit: int = 100_000,
        write_now: Callable[[bytes], bool] | None = None,
    ) -> None:
        self.outbox = outbox
        self.flush = flush
        #: Writes a message now and returns True, or writes nothing and returns False.
        self.write_now = write_now
        #: Live batches of channels being caught up from history.
        self.holding: dict[Channel, list[Batch]] = {}
        self.hold_limit = hold_limit
        # Events in each hold list, kept as it grows (an empty list starts the count again).
        self._held_events: dict[Channel, int] = {}

    def hold(self, batch: Batch) -> None:
        channel = batch.channel
        held = self.holding[channel]
        count = (self._held_events.get(channel, 0) if held else 0) + len(batch.events)
        held.append(batch)
        if count > self.hold_limit:
            # The catch-up reads history up to the stream's end before joining live, so what is
            # dropped here is read again from Redis; holding it all would be unbounded.
            held.clear()
            count = 0
        self._held_events[channel] = count


class Group:
    """The subscribers that follow exactly the same patterns: a batch reaches all or none of
    them, so the fan-out sorts batches once per group, not once per subscriber."""

    __slots__ = ("members", "patterns")

    def __init__(self, patterns: frozenset[ChannelPattern]) -> None:
        self.patterns = patterns
        self.members: set[Subscriber] = set()


class Hub:
    """Subscriptions and the fan-out.

    Subscribers are kept in groups by their set of patterns. Per dispatch each group gets its
    batches once, and a member that is in step (nothing queued, nothing held back, every batch
    continuing exactly what it was sent) and whose connection can take data now gets one frame
    built once for the whole group: its cost per batch is two position updates instead of the
    outbox's queueing and unqueueing. Any other member goes through its outbox, batch by batch.
    The bytes a member gets are the same either way. When every client follows different
    channels, each group has one member and only the saving on the frame is lost.
    """

    def __init__(self) -> None:
        self._exact: dict[Channel, set[Group]] = {}
        self._wild: dict[str, set[Group]] = {}
        self._groups: dict[frozenset[ChannelPattern], Group] = {}
        self._group_of: dict[Subscriber, Group] = {}
        self._cache: dict[Channel, tuple[Group, ...]] = {}
        self.subscribers: set[Subscriber] = set()
        #: Channels that exist in Redis, as far as the registry says.
        self.known: set[Channel] = set()
        #: Set whenever the set of live channels may have changed.
        self.changed = asyncio.Event()
        #: Called then too: the reader's wake-up while it waits for pushes.
        self.on_change: Callable[[], None] | None = None

    # -- bookkeeping ---------------------------------------------------------------------------
    def attach(self, sub: Subscriber) -> None:
        self.subscribers.add(sub)

    def detach(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)
        self._move(sub, frozenset())

    def subscribe(self, sub: Subscriber, *patterns: ChannelPattern) -> None:
        self._move(sub, self.patterns_of(sub).union(patterns))

    def unsubscribe(self, sub: Subscriber, *patterns: ChannelPattern) -> None:
        self._move(sub, self.patterns_of(sub).difference(patterns))

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
        live = {c for c, groups in self._exact.items() if groups}
        kinds = {k for k, groups in self._wild.items() if groups}
        if kinds:
            live.update(c for c in self.known if c.kind in kinds)
        return live

    def groups_of(self, channel: Channel) -> tuple[Group, ...]:
        groups = self._cache.get(channel)
        if groups is None:
            groups = tuple(self._exact.get(channel, set()) | self._wild.get(channel.kind, set()))
            self._cache[channel] = groups
        return groups

    def subscriber_count(self, channel: Channel) -> int:
        return sum(len(g.members) for g in self.groups_of(channel))

    def _move(self, sub: Subscriber, patterns: frozenset[ChannelPattern]) -> None:
        old = self._group_of.get(sub)
        if old is not None and old.patterns == patterns:
            return
        if old is not None:
            old.members.discard(sub)
            del self._group_of[sub]
            if not old.members:
                self._index(old, remove=True)
                del self._groups[old.patterns]
        if patterns:
            group = self._groups.get(patterns)
            if group is None:
                group = self._groups[patterns] = Group(patterns)
                self._index(group)
            group.members.add(sub)
            self._group_of[sub] = group
        self._invalidate()

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
        self._cache.clear()
        self.changed.set()
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
        shared = len({b.channel for b in batches}) == len(batches)
        per_group: dict[Group, list[Batch]] = {}
        for batch in batches:
            for group in self.groups_of(batch.channel):
                mine = per_group.get(group)
                if mine is None:
                    per_group[group] = [batch]
                else:
                    mine.append(batch)
        deliveries = 0
        for group, mine in per_group.items():
            frame: bytes | None = None
            events = 0
            for sub in group.members:
                outbox = sub.outbox
                if (
                    shared
                    and sub.write_now is not None
                    and not sub.holding
                    and not outbox
                    and outbox.step(mine)
                ):
                    if frame is None:
                        frame = message_of([b.frame for b in mine])
                        events = sum([len(b.events) for b in mine])
                    if sub.write_now(frame):
                        deliveries += events
                        continue
                    outbox.unstep(mine)
                touched = False
                for batch in mine:
                    if sub.holding and batch.channel in sub.holding:
                        sub.hold(batch)
                    elif outbox.add(batch):
                        touched = True
                        deliveries += len(batch.events)
                if touched:
                    sub.flush()
        return deliveries

    def broadcast_control(self, message: bytes) -> None:
        for sub in self.subscribers:
            sub.outbox.control(message)
            sub.flush()
