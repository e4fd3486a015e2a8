"""How events sit in Redis: the stored bytes and their tail, the entry ID, and the live push.

- A stream entry: ID `<seq>-0`, the event's encoded bytes in field `d` (`EVENT_FIELD`).
- A stored event is its body (`tickwire.core.events.encode_body`: the JSON object without its
  closing brace) and the tail `,"epoch":"<epoch>","seq":<seq>}` (`TAIL_HEAD`, `TAIL_SEQ`), which
  the publisher predicts and the append script checks or writes (`tickwire.feeds.store`: it cuts a
  wrong prediction of `TAIL_FIXED` + len(epoch) + len(seq) bytes).
- The live push of one append call: for each batch it stored, a head line `<stream key> <epoch>
  <first seq> <count>` then its `count` events, one per line (orjson never writes a raw newline).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

#: Field under which a stream entry keeps the encoded event bytes.
EVENT_FIELD = b"d"


class StreamPosition(NamedTuple):
    """Where a channel's stream stands for someone: the last `seq` in `epoch` (seq 0: before
    the first event). Epoch "": the channel had no stored event yet, so whatever epoch comes
    first continues it. A plain tuple underneath: hot paths store one per batch, not per
    subscriber (`tickwire.server.batch.Batch.end`)."""

    epoch: str
    seq: int


#: The tail of a stored event: TAIL_HEAD + epoch + TAIL_SEQ + seq + b"}".
TAIL_HEAD = b',"epoch":"'
TAIL_SEQ = b'","seq":'
#: Bytes of the tail besides the epoch and the seq's digits (the append script's constant).
TAIL_FIXED = len(TAIL_HEAD) + len(TAIL_SEQ) + 1


@functools.lru_cache(maxsize=4096)
def stored_tail(epoch: str) -> bytes:
    """A stored event's tail in `epoch`, up to its seq."""
    return TAIL_HEAD + epoch.encode() + TAIL_SEQ


def complete_bodies(bodies: Sequence[bytes], epoch: str, first_seq: int) -> list[bytes]:
    """The full event bytes of consecutive bodies from `first_seq`: each with the tail the
    store checks (the publisher writes it, `tickwire.feeds.store`)."""
    tail = stored_tail(epoch)
    return [b"%s%s%d}" % (b, tail, q) for q, b in enumerate(bodies, first_seq)]


def framed_bodies(bodies: Sequence[bytes], epoch: str, first_seq: int) -> list[bytes]:
    """The bodies as RESP bulk strings, completed as `complete_bodies` does (`first_seq` 0:
    bare, as they are)."""
    if not first_seq:
        return [b"$%d\r\n%s\r\n" % (len(b), b) for b in bodies]
    # The completion inlined, not `complete_bodies` then a frame each: a quarter less a body.
    tail = stored_tail(epoch)
    out = []
    for seq, body in enumerate(bodies, first_seq):
        event = b"%s%s%d}" % (body, tail, seq)
        out.append(b"$%d\r\n%s\r\n" % (len(event), event))
    return out


def complete_body(body: bytes, epoch: str, seq: int) -> bytes:
    """One body's full event bytes (tests and in-memory stores)."""
    return complete_bodies([body], epoch, seq)[0]


class PushSection(NamedTuple):
    """One batch of a live push: `events` of the stream `key`, seqs from `first_seq`."""

    key: bytes
    epoch: str
    first_seq: int
    events: list[bytes]


def push_payload(sections: Sequence[PushSection]) -> bytes:
    """A live push as the append script builds it (for tests and other writers)."""
    lines: list[bytes] = []
    for key, epoch, first, events in sections:
        lines.append(b"%s %s %d %d" % (key, epoch.encode(), first, len(events)))
        lines += events
    return b"\n".join(lines)


def parse_push(payload: bytes) -> tuple[list[PushSection], bool]:
    """The sections of a live push, and False if it held something else from some point on
    (the sections before that are still good). A head of three fields is the one-batch push of
    earlier publishers, whose events run to the end."""
    lines = payload.split(b"\n")
    out: list[PushSection] = []
    i = 0
    while i < len(lines):
        try:
            head = lines[i].split(b" ")
            first = int(head[2])
            n = int(head[3]) if len(head) == 4 else len(lines) - i - 1
            if len(head) not in (3, 4) or n < 1 or i + 1 + n > len(lines):
                raise ValueError
            epoch = head[1].decode()
        except (ValueError, IndexError, UnicodeDecodeError):
            return out, False
        out.append(PushSection(head[0], epoch, first, lines[i + 1 : i + 1 + n]))
        i += 1 + n
    return out, True


def entry_id(seq: int) -> bytes:
    return b"%d-0" % seq


def seq_of(entry_id: bytes) -> int:
    """The event's seq from its stream entry ID (`1041-0` → 1041)."""
    return int(entry_id.partition(b"-")[0])


def epoch_of(event: bytes) -> str:
    """The epoch the store wrote into an event's tail (`…,"epoch":"E","seq":N}`), without decoding."""
    i = event.rfind(TAIL_HEAD)
    if i < 0:
        return ""
    i += len(TAIL_HEAD)
    return event[i : event.find(b'"', i)].decode()


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
