"""Per-client queue of outgoing data: keeps the seq invariant and applies the slow-consumer policy.

Sans-I/O: the connection layer decides *when* to `take()` (when the socket can accept more);
the outbox decides *what* goes, and what to do when a client falls behind:

- per channel, events are queued in seq order; a batch overlapping what was already queued is cut
  (no duplicates); a hole before it is announced with one `gap`; a new epoch with one `reset`;
- past `limit_bytes` while the client is not reading (`shed()`), quote and bar channels conflate to their latest event (a `gap` with reason
  `conflated` covers what was skipped, and the frame says `"conflated":true`), trade channels drop
  what is queued and announce it as one `gap` with reason `slow_consumer`.
"""

from __future__ import annotations

from dataclasses import dataclass

from tickwire.core.channels import Channel
from tickwire.core.stream import StreamPosition
from tickwire.server.batch import Batch
from tickwire.server.messages import gap_message, reset_message
from tickwire.server.projection import Projection

#: The position of a channel nothing was stored of yet.
START = StreamPosition("", 0)


@dataclass(slots=True)
class PendingGap:
    from_seq: int
    to_seq: int
    reason: str

    def render(self, channel: Channel) -> bytes:
        return gap_message(channel, self.from_seq, self.to_seq, self.reason)


Item = Batch | PendingGap | bytes  # bytes: a notice already rendered (reset)


@dataclass(slots=True)
class OutboxStats:
    dropped_events: int = 0
    conflated_events: int = 0
    gaps: int = 0
    resets: int = 0


