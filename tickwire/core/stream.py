"""How an event sits in a Redis stream: entry ID `<seq>-0`, the encoded bytes in field `d`."""

from __future__ import annotations

#: Field under which a stream entry keeps the encoded event bytes.
EVENT_FIELD = b"d"


def entry_id(seq: int) -> bytes:
    return b"%d-0" % seq


def seq_of(entry_id: bytes) -> int:
    """The event's seq from its stream entry ID (`1041-0` → 1041)."""
    return int(entry_id.partition(b"-")[0])
