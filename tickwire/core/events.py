"""The versioned event model (quote, trade, bar) and its JSON codec.

Wire form of one event (schema v1), keys in this order:

    {"v":1,"type":"trade","sym":"BTC-USD","ts":<venue ns>,"pt":<publish ns>,
     ...type fields...,"epoch":"<stream epoch>","seq":<dense per-channel seq>}

Prices and sizes are JSON numbers already rounded to the instrument's tick (or lot): the
publisher rounds them so that the shortest round-trip form has no binary noise (`64123.5`,
never `64123.50000000001`). `epoch` and `seq` are appended inside Redis, atomically with the
append, which is why they come last: the publisher encodes the body once, without the closing
brace, and the store completes it (see `tickwire.feeds.publisher`).

A subscription with `fields` (projection) gets events without the type fields it did not ask
for; decoded, those fields are None. The common fields are always there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import orjson

from tickwire.core.errors import CodecError

SCHEMA_VERSION = 1

QUOTE_FIELDS = ("bid", "bid_size", "ask", "ask_size")
TRADE_FIELDS = ("price", "size", "side", "trade_id")
BAR_FIELDS = (
    "interval",
    "open",
    "high",
    "low",
    "close",
    "volume",
    "vwap",
    "trades",
    "start",
    "end",
)
FIELDS_OF: dict[str, tuple[str, ...]] = {
    "quote": QUOTE_FIELDS,
    "trade": TRADE_FIELDS,
    "bar": BAR_FIELDS,
}
#: Keys every stored event carries besides its type fields.
COMMON_FIELDS = ("v", "type", "sym", "ts", "pt", "epoch", "seq")


@dataclass(frozen=True, slots=True)
class Event:
    """Fields every event carries."""

    type: ClassVar[str] = ""
    sym: str
    ts: int
    pt: int
    seq: int
    epoch: str
    v: int

    @property
    def channel_name(self) -> str:
        return f"{self.type}s:{self.sym}"


@dataclass(frozen=True, slots=True)
class Quote(Event):
    type: ClassVar[str] = "quote"
    bid: float | None
    bid_size: float | None
    ask: float | None
    ask_size: float | None


@dataclass(frozen=True, slots=True)
class Trade(Event):
    type: ClassVar[str] = "trade"
    price: float | None
    size: float | None
    side: str | None
    trade_id: int | None


@dataclass(frozen=True, slots=True)
class Bar(Event):
    type: ClassVar[str] = "bar"
    interval: str
    open: float | None
    high: float | None
    low: float | None
    close: float | None
    volume: float | None
    vwap: float | None
    trades: int | None
    start: int | None
    end: int | None

    @property
    def channel_name(self) -> str:
        return f"bars.{self.interval}:{self.sym}"


#: The keys `event_from_dict` requires of every event.
COMMON_KEYS = ("sym", "ts", "pt", "seq", "epoch", "v")

EVENT_CLASSES: dict[str, type[Event]] = {"quote": Quote, "trade": Trade, "bar": Bar}


def encode_body(event_type: str, sym: str, ts: int, pt: int, fields: dict[str, Any]) -> bytes:
    """Encode an event without `epoch`/`seq` and without its closing brace.

    The store appends `,"epoch":"…","seq":N}` when it assigns the sequence number. Every field
    of the type is required (CodecError names the missing ones); extra fields are allowed, since
    fields are only ever added within a schema version.
    """
    required = FIELDS_OF.get(event_type)
    if required is None:
        raise CodecError(f"unknown event type {event_type!r}: expected quote, trade or bar")
    missing = [f for f in required if f not in fields]
    if missing:
        raise CodecError(f"{event_type} event lacks {', '.join(missing)}")
    doc: dict[str, Any] = {"v": SCHEMA_VERSION, "type": event_type, "sym": sym, "ts": ts, "pt": pt}
    doc.update(fields)
    return orjson.dumps(doc)[:-1]


def event_from_dict(doc: Any) -> Event:
    """Build a typed event from a decoded JSON object; CodecError says what is wrong."""
    if not isinstance(doc, dict):
        raise CodecError(f"event must be a JSON object, got {type(doc).__name__}")
    cls = EVENT_CLASSES.get(doc.get("type"))  # type: ignore[arg-type]
    if cls is None:
        raise CodecError(f"unknown event type {doc.get('type')!r}")
    v = doc.get("v")
    if not isinstance(v, int) or v < 1:
        raise CodecError(f"missing or invalid schema version v={v!r}")
    # Every event has the common fields (and a bar its `interval`, which names its channel); a
    # projected one lacks the type fields its subscription did not ask for: they are None.
    required = ("sym", "ts", "pt", "seq", "epoch", "v", "interval") if cls is Bar else COMMON_KEYS
    missing = [name for name in required if name not in doc]
    if missing:
        raise CodecError(f"{cls.type} event lacks field {missing[0]!r}")
    values: dict[str, Any] = {name: doc.get(name) for name in FIELDS_OF[cls.type]}
    values.update((name, doc[name]) for name in required)
    return cls(**values)


def decode_event(data: bytes | str) -> Event:
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise CodecError(f"not valid JSON: {exc}") from None
    return event_from_dict(doc)


def tick_decimals(tick: float) -> int:
    """Decimal places needed to write multiples of `tick` exactly (0.25 → 2, 0.5 → 1, 1 → 0)."""
    text = f"{tick:.12f}".rstrip("0")
    return len(text.split(".")[1]) if "." in text else 0