class Outbox:
    def __init__(self, limit_bytes: int, stats: OutboxStats | None = None) -> None:
        self.limit_bytes = limit_bytes
        self.stats = stats or OutboxStats()
        self.nbytes = 0
        #: (epoch, last seq queued) per channel: where the client's stream stands. While
        #: `shared`, the same dict as the other members of its hub group that are in step with
        #: it (`Hub.dispatch`): read it freely, but change it only through this class.
        self.positions: dict[Channel, StreamPosition] = {}
        self.shared = False
        #: Positions set by `expect` or `reset` (a resume point, a snapshot's start, a new
        #: epoch), not by anything sent: while a channel's position still equals its entry here,
        #: no event or gap of it has gone out. Compared only when a heartbeat is built, so the
        #: hot path pays nothing for it.
        self._claimed: dict[Channel, StreamPosition] = {}
        self._control: list[bytes] = []
        self._queued: dict[Channel, list[Item]] = {}
        #: The fields each channel's events keep (set by the hub with the subscriptions); None:
        #: every channel whole. Queued batches are rendered with it when taken, whatever queued
        #: them (live, held, snapshot or resume). `nbytes` counts them whole all the same: the
        #: limit is checked on the hot path, where projecting would cost a build per client.
        self.projection: Projection | None = None

    def __bool__(self) -> bool:
        return bool(self._control or self._queued)

    def share(self, positions: dict[Channel, StreamPosition]) -> None:
        """Take `positions`, equal to this outbox's own, as shared: it moves with the group."""
        self.positions = positions
        self.shared = True

    def own(self) -> None:
        """Stop sharing positions: from here on they are this outbox's own copy."""
        if self.shared:
            self.positions = dict(self.positions)
            self.shared = False

    def control(self, message: bytes) -> None:
        """Queue a message that belongs to no channel (replies, status, heartbeat)."""
        self._control.append(message)
        self.nbytes += len(message)

    def expect(self, channel: Channel, epoch: str, last_seq: int) -> None:
        """Declare where the client stands on `channel` (from a resume or a snapshot)."""
        self.own()
        self.positions[channel] = self._claimed[channel] = StreamPosition(epoch, last_seq)

    def forget(self, channel: Channel) -> None:
        """The client no longer follows `channel`: drop what is queued and its position."""
        self.own()
        self.positions.pop(channel, None)
        self._claimed.pop(channel, None)
        for item in self._queued.pop(channel, ()):
            self.nbytes -= _size(item)

    def reset(self, channel: Channel, epoch: str, last_seq: int) -> None:
        """Announce a new epoch; what follows continues after `last_seq` in it."""
        self.own()
        self._push(channel, reset_message(channel, epoch))
        self.positions[channel] = self._claimed[channel] = StreamPosition(epoch, last_seq)
        self.stats.resets += 1

    def last_sent(self) -> dict[Channel, int]:
        """Per channel, the last seq this client was given (by an event, or as the end of a
        `gap`), counting what is still queued; channels with none yet are left out. A resume
        point or a snapshot's start is where the client stands, not something it was sent."""
        claimed = self._claimed
        out = {}
        for channel, pos in self.positions.items():
            if claimed.get(channel) == pos:
                continue
            claimed.pop(channel, None)  # moved on since: the claim is spent
            out[channel] = pos[1]
        return out

    def gap(self, channel: Channel, from_seq: int, to_seq: int, reason: str) -> None:
        """Announce that `from_seq..to_seq` will not be delivered."""
        self.own()
        items = self._queued.get(channel)
        last = items[-1] if items else None
        if isinstance(last, PendingGap) and last.to_seq + 1 == from_seq and last.reason == reason:
            last.to_seq = to_seq
        else:
            self._push(channel, PendingGap(from_seq, to_seq, reason))
            self.stats.gaps += 1
        epoch = self.positions.get(channel, START).epoch
        self.positions[channel] = StreamPosition(epoch, to_seq)

    def add(self, batch: Batch) -> bool:
        """Queue a batch, keeping the invariant; False if it held nothing new for this client."""
        self.own()
        channel = batch.channel
        pos = self.positions.get(channel)
        if pos is not None and pos[1] + 1 == batch.start and pos[0] == batch.epoch:
            # The common case, inlined: the next events of a channel the client follows.
            items = self._queued.get(channel)
            if items is None:
                self._queued[channel] = [batch]
            else:
                items.append(batch)
            self.nbytes += batch.nbytes
            self.positions[channel] = batch.end
            return True
        if pos is None:
            # First events this client gets on the channel: nothing before them is owed, and
            # nothing is skipped.
            batch = batch.with_skipped(0)
        elif pos[0] != batch.epoch:
            if pos[0]:
                self.reset(channel, batch.epoch, batch.first_seq - 1)
            batch = batch.with_skipped(0)
        else:
            cut = batch.after(pos[1])
            if cut is None:
                return False
            hole = cut.first_seq - pos[1] - 1
            if cut.skipped:
                # A throttled channel's latest event (quotes, bars): it supersedes exactly
                # what this client has not had, whatever the group it came from had sent.
                batch = cut.with_skipped(hole)
            else:
                batch = cut
                if hole:
                    self.gap(channel, pos[1] + 1, batch.first_seq - 1, "trimmed")
        self._push(channel, batch)
        self.positions[channel] = batch.end
        return True

    @property
    def over_limit(self) -> bool:
        return self.nbytes > self.limit_bytes

    def shed(self) -> None:
        """Apply the slow-consumer policy to everything queued.

        The connection calls this when the client cannot take data and the outbox is over its
        limit; a client that keeps up never loses anything, however large one turn's data is.
        """
        for channel, items in self._queued.items():
            # A reset splits the queue into epochs; each is shed on its own.
            out: list[Item] = []
            segment: list[Item] = []
            for item in items:
                if isinstance(item, bytes):
                    out += self._shed_segment(channel, segment)
                    out.append(item)
                    segment = []
                else:
                    segment.append(item)
            out += self._shed_segment(channel, segment)
            self._queued[channel] = out
        self.nbytes = sum(len(m) for m in self._control) + sum(
            _size(i) for items in self._queued.values() for i in items
        )

    def _shed_segment(self, channel: Channel, items: list[Item]) -> list[Item]:
        batches = [b for b in items if isinstance(b, Batch)]
        if not batches:
            return items
        conflate = channel.kind != "trades"
        latest: Batch | None = None
        if conflate:
            # The latest event stays, flagged as conflated; a lone event supersedes nothing and
            # goes as it is (a conflated frame always follows the gap of what it superseded).
            alone = len(batches) == 1 and len(batches[0].events) == 1
            latest = batches[0] if alone else batches[-1].latest_only()
        # What the first batch skipped (a throttled channel) is dropped with it.
        first = batches[0].start
        last_dropped = latest.start - 1 if latest is not None else batches[-1].last_seq
        # Gaps before the first dropped batch stay; those between dropped batches are covered
        # by the one gap announced for everything dropped.
        kept: list[Item] = [i for i in items if isinstance(i, PendingGap) and i.from_seq < first]
        if last_dropped >= first:
            reason = "conflated" if conflate else "slow_consumer"
            dropped = (
                last_dropped
                - first
                + 1
                - sum(
                    i.to_seq - i.from_seq + 1
                    for i in items
                    if isinstance(i, PendingGap) and first <= i.from_seq <= last_dropped
                )
            )
            prev = kept[-1] if kept else None
            if isinstance(prev, PendingGap) and prev.to_seq + 1 >= first and prev.reason == reason:
                prev.to_seq = max(prev.to_seq, last_dropped)
            else:
                kept.append(PendingGap(first, last_dropped, reason))
                self.stats.gaps += 1
            if conflate:
                self.stats.conflated_events += dropped
            else:
                self.stats.dropped_events += dropped
        if latest is not None:
            kept.append(latest)
        return kept

    def take(self) -> bytes | None:
        """Everything queued as one frame (an object, or an array of them); None if empty."""
        parts = self._control
        projection = self.projection
        for channel, items in self._queued.items():
            fields = None if projection is None else projection.of(channel)
            for item in items:
                if isinstance(item, Batch):
                    parts.append(item.frame if fields is None else item.frame_for(fields))
                elif isinstance(item, PendingGap):
                    parts.append(item.render(channel))
                else:
                    parts.append(item)
        self._control = []
        self._queued = {}
        self.nbytes = 0
        return message_of(parts) if parts else None

    def step(self, batches: list[Batch]) -> bool:
        """For batches sent past the queue: see `step`."""
        self.own()
        return step(self.positions, batches)

    def unstep(self, batches: list[Batch]) -> None:
        """Undo `step`: the batches were not sent after all."""
        self.own()
        unstep(self.positions, batches)

    def _push(self, channel: Channel, item: Item) -> None:
        items = self._queued.get(channel)
        if items is None:
            self._queued[channel] = [item]
        else:
            items.append(item)
        self.nbytes += _size(item)


