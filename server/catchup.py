"""Snapshot and resume: replay a client's missed events from Redis, then join it to the live stream.

While a channel is caught up, live batches for it are held on the subscriber (the hub does that
once `holding[channel]` exists). History is read in bounded pages, each written before the next is
read (backpressure), up to the stream's end; then the held live batches are added. The outbox cuts
what overlaps and announces what is missing, so the join has no hole and no duplicate.

One `CatchUp` per connection does all of its catch-up work in one task, whatever the client
asks: the starting points of every new target are read first (one meta read for all of them, so a
later subscribe is acknowledged without waiting for an earlier one's long replay), then the
replays, a page at a time. A channel the client unsubscribes from is dropped at once: from then on
no Redis command is issued for it, and the other channels of the same subscribe go on.

On a Redis Cluster with a master down, that master's channels wait aside (their live batches still
held) and are tried again every `DOWN_RETRY_S`, while the rest of the work goes on: a
subscribe naming channels of several masters is acknowledged once those of the masters that are
up are placed, and the others' snapshot or resume follows once their master is back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from tickwire.core.channels import Channel, ChannelPattern
from tickwire.core.commands import NodeDown
from tickwire.core.errors import RedisUnavailable
from tickwire.core.waits import wait_set
from tickwire.server.history import ForeignKey, History
from tickwire.server.hub import Subscriber
from tickwire.server.session import FromNow, Target
from tickwire.server.stored import Meta

log = logging.getLogger("tickwire.server.catchup")
T = TypeVar("T")
PAGE = 1000
#: How often a replay that has reached the stream's end looks again for the reader to follow its
#: channel (it does once the hub says the channel is live: normally the next turn).
FOLLOW_POLL_S = 0.005
#: How long channels of a down cluster master wait before their next try: the cluster connection
#: looks for the master's return as often, and answers for a master it knows down at once.
DOWN_RETRY_S = 0.25

_DROPPED = object()


async def _retrying(op: Callable[[], Awaitable[T]]) -> T:
    """Retry a history read until Redis answers (the connection is closed when its client goes)."""
    delay = 0.05
    while True:
        try:
            return await op()
        except (NodeDown, ForeignKey):
            raise  # the caller sets the channel aside and goes on with the others
        except RedisUnavailable:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


@dataclass(slots=True)
class _Request:
    """One `add`: its channels, the snapshot wildcards still to expand, its callback."""

    channels: set[Channel]
    wildcards: list[ChannelPattern]
    on_positioned: Callable[[list[Channel]], None]


class CatchUp:
    """The catch-up work of one connection: at most one task, channels dropped on unsubscribe.

    `add(targets, on_positioned, wildcards)` holds live batches of every target at once (before
    any await, so none slips past).
    `wildcards` are patterns whose every channel wants a snapshot: they are expanded (`expand`,
    which may read the registry) when the request's turn comes. `on_positioned` runs once the
    starting point of each target is fixed, with the channels it placed that the connection had
    no position on (the server acknowledges the subscribe then, with their positions, so a
    snapshot is the latest event as of the ack).
    """

    def __init__(
        self,
        sub: Subscriber,
        history: History,
        *,
        max_events: int,
        wait_writable: Callable[[], Awaitable[None]],
        read_position: Callable[[Channel], int | None],
        expand: Callable[[list[ChannelPattern]], Awaitable[list[Channel]]],
        conflates: Callable[[Channel], bool] = lambda channel: False,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.sub = sub
        #: Told when the catch-up task fails unexpectedly (None: it is logged): its requests
        #: are owed acknowledgements that will not come.
        self.on_error = on_error
        #: Whether a channel's history is replayed conflated: a throttled subscription's quotes
        #: and bars (`Hub.throttles`) get the latest event of each page read, saying what it
        #: skipped, as live they get the latest at most `max_hz` times a second.
        self.conflates = conflates
        self.expand = expand
        self.history = history
        self.max_events = max_events
        self.wait_writable = wait_writable
        self.read_position = read_position
        #: Targets whose starting point is still to be read, and the callbacks waiting for them.
        self._unpositioned: dict[Channel, Target] = {}
        self._waiting: list[_Request] = []
        #: Positioned channels still to replay, in order, with the seq to replay after.
        self._replays: dict[Channel, int] = {}
        #: Replays past their first page: their next pages go on the bulk lane (`History`).
        self._long: set[Channel] | None = None
        #: Targets and replays of channels whose cluster master is down, tried again at
        #: `_retry_at` (loop time).
        self._down_targets: dict[Channel, Target] = {}
        self._down_replays: dict[Channel, int] = {}
        self._retry_at = 0.0
        #: Set by `add`: wakes the task while it waits for the channels set aside only.
        self._added = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def channels(self) -> set[Channel]:
        """The channels with catch-up work left."""
        return (
            set(self._unpositioned)
            | set(self._replays)
            | set(self._down_targets)
            | set(self._down_replays)
        )

    def add(
        self,
        targets: Mapping[Channel, Target],
        on_positioned: Callable[[list[Channel]], None],
        wildcards: Iterable[ChannelPattern] = (),
    ) -> None:
        for channel, target in targets.items():
            self._want(channel, target)
        self._waiting.append(_Request(set(targets), list(wildcards), on_positioned))
        self._added.set()
        # A task that has returned may not have run its done callback yet: it will look at
        # nothing more, so a new one starts.
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="tickwire-catchup")
            self._task.add_done_callback(self._done)

    def _want(self, channel: Channel, target: Target) -> None:
        # A channel already being replayed keeps its replay: the outbox position it set is
        # where the client stands (`_start` would not rewind it either).
        if channel in self._down_replays:
            return
        if channel not in self._replays:
            self._down_targets.pop(channel, None)
            self.sub.hold_back(channel)
            self._unpositioned[channel] = target

    def drop(self, channels: Iterable[Channel]) -> None:
        """The client no longer follows these channels: stop catching them up, hold nothing."""
        for channel in channels:
            self._unpositioned.pop(channel, None)
            self._replays.pop(channel, None)
            self._down_targets.pop(channel, None)
            self._down_replays.pop(channel, None)
            self._forget_long(channel)
            self.sub.release(channel)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def _forget_long(self, channel: Channel) -> None:
        if self._long is not None:
            self._long.discard(channel)
            if not self._long:
                self._long = None

    def _done(self, task: asyncio.Task[None]) -> None:
        if self._task is task:
            self._task = None
        if not task.cancelled() and (exc := task.exception()) is not None:
            if self.on_error is not None:
                self.on_error(exc)
            else:
                log.error("catch-up failed", exc_info=exc)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                aside = self._down_targets or self._down_replays
                if aside and loop.time() >= self._retry_at:
                    self._try_down_again()
                if self._unpositioned or self._waiting:
                    await self._position()
                    continue
                if not self._replays:
                    if not aside:
                        return
                    self._added.clear()
                    await wait_set(self._added, max(0.0, self._retry_at - loop.time()))
                    continue
                channel, after = next(iter(self._replays.items()))
                try:
                    done, after = await self._replay_page(channel, after)
                except (NodeDown, ForeignKey):
                    # Its master is down, or its stream key holds another type: the others'
                    # replays go on, and it is tried again in a while.
                    if self._replays.pop(channel, None) is not None:
                        self._set_aside({}, {channel: after})
                    continue
                if channel not in self._replays:
                    continue  # dropped while the page was read
                if done:
                    del self._replays[channel]
                    self._forget_long(channel)
                    self.sub.join_live(channel)
                else:
                    self._replays[channel] = after
        finally:
            # Cancelled (the connection goes): nothing to join.
            for channel in self.channels:
                self.sub.release(channel)
            self._unpositioned.clear()
            self._replays.clear()
            self._down_targets.clear()
            self._down_replays.clear()
            self._long = None

    def _set_aside(self, targets: dict[Channel, Target], replays: dict[Channel, int]) -> None:
        """Channels whose master is down wait aside, the rest of the work goes on."""
        if not self._down_targets and not self._down_replays:
            self._retry_at = asyncio.get_running_loop().time() + DOWN_RETRY_S
        self._down_targets.update(targets)
        self._down_replays.update(replays)

    def _try_down_again(self) -> None:
        self._unpositioned.update(self._down_targets)
        # Behind the replays under way: they are the ones that can make progress.
        self._replays.update(self._down_replays)
        self._down_targets.clear()
        self._down_replays.clear()

    async def _position(self) -> None:
        """Fix the starting point of every target waiting for one, then run their callbacks."""
        waiting, self._waiting = self._waiting, []
        for request in waiting:
            if request.wildcards:
                for channel in await self.expand(request.wildcards):
                    if channel not in request.channels:
                        request.channels.add(channel)
                        self._want(channel, None)
        targets = dict(self._unpositioned)
        metas = await _retrying(lambda: self.history.metas(list(targets))) if targets else {}
        positions = self.sub.outbox.positions
        fresh: set[Channel] = set()
        down: dict[Channel, Target] = {}
        for channel, target in targets.items():
            if self._unpositioned.get(channel, _DROPPED) is not target:
                continue  # dropped meanwhile (or dropped and asked for again: next round)
            del self._unpositioned[channel]
            if channel not in metas:
                # Its master is down: the request is acknowledged without it (the client has
                # no position on it from this request) and it is placed once the master is back.
                down[channel] = target
                continue
            if channel not in positions:
                fresh.add(channel)
            self._replays[channel] = _start(
                self.sub, channel, target, metas[channel], self.max_events
            )
        for request in waiting:
            # Only channels this connection had sent nothing of: the others' positions move
            # with what is queued for them.
            request.on_positioned(sorted(request.channels & fresh, key=str))
        if down:
            self._set_aside(down, {})

    async def _replay_page(self, channel: Channel, after: int) -> tuple[bool, int]:
        """Replay one page after `after`; (True, _) once the replay reaches the reader's
        position for the channel.

        Everything the reader dispatches from the moment the hold began is held, so once history
        covers up to where the reader stands (it may have started a newly live channel past
        events no one dispatched), the replay and the held batches together leave no hole.
        """
        sub = self.sub
        # A snapshot, or the first page of a resume, comes before any other client's long
        # replay: only the pages after that share the bulk lane.
        bulk = self._long is not None and channel in self._long
        batches = await _retrying(lambda: self.history.range(channel, after, PAGE, bulk=bulk))
        if channel not in self._replays:
            return False, after
        conflate = bool(batches) and channel.kind != "trades" and self.conflates(channel)
        for batch in batches:
            sub.outbox.add(batch.superseding() if conflate else batch)
        if batches:
            after = batches[-1].last_seq
            sub.flush()
        if sum(len(b.events) for b in batches) >= PAGE:
            if self._long is None:
                self._long = set()
            self._long.add(channel)
            await self.wait_writable()
            return False, after
        position = self.read_position(channel)
        # The reader does not follow the channel yet: wait for it without asking Redis, then
        # read again (it may have started past events published meanwhile).
        while position is None and channel in self._replays:
            await asyncio.sleep(FOLLOW_POLL_S)
            position = self.read_position(channel)
        return position is not None and position <= after, after


def _start(
    sub: Subscriber,
    channel: Channel,
    resume: Target,
    meta: Meta | None,
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
    if isinstance(resume, FromNow):
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
    elif not resume[0]:
        # The client was told the channel had no events yet (`subscribed` positions): it is
        # owed all of them, from the epoch's first; what was trimmed meanwhile is a gap.
        after = start - 1
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
