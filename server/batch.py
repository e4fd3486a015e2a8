"""A run of consecutive events of one channel as read from Redis, and its frame built once."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from tickwire.core.channels import Channel
from tickwire.core.stream import StreamPosition
from tickwire.server.messages import events_head


@dataclass(slots=True)
class Batch:
    """Events `first_seq .. first_seq + len(events) - 1` of `channel`, consecutive, in one epoch.

    A batch is immutable once built: `frame` (the `events` message, shared by every subscriber)
    and `last_seq` are computed once, because the fan-out reads them per subscriber. Projected
    frames (`frame_for`) are built on first use, once per distinct projection.
    """

    channel: Channel
    epoch: str
    first_seq: int
    events: list[bytes]
    conflated: bool = False
    #: Seqs just before `first_seq` that these events supersede (a throttled subscription's
    #: quotes or bars, see `tickwire.server.throttle`): `"skipped":N` in the frame, and the
    #: batch continues a client that stands at `start - 1`.
    skipped: int = 0
    #: `first_seq - skipped`: the seq the batch continues from.
    start: int = field(init=False)
    last_seq: int = field(init=False)
    #: (epoch, last_seq): where a subscriber stands once it has this batch, made once for all.
    end: StreamPosition = field(init=False, repr=False)
    frame: bytes = field(init=False, repr=False)
    nbytes: int = field(init=False)
    #: Frames per projection, and the events decoded once for all of them (see `frame_for`).
    _projected: dict[frozenset[str], bytes] | None = field(init=False, default=None, repr=False)
    _docs: list[dict[str, Any]] | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        self.last_seq = self.first_seq + len(self.events) - 1
        self.start = self.first_seq - self.skipped
        self.end = StreamPosition(self.epoch, self.last_seq)
        head = events_head(self.channel, self.epoch, conflated=self.conflated, skipped=self.skipped)
        self.frame = head + b'"events":[' + b",".join(self.events) + b"]}"
        self.nbytes = len(self.frame)

    def frame_for(self, fields: frozenset[str] | None) -> bytes:
        """The `events` message with only the keys `fields` of each event (in stored order);
        `frame` itself for None. Built once per projection and shared by every subscriber with
        it; the events are decoded once per batch, for the first projection asked."""
        if fields is None:
            return self.frame
        frames = self._projected
        if frames is None:
            frames = self._projected = {}
        frame = frames.get(fields)
        if frame is None:
            docs = self._docs
            if docs is None:
                docs = self._docs = [orjson.loads(e) for e in self.events]
            # orjson wrote the stored numbers in shortest round-trip form: decoding and encoding
            # them again gives the same text, so a kept field reads exactly as stored.
            kept = orjson.dumps([{k: v for k, v in d.items() if k in fields} for d in docs])
            head = events_head(
                self.channel, self.epoch, conflated=self.conflated, skipped=self.skipped
            )
            frame = frames[fields] = head + b'"events":' + kept + b"}"
        return frame

    def after(self, seq: int) -> Batch | None:
        """The part of this batch with seqs above `seq` (None if nothing is left)."""
        if seq < self.first_seq:
            return self
        if seq >= self.last_seq:
            return None
        return Batch(self.channel, self.epoch, seq + 1, self.events[seq + 1 - self.first_seq :])

    def latest_only(self) -> Batch:
        return Batch(self.channel, self.epoch, self.last_seq, self.events[-1:], conflated=True)

    def superseding(self) -> Batch:
        """Only the latest event, saying that it supersedes the others (and what this batch
        skipped already): a throttled quote or bar channel's frame. Itself if nothing is."""
        if len(self.events) == 1:
            return self
        return Batch(
            self.channel,
            self.epoch,
            self.last_seq,
            self.events[-1:],
            self.conflated,
            self.last_seq - self.start,
        )

    def with_skipped(self, skipped: int) -> Batch:
        """The same events, saying that they supersede the `skipped` seqs before them."""
        if skipped == self.skipped:
            return self
        return Batch(self.channel, self.epoch, self.first_seq, self.events, self.conflated, skipped)
