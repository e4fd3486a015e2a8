"""Field projection: which event keys a subscriber's frames of each channel keep."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from tickwire.core.channels import WILDCARD, Channel, ChannelPattern, event_type_of
from tickwire.core.errors import ProtocolError
from tickwire.core.events import COMMON_FIELDS, FIELDS_OF

#: The keys of an event to keep (type fields asked for, plus `ALWAYS_KEPT`); None: all of them.
Fields = frozenset[str] | None

#: Kept whatever a client asks for: the invariant and resume need `epoch` and `seq`, latency
#: needs `pt`, decoding needs `v`, `type` and `sym`; `ts` says when the venue saw it. A bar's
#: `interval` names its channel (`bars.1s`), and the client's `Bar` needs it. Other types have
#: no `interval`: one set for all types, so that equal requests give equal projections.
ALWAYS_KEPT = frozenset((*COMMON_FIELDS, "interval"))


def parse_fields(value: object, patterns: Iterable[ChannelPattern]) -> Fields:
    """The kept keys of a `subscribe` request's `fields` for its patterns (ProtocolError if a
    field is not one of every pattern's type). None when absent, or when it names every field:
    such a subscription gets the very frames of an unprojected one."""
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(f, str) for f in value):
        raise ProtocolError("bad_request", "'fields' must be a non-empty list of field names")
    asked = frozenset(value)
    every = True
    for pattern in patterns:
        event_type = event_type_of(pattern.kind)
        own = FIELDS_OF[event_type]
        unknown = sorted(f for f in asked if f not in own and f not in COMMON_FIELDS)
        if unknown:
            raise ProtocolError(
                "bad_request",
                f"fields: {', '.join(unknown[:5])} not a field of {pattern.name}"
                f" (its fields: {', '.join(own)})",
            )
        every = every and all(f in asked for f in own)
    return None if every else asked | ALWAYS_KEPT


class Projection:
    """One subscriber's fields per pattern, resolved per channel.

    A channel covered by several of its patterns (`quotes:*` and `quotes:BTC-USD`) keeps the
    union of their fields, and everything if one of them is unprojected.
    """

    __slots__ = ("_of", "fields", "patterns")

    def __init__(
        self, patterns: frozenset[ChannelPattern], fields: Mapping[ChannelPattern, frozenset[str]]
    ) -> None:
        self.patterns = patterns
        self.fields = dict(fields)
        self._of: dict[Channel, Fields] = {}

    def of(self, channel: Channel) -> Fields:
        try:
            return self._of[channel]
        except KeyError:
            pass
        kept: Fields = None
        for pattern in (
            ChannelPattern(channel.kind, channel.symbol),
            ChannelPattern(channel.kind, WILDCARD),
        ):
            if pattern not in self.patterns:
                continue
            own = self.fields.get(pattern)
            if own is None:
                kept = None
                break
            kept = own if kept is None else kept | own
        self._of[channel] = kept
        return kept
