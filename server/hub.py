"""Who follows which channel, and the fan-out of each batch to its subscribers' outboxes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from tickwire.core.channels import Channel, ChannelPattern
from tickwire.server.batch import Batch
from tickwire.server.outbox import Outbox


class Subscriber:
    """The hub's view of one connection: its outbox, the channels held back during catch-up,
    and a callback that writes what the outbox holds."""

    __slots__ = ("_held_events", "flush", "hold_limit", "holding", "outbox")

    def __init__(
        self, outbox: Outbox, flush: Callable[[], None], hold_limit: int = 100_000
    ) -> None:
        self.outbox = outbox
        self.flush = flush
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


class Hub:
    def __init__(self) -> None:
        self._exact: dict[Channel, set[Subscriber]] = {}
        self._wild: dict[str, set[Subscriber]] = {}
        self._cache: dict[Channel, tuple[Subscriber, ...]] = {}
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
        for subs in (*self._exact.values(), *self._wild.values()):
            subs.discard(sub)
        self._invalidate()

    def subscribe(self, sub: Subscriber, pattern: ChannelPattern) -> None:
        if pattern.is_wildcard:
            self._wild.setdefault(pattern.kind, set()).add(sub)
        else:
            self._exact.setdefault(pattern.as_channel(), set()).add(sub)
        self._invalidate()

    def unsubscribe(self, sub: Subscriber, pattern: ChannelPattern) -> None:
        if pattern.is_wildcard:
            self._wild.get(pattern.kind, set()).discard(sub)
        else:
            self._exact.get(pattern.as_channel(), set()).discard(sub)
        self._invalidate()

    def follows(self, sub: Subscriber, channel: Channel) -> bool:
        return sub in self._exact.get(channel, ()) or sub in self._wild.get(channel.kind, ())

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
        live = {c for c, subs in self._exact.items() if subs}
        kinds = {k for k, subs in self._wild.items() if subs}
        if kinds:
            live.update(c for c in self.known if c.kind in kinds)
        return live

    def subscribers_of(self, channel: Channel) -> tuple[Subscriber, ...]:
        subs = self._cache.get(channel)
        if subs is None:
            subs = tuple(self._exact.get(channel, set()) | self._wild.get(channel.kind, set()))
            self._cache[channel] = subs
        return subs

    def _invalidate(self) -> None:
        self._cache.clear()
        self.changed.set()
        if self.on_change is not None:
            self.on_change()

    # -- fan-out -------------------------------------------------------------------------------
    def dispatch(self, batches: Iterable[Batch]) -> int:
        """Queue each batch for its subscribers and write once per touched subscriber.

        Subscriber by subscriber: the first one's frame goes out after its own batches are
        queued, not after every subscriber's (the writes are most of the cost; the first
        subscribers should not wait for the queueing of the last). Returns the number of
        (subscriber, event) deliveries queued.
        """
        per_sub: dict[Subscriber, list[Batch]] = {}
        for batch in batches:
            for sub in self.subscribers_of(batch.channel):
                mine = per_sub.get(sub)
                if mine is None:
                    per_sub[sub] = [batch]
                else:
                    mine.append(batch)
        deliveries = 0
        for sub, mine in per_sub.items():
            touched = False
            for batch in mine:
                if sub.holding and batch.channel in sub.holding:
                    sub.hold(batch)
                elif sub.outbox.add(batch):
                    touched = True
                    deliveries += len(batch.events)
            if touched:
                sub.flush()
        return deliveries

    def broadcast_control(self, message: bytes) -> None:
        for sub in self.subscribers:
            sub.outbox.control(message)
            sub.flush()
