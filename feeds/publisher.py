"""Batches encoded events into Redis Streams: one atomic Lua append per channel, pipelined.

The producer calls `publish()`; a background flusher owns the Redis connection. While Redis is
reachable the producer is held back once `max_pending_events` are waiting (backpressure). While
Redis is down the producer is never blocked: the oldest pending events are dropped past the bound,
counted in `stats.dropped` and logged, never silently.

On a Redis Cluster a master that is down holds only its own slots' channels: their events wait
(held, and past the bound the oldest of them dropped, as above) while the other masters' go on,
and the slot map is asked for again (`ClusterConnection.refresh_soon`) until a replica takes them
over.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tickwire.core.acl import acl_hint
from tickwire.core.channels import REGISTRY_KEY, Channel
from tickwire.core.commands import Command, NodeDown, Packed, RedisReplyError, array_head, bulk
from tickwire.core.config import PublisherConfig
from tickwire.core.errors import RedisUnavailable
from tickwire.core.redis_cluster import CLUSTER_REFRESH_S, ClusterConnection
from tickwire.core.redis_slots import channel_slot
from tickwire.core.redis_target import RedisLink, RedisTopology, live_channel_of
from tickwire.core.redis_wire import RedisConnection
from tickwire.core.stream import StreamPosition, framed_bodies, stored_tail
from tickwire.core.waits import cancel_and_wait
from tickwire.feeds.store import APPEND_LUA

log = logging.getLogger("tickwire.feeds.publisher")
APPEND_SHA = hashlib.sha1(APPEND_LUA.encode()).hexdigest()
#: Events per append call, about: a call of 20 000 events cost Redis 15 % more per event than
#: calls of 100 (the script's tables and strings grow, and so does Lua's garbage collection).
EVENTS_PER_CALL = 1000


def random_epoch() -> str:
    return secrets.token_hex(6)


class RandomEpochs:
    """`random_epoch`s drawn 64 at a time: a flush asks for one (in case it starts a channel's
    epoch), and one system call per flush was 1.5 % of a paced feed's CPU."""

    def __init__(self) -> None:
        self._pool: list[str] = []

    def __call__(self) -> str:
        if not self._pool:
            raw = secrets.token_hex(6 * 64)
            self._pool = [raw[i : i + 12] for i in range(0, len(raw), 12)]
        return self._pool.pop()


@dataclass
class PublisherStats:
    published: int = 0
    dropped: int = 0
    flushes: int = 0
    reconnects: int = 0
    #: Events Redis refused for good, dropped: their channel's stream or meta key holds
    #: another type (see `store`).
    refused: int = 0
    last_error: str | None = None


