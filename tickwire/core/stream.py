"""How an event sits in a Redis stream: entry ID `<seq>-0`, the encoded bytes in field `d`."""

from __future__ import annotations

#: Field under which a stream entry keeps the encoded event bytes.
EVENT_FIELD = b"d"


def entry_id(seq: int) -> bytes:
    return b"%d-0" % seq


def seq_of(entry_id: bytes) -> int:
    """The event's seq from its stream entry ID (`1041-0` → 1041)."""
    return int(entry_id.partition(b"-")[0])


def epoch_of(event: bytes) -> str:
    """The epoch the store wrote into an event's tail (`…,"epoch":"E","seq":N}`), without decoding."""
    i = event.rfind(b',"epoch":"')
    if i < 0:
        return ""
    j = event.find(b'"', i + 10)
    return event[i + 10 : j].decode()


def publish_ns_of(event: bytes) -> int:
    """The publish timestamp `pt` of an encoded event, without decoding it (0 if absent)."""
    i = event.find(b'"pt":')
    if i < 0:
        return 0
    j = event.find(b",", i)
    try:
        return int(event[i + 5 : j])
    except ValueError:
        return 0
