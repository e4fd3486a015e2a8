"""Snapshot and resume: replay a client's missed events from Redis, then join it to the live stream.

While a channel is caught up, live batches for it are held on the subscriber (the hub does that
once `holding[channel]` exists). History is read in bounded pages, each written before the next is
read (backpressure), up to the stream's end; then the held live batches are added. The outbox cuts
what overlaps and announces what is missing, so the join has no hole and no duplicate.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

from tickwire.core.channels import Channel
from tickwire.core.errors import RedisUnavailable
from tickwire.server.hub import Subscriber
from tickwire.server.reader import History

log = logging.getLogger("tickwire.server.catchup")
T = TypeVar("T")
PAGE = 1000
#: A target that wants no snapshot and no resume: the events published from now on. It matters
#: for a channel the reader does not follow yet: the reader starts it where it stands when it
#: gets round to it, and what was published in between is replayed from here.
FROM_NOW: tuple[str, int] = ("", -1)


async def _retrying(op: Callable[[], Awaitable[T]]) -> T:
    """Retry a history read until Redis answers (the connection is closed when its client goes)."""
    delay = 0.05
    while True:
        try:
            return await op()
        except RedisUnavailable:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


async def catch_up(
    sub: Subscriber,
    history: History,
    targets: Mapping[Channel, tuple[str, int] | None],
    *,
    max_events: int,
    wait_writable: Callable[[], Awaitable[None]],
    read_position: Callable[[Channel], int | None],
    on_positioned: Callable[[], None] | None = None,
) -> None:
    """Replay for each channel: after `(epoch, seq)` for a resume, or the latest event (None).

    The caller has already put an empty hold list in `sub.holding` for every channel.
    `on_positioned` runs once the starting point of every channel is read from Redis (the
    server acknowledges the subscribe then, so a snapshot is the latest event as of the ack).
    """
    pending = set(targets)
    try:
        metas = await _retrying(lambda: history.metas(list(targets)))
        starts = {c: _start(sub, c, resume, metas[c], max_events) for c, resume in targets.items()}
        if on_positioned is not None:
            # Positions are fixed: what is published from now on follows the snapshot/resume.
            on_positioned()
        for channel, after in starts.items():
            await _read_until_live(sub, history, channel, after, wait_writable, read_position)
            _join_live(sub, channel)
            pending.discard(channel)
    finally:
        for channel in pending:  # cancelled (unsubscribe or disconnect): nothing to join
            sub.holding.pop(channel, None)


def _start(
    sub: Subscriber,
    channel: Channel,
    resume: tuple[str, int] | None,
    meta: tuple[str, int, int] | None,
    max_events: int,
) -> int:
    """Set the client's position on `channel`; return the seq after which to replay."""
    outbox = sub.outbox
    current = outbox.positions.get(channel)
    if current is not None:
        # This connection already follows the channel and has events queued or sent: they
        # reach it in order, so a snapshot is moot and a resume must not rewind (it would
        # duplicate them, or announce a gap over events it got).
        return current[1]
    if resume is FROM_NOW:
        if meta is not None:
            outbox.expect(channel, meta[0], meta[1])
            return meta[1]
        return 0
    if meta is None:
        # Nothing stored yet. A resume position still lets the outbox announce a reset when the
        # channel comes back in another epoch.
        if resume is not None:
            outbox.expect(channel, *resume)
        return 0
    epoch, last, start = meta
    if resume is None:
        after = max(last - 1, start - 1)
        outbox.expect(channel, epoch, after)
    elif resume[0] == epoch and resume[1] <= last:
        after = resume[1]
        outbox.expect(channel, epoch, after)
    else:
        # Another epoch, or a seq this epoch never reached (Redis lost it): start over.
        after = start - 1
        outbox.reset(channel, epoch, after)
    if last - after > max_events:
        skip_to = last - max_events
        outbox.gap(channel, after + 1, skip_to, "resume_limit")
        after = skip_to
    return after


async def _read_until_live(
    sub: Subscriber,
    history: History,
    channel: Channel,
    after: int,
    wait_writable: Callable[[], Awaitable[None]],
    read_position: Callable[[Channel], int | None],
) -> None:
    """Replay pages until the replay reaches the reader's position for the channel.

    Everything the reader dispatches from now on is held, so once history covers up to where the
    reader stands (it may have started a newly live channel past events no one dispatched), the
    replay and the held batches together leave no hole.
    """
    while True:
        batches = await _retrying(lambda a=after: history.range(channel, a, PAGE))  # type: ignore[misc]
        for batch in batches:
            sub.outbox.add(batch)
        if batches:
            after = batches[-1].last_seq
            sub.flush()
        if sum(len(b.events) for b in batches) >= PAGE:
            await wait_writable()
            continue
        position = read_position(channel)
        if position is not None and position <= after:
            return
        if position is None:
            await asyncio.sleep(0.005)  # the reader has not started this channel yet


def _join_live(sub: Subscriber, channel: Channel) -> None:
    for batch in sub.holding.pop(channel, []):
        sub.outbox.add(batch)
    sub.flush()
