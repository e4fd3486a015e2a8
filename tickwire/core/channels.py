"""Channel names (`trades:BTC-USD`), symbol validation and the Redis keys behind them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

from tickwire.core.errors import BarIntervalError, ChannelError, UnknownChannelType

#: Bar intervals a feed precomputes (the simulator's `--bars`); any other interval of the
#: grammar below is made on demand by `tickwire bars` from the stored trades.
BAR_INTERVALS = ("1s", "1m")
#: Channel types with a fixed name, and the event `type` each carries. Besides these, every
#: `bars.<interval>` of the bar interval grammar is a channel type (`bar_interval_ns`).
CHANNEL_TYPES: tuple[str, ...] = ("quotes", "trades", *(f"bars.{i}" for i in BAR_INTERVALS))
EVENT_TYPE_OF: dict[str, str] = {
    "quotes": "quote",
    "trades": "trade",
    **{f"bars.{i}": "bar" for i in BAR_INTERVALS},
}
BAR_PREFIX = "bars."

# -- bar intervals: `<N><unit>`, N a positive integer without leading zeros, unit ms|s|m|h|d,
# written with the largest unit that divides it (1000ms is `1s`, 90s is `90s`, 60m is `1h`),
# from 100 ms to 1 d.
_UNIT_NS = {
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
    "d": 86_400_000_000_000,
}
_INTERVAL_RE = re.compile(r"^([1-9][0-9]{0,8})(ms|s|m|h|d)$")
MIN_BAR_NS = 100 * _UNIT_NS["ms"]
MAX_BAR_NS = _UNIT_NS["d"]
#: The grammar in words, for error messages and docs.
BAR_GRAMMAR = (
    "bars.<N><unit>: N a positive integer, unit ms, s, m, h or d, from 100ms to 1d, "
    "in the largest unit that divides it (e.g. bars.250ms, bars.5s, bars.15m, bars.4h)"
)

# Upper-case letters and digits with `.`, `-`, `_`, `/` inside: covers tickers (BRK.B), pairs
# (BTC-USD, EUR/USD) and futures codes, and leaves out what would break keys or patterns
# (`{`, `}`, `:`, `*`, whitespace).
_SYMBOL_RE = re.compile(r"^[A-Z0-9](?:[A-Z0-9._/-]{0,30}[A-Z0-9])?$")
WILDCARD = "*"
KEY_PREFIX = "tw"
#: Redis set holding every channel that has ever been published (for `list` and wildcards).
REGISTRY_KEY = f"{KEY_PREFIX}:channels"
#: Redis sorted set of the on-demand bar patterns servers have subscribers for (`bars.5s:*`,
#: `bars.250ms:BTC-USD`), each scored with the time (ms since 1970) its demand lapses. Servers
#: raise the score while subscribers stay; `tickwire bars` makes what has a score in the future.
BAR_DEMAND_KEY = f"{KEY_PREFIX}:bars:demand"


def bar_writer_key(channel: Channel) -> str:
    """The lease naming the one `tickwire bars` process that writes an on-demand bar channel
    (in the symbol's slot, beside its streams)."""
    return f"{channel.stream_key}:writer"


def live_channel(db: int) -> str:
    """The pub/sub channel on which every append is pushed, live, to the servers.

    Pub/sub ignores the database number, so it is in the name: deployments sharing one Redis
    on different databases never see each other's events.
    """
    return f"{KEY_PREFIX}:live:{db}"


def validate_symbol(symbol: str) -> str:
    """Return `symbol` if valid, else raise ChannelError saying why."""
    if not isinstance(symbol, str) or not _SYMBOL_RE.match(symbol):
        raise ChannelError(
            f"invalid symbol {symbol!r}: use 1-32 characters A-Z 0-9 . - _ /, "
            "starting and ending with a letter or digit"
        )
    return symbol


def canonical_interval(ns: int) -> str:
    """The interval's name: `ns` in the largest unit that divides it (250 ms → `250ms`)."""
    for unit in ("d", "h", "m", "s", "ms"):
        if ns % _UNIT_NS[unit] == 0:
            return f"{ns // _UNIT_NS[unit]}{unit}"
    raise BarIntervalError(f"bar interval of {ns} ns is not a whole number of milliseconds")


def bar_interval_ns(interval: str) -> int:
    """Length in ns of a bar interval (`250ms`, `5s`, `15m`), BarIntervalError if the grammar or
    the bounds refuse it."""
    match = _INTERVAL_RE.match(interval) if isinstance(interval, str) else None
    if match is None:
        raise BarIntervalError(f"invalid bar interval {interval!r}: use {BAR_GRAMMAR}")
    ns = int(match[1]) * _UNIT_NS[match[2]]
    if not MIN_BAR_NS <= ns <= MAX_BAR_NS:
        raise BarIntervalError(
            f"bar interval {interval!r} is out of bounds: from 100ms to 1d ({BAR_GRAMMAR})"
        )
    name = canonical_interval(ns)
    if name != interval:
        raise BarIntervalError(f"bar interval {interval!r} is written {name!r}: bars.{name}")
    return ns


def is_bar_kind(kind: str) -> bool:
    return kind.startswith(BAR_PREFIX)


def is_on_demand(kind: str) -> bool:
    """A bar channel type that no feed precomputes: `tickwire bars` makes it when asked."""
    return is_bar_kind(kind) and kind not in EVENT_TYPE_OF


def event_type_of(kind: str) -> str:
    """The event `type` a (valid) channel type carries."""
    return EVENT_TYPE_OF.get(kind) or "bar"


def validate_type(kind: str) -> str:
    """Return `kind` if it is a channel type; BarIntervalError for a `bars.` type whose
    interval is not valid, UnknownChannelType for anything else unknown."""
    if kind in EVENT_TYPE_OF:
        return kind
    if isinstance(kind, str) and is_bar_kind(kind):
        bar_interval_ns(kind[len(BAR_PREFIX) :])
        return kind
    raise UnknownChannelType(
        f"unknown channel type {kind!r}: expected one of {', '.join(CHANNEL_TYPES)} "
        f"or another bar interval ({BAR_GRAMMAR})"
    )


class Channel(NamedTuple):
    """A concrete channel: one event type of one symbol, one Redis stream."""

    # A tuple, not a dataclass: channels are dict keys on the fan-out path (several lookups per
    # delivery), and a tuple hashes in C; a Python `__hash__` cost 2x per lookup.
    kind: str
    symbol: str

    @classmethod
    def parse(cls, name: str) -> Channel:
        kind, symbol = _split(name)
        if symbol == WILDCARD:
            raise ChannelError(f"{name!r} is a pattern, not a concrete channel")
        return cls(validate_type(kind), validate_symbol(symbol))

    @classmethod
    def of(cls, kind: str, symbol: str) -> Channel:
        return cls(validate_type(kind), validate_symbol(symbol))

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.symbol}"

    @property
    def stream_key(self) -> str:
        # The hash tag puts every stream of a symbol in one Redis Cluster slot.
        return f"{KEY_PREFIX}:{{{self.symbol}}}:{self.kind}"

    @property
    def meta_key(self) -> str:
        """Hash holding the channel's `seq` counter and `epoch` (same slot as the stream)."""
        return f"{self.stream_key}:meta"

    @property
    def event_type(self) -> str:
        return event_type_of(self.kind)

    def __str__(self) -> str:
        return self.name


