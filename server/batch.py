"""A run of consecutive events of one channel as read from Redis, and its frame built once."""

from __future__ import annotations

from dataclasses import dataclass, field

from tickwire.core.channels import Channel
from tickwire.core.stream import StreamPosition
from tickwire.server.messages import events_head


@dataclass(slots=True)
class Batch:
    """Events `first_seq .. first_seq + len(events) - 1` of `channel`, consecutive, in one epoch.

    A batch is immutable once built: `frame` (the `events` message, shared by every subscriber)
    and `last_seq` are computed once, because the fan-out reads them per subscriber.
    """

    channel: Channel
    epoch: str
    first_seq: int
    events: list[bytes]
    conflated: bool = False
    last_seq: int = field(init=False)
    #: (epoch, last_seq): where a subscriber stands once it has this batch, made once for all.
    end: StreamPosition = field(init=False, repr=False)
    frame: bytes = field(init=False, repr=False)
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.last_seq = self.first_seq + len(self.events) - 1
        self.end = StreamPosition(self.epoch, self.last_seq)
        head = events_head(self.channel, self.epoch, conflated=self.conflated)
        self.frame = head + b'"events":[' + b",".join(self.events) + b"]}"
        self.nbytes = len(self.frame)

    def after(self, seq: int) -> Batch | None:
        """The part of this batch with seqs above `seq` (None if nothing is left)."""
        if seq < self.first_seq:
            return self
        if seq >= self.last_seq:
            return None
        return Batch(self.channel, self.epoch, seq + 1, self.events[seq + 1 - self.first_seq :])

    def latest_only(self) -> Batch:
        return Batch(self.channel, self.epoch, self.last_seq, self.events[-1:], conflated=True)