def step(positions: dict[Channel, StreamPosition], batches: list[Batch]) -> bool:
    """If each batch is exactly the next of its channel in `positions`, or its first events
    (as `Outbox.add` takes them: nothing before is owed), move every position past it; if not,
    change nothing that matters and return False. Channels must be distinct."""
    for batch in batches:
        pos = positions.get(batch.channel)
        if pos is None:
            if batch.skipped:
                # Nothing is owed before a channel's first events, nor skipped (`Outbox.add`).
                unstep(positions, batches, until=batch)
                return False
        elif pos[1] + 1 != batch.start or pos[0] != batch.epoch:
            unstep(positions, batches, until=batch)
            return False
        positions[batch.channel] = batch.end
    return True


def unstep(
    positions: dict[Channel, StreamPosition], batches: list[Batch], until: Batch | None = None
) -> None:
    """Undo `step` (up to the batch `until`). A channel `step` saw first is left just before
    its batch, which `Outbox.add` treats as it would no position at all."""
    for batch in batches:
        if batch is until:
            return
        positions[batch.channel] = StreamPosition(batch.epoch, batch.start - 1)


def message_of(parts: list[bytes]) -> bytes:
    """One frame's payload: a message alone, or several as a JSON array."""
    if len(parts) == 1:
        return parts[0]
    return b"[" + b",".join(parts) + b"]"


def _size(item: Item) -> int:
    if isinstance(item, Batch):
        return item.nbytes
    if isinstance(item, PendingGap):
        return 100
    return len(item)