def channel_from_key(key: str) -> Channel:
    """Inverse of Channel.stream_key."""
    prefix = f"{KEY_PREFIX}:{{"
    if not key.startswith(prefix) or "}:" not in key:
        raise ChannelError(f"not a tickwire stream key: {key!r}")
    symbol, _, kind = key[len(prefix) :].partition("}:")
    return Channel.of(kind, symbol)


@dataclass(frozen=True, slots=True)
class ChannelPattern:
    """What a client subscribes to: a concrete channel or `<type>:*` (every symbol, now and later)."""

    kind: str
    symbol: str  # a symbol or WILDCARD

    @classmethod
    def parse(cls, name: str) -> ChannelPattern:
        kind, symbol = _split(name)
        validate_type(kind)
        if symbol != WILDCARD:
            validate_symbol(symbol)
        return cls(kind, symbol)

    @property
    def is_wildcard(self) -> bool:
        return self.symbol == WILDCARD

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.symbol}"

    def matches(self, channel: Channel) -> bool:
        return channel.kind == self.kind and (self.is_wildcard or channel.symbol == self.symbol)

    def as_channel(self) -> Channel:
        if self.is_wildcard:
            raise ChannelError(f"{self.name!r} is a pattern, not a concrete channel")
        return Channel(self.kind, self.symbol)

    def __str__(self) -> str:
        return self.name


def _split(name: str) -> tuple[str, str]:
    if not isinstance(name, str):
        raise ChannelError(f"channel must be a string, got {type(name).__name__}")
    kind, sep, symbol = name.partition(":")
    if not sep or not kind or not symbol:
        raise ChannelError(
            f"invalid channel {name!r}: expected <type>:<symbol>, e.g. trades:BTC-USD"
        )
    return kind, symbol