class Publisher:
    """Appends channel batches to Redis; use `async with Publisher(cfg) as pub:`."""

    def __init__(
        self,
        config: PublisherConfig,
        *,
        new_epoch: Callable[[], str] | None = None,
        clock_ns: Callable[[], int] = time.time_ns,
        publisher_id: str | None = None,
    ) -> None:
        self.config = config
        self.stats = PublisherStats()
        self.clock_ns = clock_ns
        self._new_epoch = new_epoch or RandomEpochs()
        #: Channel batches not yet known to be written, in publish order.
        self._pending: deque[Pending] = deque()
        #: Batches of channels whose cluster master is down, waiting for it or its replica
        #: (oldest first once sorted by `Pending.at`: flushes that failed put theirs back
        #: after later batches were held).
        self._held: list[Pending] = []
        #: `publish` calls so far (`Pending.at`).
        self._publishes = 0
        #: The cluster connection's `generation` when held batches were last released.
        self._generation = 0
        #: Each channel's state in this publisher (see `Lane`).
        self._lanes: dict[Channel, Lane] = {}
        self.id = publisher_id or secrets.token_hex(6)
        self._id_arg = bulk(self.id.encode())
        self._redis = RedisTopology(config.redis_url)
        self._db = self._redis.target.db
        self._pending_events = 0
        self._wakeup = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._idle = asyncio.Event()
        self._idle.set()
        #: The flusher's two waits in which a producer may write flushes itself: for a reply to
        #: a flush (`_in_flight`), and for work with nothing unanswered (`_parked`). Elsewhere
        #: (reconnecting, loading the script, draining after an error) the connection is the
        #: flusher's alone: a write there would put a reply where it reads another.
        self._in_flight = False
        self._parked = False
        #: Flushes written and not yet answered, oldest first.
        self._flights: deque[Flight] = deque()
        self._conn: RedisLink | None = None
        #: The timer of `_watch_replies` while one is armed.
        self._watchdog: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    async def __aenter__(self) -> Publisher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self, *, require_redis: bool = True) -> None:
        """Start the flusher; by default fail fast (RedisUnavailable) if Redis is unreachable now.

        Once started, losing Redis is survived: writes are retried with backoff.
        """
        if require_redis:
            self._use(await self._redis.open())
            self.stats.reconnects += 1
        self._task = asyncio.create_task(self._run(), name="tickwire-publisher")

    @property
    def positions(self) -> dict[Channel, StreamPosition]:
        """The last (epoch, seq) Redis assigned, per channel published to."""
        return {c: lane.position for c, lane in self._lanes.items() if lane.position is not None}

    @property
    def pending_events(self) -> int:
        """Events queued and not yet known to be in Redis."""
        return self._pending_events

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.closed

    async def publish(
        self, batches: Mapping[Channel, Sequence[bytes]] | Iterable[tuple[Channel, Sequence[bytes]]]
    ) -> None:
        """Queue encoded bodies (see `encode_body`) per channel, in order; returns when queued."""
        # `dict` first: an ABC's isinstance check costs a microsecond or two per release.
        items = batches.items() if isinstance(batches, (dict, Mapping)) else batches
        lanes = self._lanes
        at = self._publishes = self._publishes + 1
        for channel, bodies in items:
            if bodies:
                lane = lanes.get(channel)
                if lane is None:
                    lane = lanes[channel] = self._lane(channel)
                first = lane.queued + 1
                lane.queued += len(bodies)
                self._pending.append(Pending(lane, first, first - 1, list(bodies), at))
                self._pending_events += len(bodies)
        self._idle.clear()
        # Write here if a flush may go out (`max_in_flight`): waiting for a reply in flight
        # first cost a live feed ~0.15 ms per batch, and handing an idle flusher the write cost
        # a loop turn per batch (wake it, be woken). Everything written and the flusher parked
        # on one connection: its replies are settled as they arrive (`_on_replies`) and there
        # is nothing to yield for. Otherwise wake the flusher and yield once, so that it reads
        # replies and sends more: a producer that never waits would leave Redis idle until it
        # is done (the publish bench ran encode and append one after the other).
        conn = self._conn
        if conn is not None and not conn.closed and (self._in_flight or self._parked):
            # On a lost connection the flusher requeues what this wrote: its read fails, or,
            # parked, it finds the connection closed when it wakes.
            with contextlib.suppress(RedisUnavailable):
                self._send_flights(conn)
        if not (self._parked and self._listening and not self._pending and self.connected):
            self._wakeup.set()
            await asyncio.sleep(0)
        if self._pending_events > self.config.max_pending_events and self._held:
            # A cluster master is down: its channels' oldest events go, not the others'.
            self._drop_oldest(held=True)
        if self._pending_events > self.config.max_pending_events:
            if self.connected:
                self._space.clear()
                await self._space.wait()
            else:
                self._drop_oldest()

    async def flush(self) -> None:
        """Wait until everything queued so far is in Redis."""
        if self._task is not None and self._task.done():
            self._task.result()
        await self._idle.wait()

    async def close(self) -> None:
        if self._task is None:
            return
        try:
            async with asyncio.timeout(self.config.close_timeout_s):
                await self.flush()
        except TimeoutError:
            pass
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()
            try:
                await cancel_and_wait(self._task)
                # The flusher is gone, the connection this call's alone: a producer still
                # publishing had its flushes cross these replies. Not if it left anything
                # unanswered on it (the replies owed would be taken for these).
                if self._pending_events == 0:
                    await self._forget_marks()
                # Asked again, not `else`: a producer may publish while the marks go.
                if self._pending_events:
                    log.warning("closing with %d events not yet written", self._pending_events)
            finally:
                if self._conn is not None:
                    self._conn.close()
                self._task = None

    async def _forget_marks(self) -> None:
        """Everything is written and nothing will be sent again: drop this publisher's `w:<id>`
        field from each channel's meta, so restarts do not pile fields up (a crash leaves its
        own, a few bytes per channel)."""
        if not self.connected or not self.positions:
            return
        assert self._conn is not None
        with contextlib.suppress(RedisUnavailable):
            await self._conn.pipeline(
                [["HDEL", c.meta_key, f"w:{self.id}"] for c in self.positions], timeout=1.0
            )

    def _drop_oldest(self, *, held: bool = False) -> None:
        """Drop the oldest events past `max_pending_events`: of those pending (Redis is down),
        or only of those `held` (a cluster master is down)."""
        if held:
            self._held.sort(key=_published)
        queue: deque[Pending] = deque(self._held) if held else self._pending
        over = self._pending_events - self.config.max_pending_events
        dropped = 0
        cut: set[Lane] = set()
        while over > 0 and queue:
            item = queue[0]
            if len(item.bodies) <= over:
                queue.popleft()
                n = len(item.bodies)
            else:
                queue[0] = Pending(item.lane, item.first + over, 0, item.bodies[over:], item.at)
                n = over
            cut.add(item.lane)
            over -= n
            dropped += n
        # What now comes first on a channel follows events that will never be written.
        for q in (queue, self._pending) if held else (queue,):
            for i, item in enumerate(q):
                if item.lane in cut:
                    cut.discard(item.lane)
                    q[i] = Pending(item.lane, item.first, 0, item.bodies, item.at)
                    if not cut:
                        break
        if held:
            self._held = list(queue)
        self._pending_events -= dropped
        self.stats.dropped += dropped
        log.warning(
            "%s: dropped %d oldest pending events (%d dropped in total)",
            "A Redis Cluster master is down" if held else "Redis unreachable",
            dropped,
            self.stats.dropped,
        )

    async def _run(self) -> None:
        delay = self.config.backoff_initial_s
        while True:
            conn = self._conn
            if isinstance(conn, ClusterConnection) and not self._flights and not conn.closed:
                self._mend(conn)
            if not self._pending and (not self._flights or self._listener_settles()):
                await self._park()
                continue
            try:
                if not self.connected:
                    # Flushes written on the lost connection (by a producer, while this waited
                    # for work) go again, in front, and so does what a master's loss held.
                    if self._flights:
                        self._requeue()
                    self._release_held()
                    self._use(await self._redis.open())
                    for lane in self._lanes.values():
                        lane.registered = False
                    self.stats.reconnects += 1
                    if self.stats.reconnects > 1:
                        log.info("reconnected to Redis")
                await self._flush_some(self._conn)  # type: ignore[arg-type]
                delay = self.config.backoff_initial_s
            except RedisUnavailable as exc:
                if self._conn is not None:
                    self._conn.close()
                self._space.set()  # never hold the producer back while Redis is away
                if self.stats.last_error != str(exc):
                    log.warning(
                        "%s%s; retrying with backoff (up to %.1f s)",
                        exc,
                        acl_hint(exc),
                        self.config.backoff_max_s,
                    )
                self.stats.last_error = str(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.config.backoff_max_s)
            if self._pending_events <= self.config.max_pending_events:
                self._space.set()

    async def _park(self) -> None:
        """Wait for work. Replies to the flushes a producer writes meanwhile are settled as
        they arrive, by `_on_replies` (one connection), or by this task once woken (a cluster):
        the flusher's two task switches per flush were a fifth of a paced feed's CPU. With a
        cluster master down, wake in time to ask for the slot map again."""
        if not self._flights and not self._held:
            self._idle.set()
        if not self._flights:
            self._space.set()
        self._wakeup.clear()
        self._parked = True
        conn = self._conn
        mending = isinstance(conn, ClusterConnection) and bool(conn.down)
        try:
            if mending:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(CLUSTER_REFRESH_S):
                        await self._wakeup.wait()
            else:
                await self._wakeup.wait()
        finally:
            self._parked = False

    def _mend(self, conn: ClusterConnection) -> None:
        """With a master down, have the slot map asked for again (every `CLUSTER_REFRESH_S`,
        never waiting for it); once a refresh brings a master up (its replica promoted, or
        itself back), what it held goes again."""
        changed = conn.generation != self._generation
        if changed:
            self._generation = conn.generation
            if conn.down:
                log.warning("Redis Cluster masters still down: %s", ", ".join(conn.down.values()))
            else:
                log.info("every Redis Cluster master is up again")
        if changed or not conn.down:  # (not down: e.g. after a reconnect)
            self._release_held()
        if conn.down:
            conn.refresh_soon()

    def _release_held(self) -> None:
        """What a master's loss held goes in front of the queue again, oldest first."""
        if self._held:
            held, self._held = sorted(self._held, key=_published), []
            self._pending.extendleft(reversed(held))
            log.info("writing %d held channel batches", len(held))

    def _watch_replies(self) -> None:
        """Close the connection once the oldest flush has had no reply for `reply_timeout_s`
        (Redis stopped answering), as the flusher's own timed reads would: one timer at a time,
        re-armed for the next oldest flush, not one per flush."""
        self._watchdog = None
        conn, flights = self._conn, self._flights
        if not flights or conn is None or conn.closed:
            return
        age = time.monotonic() - flights[0].sent_at
        timeout = self.config.reply_timeout_s
        if age < timeout:
            self._watchdog = asyncio.get_running_loop().call_later(
                timeout - age, self._watch_replies
            )
            return
        log.warning("no reply from Redis within %.1f s", timeout)
        conn.close()
        self._wakeup.set()

    def _listener_settles(self) -> bool:
        """Whether `_on_replies` settles the flushes in flight: one connection, up, and no
        replies left over for the flusher (errors, or replies that came while it was busy)."""
        conn = self._conn
        return (
            isinstance(conn, RedisConnection)
            and not conn.closed
            and (not self._flights or conn.ready < len(self._flights[0].commands))
        )

    @property
    def _listening(self) -> bool:
        """Replies are settled as they arrive while the flusher is parked (`_on_replies`): on
        one connection, not on a cluster's."""
        return isinstance(self._conn, RedisConnection)

    def _use(self, conn: RedisLink) -> None:
        """Write through `conn` from now on; on one connection, settle replies as they come."""
        if isinstance(self._conn, RedisConnection):
            self._conn.listen(None)  # a closed connection's last callbacks are not ours
        self._conn = conn
        if isinstance(conn, RedisConnection):
            conn.listen(self._on_replies)
        elif isinstance(conn, ClusterConnection):
            self._generation = conn.generation

    def _on_replies(self) -> None:
        """Replies came in (or the connection ended): while the flusher is parked, settle the
        flushes they answer and write what waits; anything else is the flusher's to handle."""
        conn = self._conn
        if not self._parked or not isinstance(conn, RedisConnection):
            return
        flights = self._flights
        try:
            while flights and not conn.closed and conn.ready >= len(flights[0].commands):
                n = len(flights[0].commands)
                if any(isinstance(r, RedisReplyError) for r in conn.peek(n)):
                    break  # the flusher drains and retries, as after its own reads
                self._settle(flights.popleft(), conn.take_ready(n))
            else:
                if conn.closed:
                    self._wakeup.set()
                    return
                if self._pending:
                    self._send_flights(conn)
                if not flights and not self._pending:
                    self._idle.set()
                return
        except RedisUnavailable:
            pass
        except Exception:
            log.exception("settling replies failed; reconnecting")
            conn.close()
        self._wakeup.set()

    async def _flush_some(self, conn: RedisLink) -> None:
        """Write flushes until nothing is pending, up to `max_in_flight` of them unanswered.

        A flush whose replies hold an error is put back whole, in order, with every flush after
        it (appends are idempotent, so what Redis did apply is skipped when written again; an
        append behind a failed one is refused with TWBEHIND rather than applied out of order).
        """
        flights = self._flights
        try:
            while True:
                self._send_flights(conn)
                if not flights:
                    return
                self._in_flight = True
                try:
                    replies = await conn.replies(
                        len(flights[0].commands), timeout=self.config.reply_timeout_s
                    )
                finally:
                    self._in_flight = False
                errors = [r for r in replies if isinstance(r, RedisReplyError)]
                if errors and all(isinstance(e, NodeDown) for e in errors):
                    # A cluster master is down: the others' batches are stored.
                    self._settle_partly(flights.popleft(), replies, errors)
                    continue
                if errors:
                    # Drain the flushes behind it (their replies are on the way), then retry.
                    for later in list(flights)[1:]:
                        await conn.replies(len(later.commands), timeout=self.config.reply_timeout_s)
                    self._requeue()
                    await self._after_errors(conn, errors)
                    return
                self._settle(flights.popleft(), replies)
        except BaseException:
            # Not known to be written: back in front, in order.
            self._requeue()
            raise

    def _send_flights(self, conn: RedisLink) -> None:
        """Write flushes of what is pending while fewer than `max_in_flight` are unanswered."""
        flights = self._flights
        while self._pending and len(flights) < self.config.max_in_flight:
            flight = self._next_flight()
            if not flight.commands:
                return  # all of it held: its master is down
            # In `flights` before it is sent: whatever fails from here puts it back.
            flights.append(flight)
            conn.send(flight.commands)
            if self._listening and self._watchdog is None:
                self._watchdog = asyncio.get_running_loop().call_later(
                    self.config.reply_timeout_s, self._watch_replies
                )

    def _next_flight(self) -> Flight:
        """Take up to `max_events_per_flush` pending events as one flush: one append call."""
        taken: list[Pending] = []
        n = 0
        limit = self.config.max_events_per_flush
        pending = self._pending
        conn = self._conn
        cluster = conn if isinstance(conn, ClusterConnection) and conn.down else None
        while pending and n < limit:
            item = pending.popleft()
            if cluster is not None and cluster.slot_down(item.lane.slot):
                self._held.append(item)
                continue
            taken.append(item)
            n += len(item.bodies)
        # A channel's batches merged in order: its indices run on without a break (its events
        # leave the queue in order; drops take the oldest).
        merged: dict[Lane, Pending] = {}
        for item in taken:
            before = merged.get(item.lane)
            if before is None:
                merged[item.lane] = item
            else:
                merged[item.lane] = Pending(
                    item.lane, before.first, before.prev, before.bodies + item.bodies, before.at
                )
        # The epoch a channel takes if this flush starts a new one. One candidate serves every
        # channel of the flush: epochs identify a channel's history, not a flush.
        candidate = self._new_epoch()
        commands: list[Command] = []
        calls: list[list[Lane]] = []
        order: list[Lane] = []
        counts: list[int] = []
        expected: list[StreamPosition | None] = []
        # Built as RESP from parts framed once (`Lane`) and numbers of a fixed width (the script
        # reads them with tonumber): packing each argument was a sixth of the feed's CPU.
        flush_args = bulk(candidate.encode()) + self._id_arg
        for live, group in self._groups(merged):
            keys: list[bytes] = []
            args: list[bytes] = [flush_args, bulk(live.encode())]
            argc = 3
            for lane in group:
                item = merged[lane]
                bodies = item.bodies
                n = len(bodies)
                keys.append(lane.keys)
                counts.append(n)
                guess = lane.predicted
                seen = lane.position or NOWHERE
                se = seen.epoch.encode()
                # A batch must follow its predecessor only while that one is unanswered: once
                # Redis has acknowledged it, Redis holds it or lost it (a crash, a failover), and
                # a lost one must not hold the channel back for ever with TWBEHIND (the epoch
                # change that comes with the loss tells clients).
                prev = item.prev if item.prev > lane.acked else 0
                head = (lane.maxlen, len(se), se, seen.seq, item.first, prev)
                if guess is None:
                    # No guess (a new channel, or one whose replies are still owed): bare
                    # bodies, tail seq 0, and the script appends the tails.
                    epoch, e, seq = "", b"", 0
                else:
                    epoch, e, seq = guess.epoch, lane.epoch_b, guess.seq + 1
                    lane.predicted = guess = StreamPosition(epoch, seq + n - 1)
                if n == 1 and seq:
                    # A paced feed's usual batch: head and body in one piece.
                    body = b"%s%s%d}" % (bodies[0], lane.tail, seq)
                    args.append(BATCH_ONE % (*head, len(e), e, seq, len(body), body))
                else:
                    args.append(BATCH_HEAD % (*head, n, len(e), e, seq))
                    args += framed_bodies(bodies, epoch, seq)
                argc += 8 + n
                expected.append(guess)
            calls.append(group)
            order += group
            commands.append(
                Packed(
                    b"".join(
                        [
                            array_head(3 + len(keys) * 2 + argc),
                            EVALSHA_HEAD,
                            bulk(b"%d" % (len(keys) * 2)),
                            *keys,
                            *args,
                        ]
                    ),
                    group[0].stream,
                )
            )
        new = [lane for lane in merged if not lane.registered]
        if new:
            commands.append(["SADD", REGISTRY_KEY, *(lane.channel.name for lane in new)])
        return Flight(taken, calls, order, counts, expected, new, commands, time.monotonic())

    def _lane(self, channel: Channel) -> Lane:
        """A channel's lane, its keys and retention framed once (per flush, building them was a
        fifth of the flush's cost)."""
        stream, meta = channel.stream_key.encode(), channel.meta_key.encode()
        maxlen = self.config.retention.maxlen(channel.kind)
        return Lane(
            channel, stream, bulk(stream) + bulk(meta), bulk(b"%d" % maxlen), channel_slot(channel)
        )

    def _groups(self, merged: Mapping[Lane, Pending]) -> list[tuple[str, list[Lane]]]:
        """The live channel and the lanes of each append call: as many as `EVENTS_PER_CALL`
        allows, or, on a Redis Cluster (or `one_call_per_symbol`), one call per hash slot."""
        conn = self._conn
        cluster = isinstance(conn, ClusterConnection)
        if cluster or self.config.one_call_per_symbol:
            by_slot: dict[int, list[Lane]] = {}
            for lane in merged:
                by_slot.setdefault(lane.slot, []).append(lane)
            return [(self._live_channel(conn, slot), group) for slot, group in by_slot.items()]
        live = self._live_channel(conn, 0)
        groups: list[tuple[str, list[Lane]]] = [(live, [])]
        n = 0
        for lane, item in merged.items():
            if n >= EVENTS_PER_CALL:
                groups.append((live, []))
                n = 0
            groups[-1][1].append(lane)
            n += len(item.bodies)
        return groups

    def _live_channel(self, conn: RedisLink | None, slot: int) -> str:
        if conn is None:
            raise RedisUnavailable("not connected")
        return live_channel_of(conn, self._db, slot)

    def _settle(self, flight: Flight, replies: list[Any]) -> None:
        # Every batch stored where its tails said, unless its call's reply says otherwise:
        # (its place in the call, epoch, last seq) for each batch that was not, and (minus its
        # place, Redis's error, 0) for one refused (see `store`). The registry's SADD, if any,
        # answers last.
        told: dict[Lane, tuple[int, bytes, int]] = {}
        for group, reply in zip(flight.calls, replies, strict=False):
            for at, epoch, seq in zip(reply[::3], reply[1::3], reply[2::3], strict=True):
                told[group[abs(at) - 1]] = (at, epoch, seq)
        for lane, guess in zip(flight.lanes, flight.expected, strict=True):
            if guess is not None and lane not in told:
                lane.position = guess
                if lane.refused:
                    self._stored_again(lane)
        refused = 0
        for lane, (at, epoch, seq) in told.items():
            if at < 0:
                refused += self._refuse(lane, flight, epoch.decode())
                continue
            if lane.refused:
                self._stored_again(lane)
            lane.position = actual = StreamPosition(epoch.decode(), seq)
            # Mispredicted (or not predicted): predict again from this reply and what is still
            # in flight on the channel. The flushes in flight were stored right, only slower
            # (the script redid their tails).
            later = sum(
                c
                for f in self._flights
                for other, c in zip(f.lanes, f.counts, strict=True)
                if other is lane
            )
            lane.predict(StreamPosition(actual.epoch, actual.seq + later))
        for item in flight.taken:
            last = item.first + len(item.bodies) - 1
            item.lane.acked = max(item.lane.acked, last)
        events = sum(flight.counts)
        self.stats.published += events - refused
        self._pending_events -= events
        if self._pending_events <= self.config.max_pending_events:
            self._space.set()
        for lane in flight.new:
            lane.registered = True
        self.stats.flushes += 1

    def _settle_partly(
        self, flight: Flight, replies: list[Any], errors: list[RedisReplyError]
    ) -> None:
        """Settle the calls of `flight` that the masters up answered; hold the batches of those
        answered `NodeDown` until their master (or its replica) is up. Redis may have applied
        them: written again, the append skips what it holds."""
        calls = len(flight.calls)
        failed = {
            lane
            for group, reply in zip(flight.calls, replies, strict=False)
            if isinstance(reply, NodeDown)
            for lane in group
        }
        ok = [i for i in range(calls) if not isinstance(replies[i], NodeDown)]
        keep = [i for i, lane in enumerate(flight.lanes) if lane not in failed]
        registered = len(replies) == calls or not isinstance(replies[calls], NodeDown)
        self._settle(
            Flight(
                [item for item in flight.taken if item.lane not in failed],
                [flight.calls[i] for i in ok],
                [flight.lanes[i] for i in keep],
                [flight.counts[i] for i in keep],
                [flight.expected[i] for i in keep],
                flight.new if registered else [],
                [],
                flight.sent_at,
            ),
            [replies[i] for i in ok],
        )
        self._held += [item for item in flight.taken if item.lane in failed]
        for lane in failed:
            # Where Redis left it is known again only from its reply once the master is up.
            lane.predict(lane.position)
        why = str(errors[0])
        if self.stats.last_error != why:
            log.warning(
                "%s; holding its channels' events, the other masters' go on", why.partition(" ")[2]
            )
            self.stats.last_error = why

    def _refuse(self, lane: Lane, flight: Flight, why: str) -> int:
        """Redis refused a lane's batch of `flight` (its stream or meta key holds another
        type): its events are dropped, counted and logged once until it stores again, and the
        lane's later batches neither wait for it nor predict from it. Returns the events."""
        n = flight.counts[flight.lanes.index(lane)]
        self.stats.refused += n
        lane.predict(None)
        if not lane.refused:
            log.error(
                "Redis refused the events of %s, which are dropped until it stores them again "
                "(counted in stats.refused): %s",
                lane.channel.name,
                why,
            )
        lane.refused = True
        return n

    def _stored_again(self, lane: Lane) -> None:
        lane.refused = False
        log.warning("Redis stores the events of %s again", lane.channel.name)

    def _requeue(self) -> None:
        """Every unanswered flush back in front of the queue, in order."""
        items = [item for f in self._flights for item in f.taken]
        self._flights.clear()
        # Nothing in flight now: predict from what Redis has confirmed (a flush that was applied
        # but not answered is checked by the script, and its retry skips what it applied).
        for lane in self._lanes.values():
            lane.predict(lane.position)
        self._pending.extendleft(reversed(items))

    async def _after_errors(self, conn: RedisLink, errors: list[RedisReplyError]) -> None:
        """Redis lost the script (a restart): load it, and the retry goes at once. Anything else
        (OOM, READONLY after a failover, …) raises, and the retry waits for the backoff."""
        text = [str(e) for e in errors]
        if any(t.startswith("NOSCRIPT") for t in text):
            await load_script(conn, APPEND_LUA)
            return
        # TWBEHIND only follows another error in the same round; alone, something removed this
        # publisher's marks, and the backoff keeps it from spinning.
        worst = next((t for t in text if not t.startswith("TWBEHIND")), text[0])
        raise RedisUnavailable(f"append failed: {worst}")


