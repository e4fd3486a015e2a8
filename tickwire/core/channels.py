"""Channel names (`trades:BTC-USD`), symbol validation and the Redis keys behind them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

from tickwire.core.errors import ChannelError, UnknownChannelType

#: Channel types and the event `type` each carries.
BAR_INTERVALS = ("1s", "1m")
CHANNEL_TYPES: tuple[str, ...] = ("quotes", "trades", *(f"bars.{i}" for i in BAR_INTERVALS))
EVENT_TYPE_OF: dict[str, str] = {
    "quotes": "quote",
    "trades": "trade",
    **{f"bars.{i}": "bar" for i in BAR_INTERVALS},
}

# Upper-case letters and digits with `.`, `-`, `_`, `/` inside: covers tickers (BRK.B), pairs
# (BTC-USD, EUR/USD) and futures codes, and leaves out what would break keys or patterns
# (`{`, `}`, `:`, `*`, whitespace).
_SYMBOL_RE = re.compile(r"^[A-Z0-9](?:[A-Z0-9._/-]{0,30}[A-Z0-9])?$")
WILDCARD = "*"
KEY_PREFIX = "tw"
#: Redis set holding every channel that has ever been published (for `list` and wildcards).
REGISTRY_KEY = f"{KEY_PREFIX}:channels"


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


def validate_type(kind: str) -> str:
    if kind not in EVENT_TYPE_OF:
        raise UnknownChannelType(
            f"unknown channel type {kind!r}: expected one of {', '.join(CHANNEL_TYPES)}"
        )
    return kind


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
        return EVENT_TYPE_OF[self.kind]

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
