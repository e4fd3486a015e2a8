"""What the client session hands the application: events in batches, notices and replies."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from tickwire.clients.errors import ServerError
from tickwire.core.events import FIELDS_OF, Event
from tickwire.core.stream import StreamPosition

RequestId = int | str

#: Where a channel's delivery stands: the last delivered `seq` of `epoch` (the stream position
#: type the server uses too).
Position = StreamPosition


# --- Messages ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Received:
    """One delivered event, with its channel and how late it arrived (receive time - `pt`)."""

    channel: str
    event: Event
    latency_ns: int
    #: The decoded JSON object, when the session keeps it (`keep_raw=True`).
    raw: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    @property
    def seq(self) -> int:
        return self.event.seq

    @property
    def epoch(self) -> str:
        return self.event.epoch


@dataclass(frozen=True, slots=True)
class EventBatch:
    """Consecutive new events of one channel and epoch, from one server frame.

    Iterating gives `Received` items; `to_numpy()` gives the batch as numpy columns.
    """

    channel: str
    epoch: str
    events: tuple[Event, ...]
    received_ns: int
    #: The server dropped older quotes/bars in favour of these (a `conflated` Gap came first).
    conflated: bool = False
    raw: tuple[dict[str, Any], ...] | None = field(default=None, compare=False, repr=False)
    #: A throttled subscription (`max_hz`): the seqs just before these that they superseded.
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.events)

    def __iter__(self) -> Iterator[Received]:
        now, ch = self.received_ns, self.channel
        if self.raw is None:
            for e in self.events:
                yield Received(ch, e, now - e.pt)
        else:
            for e, raw in zip(self.events, self.raw, strict=True):
                yield Received(ch, e, now - e.pt, raw)

    def latencies_ns(self) -> list[int]:
        """Publish → receive latency of each event, in nanoseconds."""
        now = self.received_ns
        return [now - e.pt for e in self.events]

    def to_numpy(self) -> dict[str, Any]:
        """The events as numpy columns (see `tickwire.clients.columns.events_to_numpy`)."""
        from tickwire.clients.columns import events_to_numpy

        return events_to_numpy(self.events)


@dataclass(frozen=True, slots=True)
class Gap:
    """Seqs `from_seq..to_seq` (inclusive) of `channel` will not be delivered, and why."""

    channel: str
    from_seq: int
    to_seq: int
    reason: str

    @property
    def count(self) -> int:
        return self.to_seq - self.from_seq + 1


@dataclass(frozen=True, slots=True)
class Reset:
    """The channel's stream was lost and recreated: what follows is `epoch`, seqs start anew."""

    channel: str
    epoch: str


@dataclass(frozen=True, slots=True)
class Status:
    """The server lost (`"down"`) or regained (`"up"`) Redis; live events pause meanwhile."""

    redis: str

    @property
    def redis_up(self) -> bool:
        return self.redis == "up"


@dataclass(frozen=True, slots=True)
class Heartbeat:
    ts: int
    last: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class Welcome:
    protocol: int
    server: str
    heartbeat_ms: int
    limits: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Subscribed:
    id: RequestId | None
    channels: tuple[str, ...]
    #: Where the server started each channel this request placed (see `ClientSession`): the
    #: resume point of a channel until its first event arrives. Epoch "": nothing stored yet.
    positions: Mapping[str, Position] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Unsubscribed:
    id: RequestId | None
    channels: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Pong:
    id: RequestId | None
    ts: int


@dataclass(frozen=True, slots=True)
class ChannelList:
    id: RequestId | None
    channels: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ResumeNeeded:
    """Action for the caller: events were lost on this connection; reconnect to resume them."""

    channels: tuple[str, ...]
    reason: str


Message = (
    EventBatch
    | Gap
    | Reset
    | Status
    | Heartbeat
    | Welcome
    | Subscribed
    | Unsubscribed
    | Pong
    | ChannelList
    | ServerError
    | ResumeNeeded
)


def event_to_dict(event: Event) -> dict[str, Any]:
    """The event's wire form as a dict, keys in wire order (what the server sent, less extras)."""
    doc: dict[str, Any] = {
        "v": event.v,
        "type": event.type,
        "sym": event.sym,
        "ts": event.ts,
        "pt": event.pt,
    }
    for name in FIELDS_OF[event.type]:
        value = getattr(event, name)
        if value is not None:  # None: a field a projected subscription did not ask for
            doc[name] = value
    doc["epoch"] = event.epoch
    doc["seq"] = event.seq
    return doc
