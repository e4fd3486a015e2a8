"""Replay recorded NDJSON events with their original spacing, and record streams to such files."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson

from tickwire.core.channels import REGISTRY_KEY, Channel, ChannelPattern
from tickwire.core.errors import ChannelError, ReplayError
from tickwire.core.events import FIELDS_OF, encode_body
from tickwire.core.redis_target import RedisLink
from tickwire.core.stream import EVENT_FIELD, seq_of
from tickwire.feeds.publisher import Publisher

log = logging.getLogger("tickwire.feeds.replay")


@dataclass(frozen=True, slots=True)
class RecordedEvent:
    channel: Channel
    ts: int
    fields: dict[str, Any]


def parse_line(line: bytes) -> RecordedEvent:
    """One NDJSON line → RecordedEvent; ValueError says what is wrong."""
    try:
        doc = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    etype = doc.get("type")
    if etype not in FIELDS_OF:
        raise ValueError(f"unknown event type {etype!r}")
    ts = doc.get("ts")
    if not isinstance(ts, int) or isinstance(ts, bool):
        raise ValueError("missing or non-integer 'ts'")
    names = FIELDS_OF[etype]
    missing = [n for n in names if n not in doc]
    if missing:
        raise ValueError(f"{etype} lacks {', '.join(missing)}")
    kind = f"bars.{doc['interval']}" if etype == "bar" else f"{etype}s"
    try:
        channel = Channel.of(kind, doc.get("sym"))  # type: ignore[arg-type]
    except ChannelError as exc:
        raise ValueError(str(exc)) from None
    return RecordedEvent(channel, ts, {n: doc[n] for n in names})


def read_recording(path: str | Path, *, skip_bad: bool = False) -> Iterator[RecordedEvent]:
    """Events of a file in order; a bad line raises ReplayError (or is skipped and counted)."""
    bad = 0
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield parse_line(line)
            except ValueError as exc:
                if not skip_bad:
                    raise ReplayError(str(path), lineno, str(exc)) from None
                bad += 1
                log.warning("%s:%d: skipped: %s", path, lineno, exc)
    if bad:
        log.warning("%s: skipped %d bad lines", path, bad)


async def replay(
    publisher: Publisher,
    path: str | Path,
    *,
    speed: float | None = 1.0,
    skip_bad: bool = False,
    monotonic: Callable[[], float] = time.monotonic,
    batch_window_s: float = 0.001,
) -> int:
    """Republish a recording; `speed` None means as fast as possible. Returns events sent."""
    t0 = monotonic()
    first_ts: int | None = None
    batch: dict[Channel, list[RecordedEvent]] = {}
    batch_due = 0.0
    sent = 0

    async def send() -> None:
        nonlocal batch, sent
        if not batch:
            return
        while (wait := batch_due - monotonic()) > 0:  # noqa: ASYNC110 - a deadline, no event
            # Never early: uvloop's timers have millisecond resolution and can fire up to a
            # millisecond before the time asked; sleeping below 1 ms would spin (FACTS.md).
            await asyncio.sleep(max(wait, 0.001))
        pt = publisher.clock_ns()
        await publisher.publish(
            {
                ch: [encode_body(ch.event_type, ch.symbol, e.ts, pt, e.fields) for e in events]
                for ch, events in batch.items()
            }
        )
        sent += sum(len(b) for b in batch.values())
        batch = {}

    for ev in read_recording(path, skip_bad=skip_bad):
        if first_ts is None:
            first_ts = ev.ts
        due = t0 + ((ev.ts - first_ts) / 1e9 / speed if speed else 0.0)
        if batch and due - batch_due > batch_window_s:
            await send()
        if not batch:
            batch_due = due
        batch.setdefault(ev.channel, []).append(ev)
    await send()
    await publisher.flush()
    return sent


async def resolve_channels(conn: RedisLink, names: list[str]) -> list[Channel]:
    """Concrete channels for names that may contain `<type>:*` patterns."""
    patterns = [ChannelPattern.parse(n) for n in names]
    if any(p.is_wildcard for p in patterns):
        known = [Channel.parse(m.decode()) for m in await conn.execute("SMEMBERS", REGISTRY_KEY)]
    else:
        known = []
    out: list[Channel] = []
    for p in patterns:
        for ch in sorted(known, key=str) if p.is_wildcard else [p.as_channel()]:
            if p.matches(ch) and ch not in out:
                out.append(ch)
    return out


async def record(conn: RedisLink, channels: list[Channel], out: IO[bytes], page: int = 1000) -> int:
    """Write every stored event of `channels` to `out` as NDJSON, channel by channel."""
    written = 0
    for ch in channels:
        start = b"-"
        while True:
            entries = await conn.execute("XRANGE", ch.stream_key, start, "+", "COUNT", page)
            for _entry_id, fields in entries:
                out.write(_field(fields) + b"\n")
            written += len(entries)
            if len(entries) < page:
                break
            start = b"(%d-0" % seq_of(entries[-1][0])
    return written


def _field(fields: list[bytes]) -> bytes:
    for i in range(0, len(fields) - 1, 2):
        if fields[i] == EVENT_FIELD:
            return fields[i + 1]
    raise ReplayError("<stream>", 0, "stream entry without event field")