async def load_script(conn: RedisLink, script: str) -> str:
    """Load a script where commands go: the one Redis, or every master of a cluster (each keeps
    its own script cache). Returns its SHA1."""
    if isinstance(conn, ClusterConnection):
        (sha, *_) = await conn.execute_on_all("SCRIPT", "LOAD", script, timeout=5.0)
        return str(sha.decode() if isinstance(sha, bytes) else sha)
    sha = await conn.execute("SCRIPT", "LOAD", script, timeout=5.0)
    return str(sha.decode() if isinstance(sha, bytes) else sha)


#: The command and the script's SHA1, framed; and one batch's eight numbers (see `store`):
#: the retention, framed; the epoch and seq last seen; the first index, the one it follows, the
#: count; the epoch and first seq the tails predict. Numbers at a fixed width spare a `len`
#: of each one's text (tonumber in the script reads the zeros; 16 digits hold any 2**53).
EVALSHA_HEAD = bulk(b"EVALSHA") + bulk(APPEND_SHA.encode())
BATCH_HEAD = b"%s$%d\r\n%s\r\n" + b"$16\r\n%016d\r\n" * 4 + b"$%d\r\n%s\r\n$16\r\n%016d\r\n"
#: The same for one body, and the body: the count is 1.
BATCH_ONE = (
    b"%s$%d\r\n%s\r\n"
    + b"$16\r\n%016d\r\n" * 3
    + b"$16\r\n%016d\r\n" % 1
    + b"$%d\r\n%s\r\n$16\r\n%016d\r\n"
    + b"$%d\r\n%s\r\n"
)


def _published(item: Pending) -> int:
    return item.at


#: Where a channel stands before Redis has answered for it.
NOWHERE = StreamPosition("", 0)


@dataclass(slots=True, eq=False)
class Lane:
    """One channel's state in a publisher: its parts of an append call, framed once (its
    stream key routes the call in a cluster), how far its events are queued, acknowledged and
    stored, and where its next bodies' tails put them.

    One object per channel, not a dict per field: five lookups per channel per release were a
    tenth of a paced feed's publish."""

    channel: Channel
    stream: bytes
    keys: bytes
    maxlen: bytes
    #: The hash slot of its keys (which cluster master holds it).
    slot: int
    #: This publisher's index of the last event queued (from 1). Redis keeps the last index it
    #: applied per publisher, so a batch written twice (its reply lost, then retried) is
    #: appended once.
    queued: int = 0
    #: The highest index Redis has acknowledged.
    acked: int = 0
    #: Whether the registry holds the channel (as far as this connection knows).
    registered: bool = False
    #: Whether Redis refused its last batch (see `Publisher._refuse`).
    refused: bool = False
    #: The last (epoch, seq) Redis assigned.
    position: StreamPosition | None = None
    #: Where the channel will stand once every flush sent is applied, as far as the replies so
    #: far tell: the epoch and seqs the next bodies' tails predict (see `store`); the epoch
    #: encoded.
    predicted: StreamPosition | None = None
    epoch_b: bytes = b""
    #: A stored body's tail up to its seq, in the predicted epoch.
    tail: bytes = b""

    def predict(self, position: StreamPosition | None) -> None:
        self.predicted = position
        if position is not None:
            self.epoch_b = position.epoch.encode()
            self.tail = stored_tail(position.epoch)


@dataclass(slots=True)
class Pending:
    """A channel batch waiting to be written: this publisher's index of its first event, the
    index it must follow in Redis (0: none), the encoded bodies, and when it was published.

    Never changed once made (a change makes a new one); not frozen only because a frozen
    dataclass's `__init__` costs three times as much (1.6 against 0.5 µs), once per channel
    per release."""

    lane: Lane
    first: int
    prev: int
    bodies: list[bytes]
    #: Which `publish` call queued it (from 1): the order of batches across channels.
    at: int


@dataclass(frozen=True, slots=True)
class Flight:
    """A flush written and not yet answered: what it took, and how to read its replies."""

    taken: list[Pending]
    #: The lanes of each append call, and all of them in order; per lane, its events, and the
    #: (epoch, last seq) its bodies' tails predict (None: bare).
    calls: list[list[Lane]]
    lanes: list[Lane]
    counts: list[int]
    expected: list[StreamPosition | None]
    new: list[Lane]
    commands: list[Command]
    #: When it was made, just before it was written (`time.monotonic`).
    sent_at: float
