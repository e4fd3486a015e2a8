"""Follows every live channel from Redis: the I/O loop around `StreamFollower`.

The follower (`tickwire.server.follower`) holds the rules: where each channel stands, what a push
or a read delivers, what to read next. This loop owns the connections, asks the follower what to
do, does it, and hands every batch to the hub.

Why not one blocking XREAD over every live stream: Redis costs grow with the number of keys per
read (about 0.5 ms per read of 200 streams on this kind of machine, most of it blocking and
unblocking each key), Redis 7.0 answers a blocked read with only the stream that woke it (two
reads per flush), and building and parsing those reads was a fifth of the server's CPU.

Two connections of its own, each with one user: the subscription, and the reader's own for metas
and catch-up reads (any failure throws it away: see `tickwire.core.redis_wire`). The channel
registry is read through `History` (`tickwire.server.history`).

On a Redis Cluster both are per master, and a master that is down stops only its own slots'
channels: their metas and reads are skipped (`NodeDown`), the other masters' pushes go on, and the
slot map is asked for every `CLUSTER_REFRESH_S` until the slots have a master up again (a
failover's promoted replica); then they are subscribed there and every channel is compared with
its meta, as after a reconnect (lost tails get a new epoch and clients `reset`). A master that
hangs (its subscription open and silent while the others push) is found by
`SubscriptionGroup.watch`, every `SILENCE_WATCH_S`, and taken for down the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any

from tickwire.core.acl import acl_hint
from tickwire.core.channels import Channel
from tickwire.core.commands import Arg, NodeDown, RedisReplyError, wrong_type
from tickwire.core.config import ServerConfig
from tickwire.core.errors import RedisTimeout, RedisUnavailable
from tickwire.core.redis_cluster import CLUSTER_REFRESH_S, STRAGGLER_S, ClusterConnection
from tickwire.core.redis_pubsub import SubscriptionGroup
from tickwire.core.redis_slots import channel_slot
from tickwire.core.redis_target import LiveSubscription, RedisLink, RedisTopology
from tickwire.core.stream import StreamPosition, publish_ns_of
from tickwire.core.waits import report_end
from tickwire.server.batch import Batch
from tickwire.server.follower import StreamFollower
from tickwire.server.history import History
from tickwire.server.hub import Hub
from tickwire.server.metrics import Metrics
from tickwire.server.stored import Meta, fence_commands, meta_commands, parse_metas

log = logging.getLogger("tickwire.server.reader")

#: How often the reader looks for a cluster master whose subscription went silent while the
#: others push (`SubscriptionGroup.watch`; one is found within about `STRAGGLER_S` of its PING).
SILENCE_WATCH_S = 0.25


def _describe(conn: RedisLink, redis: RedisTopology) -> str:
    if isinstance(conn, ClusterConnection):
        return f"a Redis Cluster of {len(conn.slots.masters)} masters ({redis.target})"
    if redis.target.service is not None:
        return f"the primary Sentinel names {redis.target.service!r} ({redis.target})"
    return f"one Redis ({redis.target})"


#: At most one reconnect this often goes unannounced (no `status` down/up to clients).
QUIET_RETRY_EVERY_S = 5.0


def retries_quietly(exc: RedisUnavailable, up: bool, now: float, quiet_at: float) -> bool:
    """Whether the reader reconnects at once without telling clients Redis is down: only for
    a connection that ended (Redis dropped a subscriber past its output limit, CLIENT KILL, a
    proxy's reset) while Redis was up, at most once per `QUIET_RETRY_EVERY_S`. Not after a
    timeout: nothing came for seconds already, the clients' stall has happened, and a reconnect
    that then succeeds (the pause or the black hole just ended) would have hidden it."""
    return up and not isinstance(exc, RedisTimeout) and now - quiet_at > QUIET_RETRY_EVERY_S


class StreamReader:
    def __init__(
        self,
        config: ServerConfig,
        hub: Hub,
        metrics: Metrics,
        history: History,
        *,
        on_status: Callable[[bool], None],
        clock_ns: Callable[[], int] = time.time_ns,
        cpu_clock: Callable[[], float] = time.thread_time,
        monotonic: Callable[[], float] = time.monotonic,
        new_epoch: Callable[[], str] = lambda: secrets.token_hex(6),
    ) -> None:
        self.config = config
        self.new_epoch = new_epoch
        self.follower = StreamFollower(config)
        #: CPU seconds used so far (a fan-out's cost is its CPU time, not its wall time: a
        #: fan-out the scheduler preempted was not costly).
        self.cpu_clock = cpu_clock
        self.monotonic = monotonic
        self.hub = hub
        self.metrics = metrics
        self.history = history
        self.on_status = on_status
        self.clock_ns = clock_ns
        self._started = False
        self._redis = RedisTopology(config.redis_url)
        #: When to ask a cluster with a master down for its slot map next (`monotonic`).
        self._mend_at = 0.0
        #: The last refresh's failure, logged once.
        self._mend_error = ""
        self._registry_loaded = False
        #: The registry's size when last read whole (-1: never).
        self._registry_size = -1
        self.up = False
        #: Set once the reader has connected and loaded the registry for the first time.
        self.ready = asyncio.Event()
        #: Callers of `when_followed`, answered at the end of the next sync.
        self._awaiting: list[
            tuple[list[Channel], Callable[[dict[Channel, StreamPosition | None]], None]]
        ] = []

    @property
    def positions(self) -> dict[Channel, int]:
        """Last seq read per followed channel (read only: the follower's)."""
        return self.follower.positions

    async def run(self) -> None:
        delay = 0.05
        poller = asyncio.create_task(self._poll_registry(), name="tickwire-registry")
        poller.add_done_callback(report_end)
        try:
            redis = self._redis
            quiet_at = -QUIET_RETRY_EVERY_S
            last_error = ""
            while True:
                conn: RedisLink | None = None
                sub: LiveSubscription | None = None
                try:
                    # Subscribed first: whatever the catch-up reads miss arrives as a push.
                    sub = await redis.open_live()
                    conn = await redis.open()
                    try:
                        await self.refresh_registry(force=True)
                    except NodeDown as exc:
                        # Its master is down: the registry as last read (if ever), and the
                        # poll reads it again; the other masters' channels go on meanwhile.
                        log.warning("cannot read the channel registry now: %s", exc)
                    self.follower.reconnected()
                    # Up once Redis answers reads, not only connections: a cluster answers
                    # CLUSTERDOWN to every read while a failover is under way, and clients
                    # were told up and down again at each retry.
                    self.hub.changed = False
                    await self._sync_channels(conn)
                    if not self._started:
                        log.info("following %s", _describe(conn, redis))
                    self._set_up(True)
                    self.ready.set()
                    delay = 0.05
                    await self._read_loop(conn, sub)
                except Exception as exc:
                    if not isinstance(exc, RedisUnavailable):
                        # A bug must not stop every client's live events for good: it is
                        # logged, and the reader starts again as after losing Redis.
                        log.exception("the stream reader failed; starting it again")
                        exc = RedisUnavailable(f"the reader failed: {exc!r}")
                    now = time.monotonic()
                    if retries_quietly(exc, self.up, now, quiet_at):
                        log.warning(
                            "lost a Redis connection: %s%s; reconnecting", exc, acl_hint(exc)
                        )
                        quiet_at = now
                        continue
                    if self.up:
                        log.warning(
                            "lost Redis: %s%s; reconnecting with backoff", exc, acl_hint(exc)
                        )
                    elif str(exc) != last_error:
                        log.warning("Redis still unreachable: %s%s", exc, acl_hint(exc))
                    last_error = str(exc)
                    self._set_up(False)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                finally:
                    if conn is not None:
                        conn.close()
                    if sub is not None:
                        sub.close()
        finally:
            poller.cancel()

    def _set_up(self, up: bool) -> None:
        if up != self.up:
            self.up = up
            self.metrics.redis_up = int(up)
            if up and self._started:
                self.metrics.redis_reconnects += 1
            self._started = True
            self.on_status(up)

    async def _poll_registry(self) -> None:
        """New channels every `registry_poll_s`, and a share of the followed channels compared
        with their metas (`_next_sweep`).

        Reading the whole registry and every meta at each poll stalls the fan-out at thousands
        of channels (docs/benchmarks.md, 2026-11-28: the registry poll and the meta sweep).
        """
        while True:
            await asyncio.sleep(self.config.registry_poll_s)
            with contextlib.suppress(RedisUnavailable):  # the reader loop reports Redis state
                await self.refresh_registry()  # new channels: the hub says it changed
            self.follower.poll()

    async def refresh_registry(self, *, force: bool = False) -> None:
        """Bring in channels new to the registry. It only grows (FLUSHALL aside), so unless
        `force`d it is read whole only when its size changed: one SCARD per poll, not thousands
        of names."""
        size = await self.history.registry_size()
        if size == self._registry_size and not force:
            return
        new = self.hub.add_known(await self.history.registry())
        self._registry_size = size
        if self._registry_loaded:
            self.follower.appeared(new)
        self._registry_loaded = True

    def when_followed(
        self,
        channels: list[Channel],
        answer: Callable[[dict[Channel, StreamPosition | None]], None],
    ) -> None:
        """Call `answer` with where the reader stands on each of `channels` (None: it does not
        follow it) at the end of its next sync, before it dispatches any event of theirs.

        A subscribe to channels the reader is about to follow is placed there, as if it had come
        just after: no catch-up of its own. In a storm of thousands of subscribes, each one's
        catch-up (a task and its own Redis reads, all alive at once) was most of what the
        storm cost in memory."""
        self._awaiting.append((channels, answer))
        self.hub.mark_changed()

    def _answer_awaiting(self, metas: Mapping[Channel, Meta | None]) -> None:
        """Answer `when_followed`. A channel the reader starts behind its stored end (one born
        while it runs is read whole, for wildcard subscribers) is placed at that end, where a
        subscribe from now starts; the reader's older events are not owed to it."""
        awaiting, self._awaiting = self._awaiting, []
        position_of = self.follower.position_of

        def now_of(channel: Channel) -> StreamPosition | None:
            position = position_of(channel)
            meta = metas.get(channel)
            if position is not None and meta is not None and meta[0] == position.epoch:
                return StreamPosition(meta[0], max(meta[1], position.seq))
            return position

        for channels, answer in awaiting:
            try:
                answer({channel: now_of(channel) for channel in channels})
            except Exception:
                log.error("placing a subscribe failed", exc_info=True)

    async def _sync_channels(self, conn: RedisLink) -> None:
        """Follow the hub's live channels; read the metas the follower asks for.

        The metas come over the reader's own connection, like its catch-up reads: on the shared
        control connection they queued behind the registry polls and clients' history reads,
        and when Redis stopped answering, the reader waited for those to time out first."""
        check = self.follower.plan_sync(self.hub.live_channels())
        metas: dict[Channel, Meta | None] = {}
        if check:
            replies = await conn.pipeline(
                meta_commands(check), timeout=self.config.redis_reply_timeout_s
            )
            foreign: list[Channel] = []
            metas = parse_metas(check, replies, foreign)
            if foreign:
                # Once per channel and `meta_recheck_s` (the sweep), not per read.
                log.warning(
                    "%d channels' metas are not ones tickwire writes (edited, or a key of "
                    "another type), e.g. %s: not compared until their next append writes them",
                    len(foreign),
                    foreign[0].meta_key,
                )
            self.follower.apply_metas(metas)
        rolled_back = self.follower.take_rolled_back()
        if rolled_back:
            # Redis lost what was read: a new epoch for each, then reposition (clients get
            # `reset`). The same channels again if the script was refused: retried next sync.
            log.warning(
                "%d channels are stored behind what was read (lost in a failover or crash): "
                "starting a new epoch for each (e.g. %s)",
                len(rolled_back),
                next(iter(rolled_back)),
            )
            replies = await conn.pipeline(
                fence_commands(rolled_back, self.new_epoch()),
                timeout=self.config.redis_reply_timeout_s,
            )
            self.metrics.rollbacks_fenced += len(rolled_back)
            self.follower.apply_metas(parse_metas(list(rolled_back), replies))
        for channel, position in self.follower.take_renewed().items():
            self.hub.announce_epoch(channel, position)
        # Nothing was dispatched since the metas were applied: the positions are exact.
        self._answer_awaiting(metas)

    async def _read_loop(self, conn: RedisLink, sub: LiveSubscription) -> None:
        # A new subscription is followed at once, not at the next push or idle turn.
        self.hub.on_change = sub.wake
        try:
            await self._follow(conn, sub)
        finally:
            self.hub.on_change = None

    async def _follow(self, conn: RedisLink, sub: LiveSubscription) -> None:
        follower = self.follower
        idle_s = self.config.read_block_ms / 1000
        #: When a PING went out on the idle subscription (0: none owed).
        ping_at = 0.0
        # On a cluster: its masters' connections and subscriptions, and the refreshes seen.
        nodes, group = (
            (conn, sub)
            if isinstance(conn, ClusterConnection) and isinstance(sub, SubscriptionGroup)
            else (None, None)
        )
        self.metrics.redis_masters_down = 0
        generation = nodes.generation if nodes is not None else 0
        watch_at = 0.0
        while True:
            pause = follower.take_pause()
            if pause:
                self.metrics.fanout_pauses += 1
                self.metrics.fanout_pause_seconds += pause
                await asyncio.sleep(pause)
                follower.resumed(self.monotonic())
            mend_in = None
            if nodes is not None and group is not None:
                if (now := self.monotonic()) >= watch_at:
                    watch_at = now + SILENCE_WATCH_S
                    for node in group.watch(now, STRAGGLER_S):
                        log.warning(
                            "Redis Cluster master %s:%d is down: %s; its channels wait, the "
                            "others go on",
                            *node,
                            group.lost,
                        )
                        nodes.lose(node, f"{node[0]}:{node[1]}: {group.lost}")
                        self._mend_at = now
                if nodes.generation != generation:
                    # A master came up (or the map changed) for the reads: compare every
                    # channel with its meta, what they skipped meanwhile is read then.
                    generation = nodes.generation
                    follower.reconnected()
                if nodes.down or group.unfollowed:
                    mend_in = self._mend_at - self.monotonic()
                    if mend_in <= 0:
                        await self._mend(nodes, group)
                        continue
            if self.hub.changed or follower.wants_sync:
                self.hub.changed = False
                await self._sync_channels(conn)
            if follower.behind:
                await self._catch_up(conn)
            messages = sub.take()
            if not messages and not follower.behind and not self.hub.changed:
                if not await sub.wait(idle_s if mend_in is None else min(idle_s, mend_in)):
                    if mend_in is not None and mend_in < idle_s:
                        continue  # time to ask for the slot map, not an idle link
                    # Quiet, or Redis stopped answering (a pause, a dead link): a PING tells.
                    now = time.monotonic()
                    if not ping_at:
                        ping_at = now
                        sub.ping()
                    elif now - ping_at > idle_s + self.config.redis_reply_timeout_s:
                        raise RedisTimeout(
                            f"no reply from Redis to PING within {self.config.redis_reply_timeout_s} s"
                        )
                    continue
                messages = sub.take()
            if messages:
                ping_at = 0.0
                read_ns = self.clock_ns()
                bad = follower.bad_pushes
                batches = follower.take_pushes(messages)
                self.metrics.bad_pushes += follower.bad_pushes - bad
                self._fanout(batches, read_ns)

    async def _mend(self, conn: ClusterConnection, sub: SubscriptionGroup) -> None:
        """A cluster master is down for the reader: have the slot map asked for again (every
        `CLUSTER_REFRESH_S`), subscribe the slots nobody follows where the last map puts them,
        and once a master is back compare every channel with its meta (what was pushed meanwhile
        is lost, and a promoted replica may lack a tail that was read)."""
        self._mend_at = self.monotonic() + CLUSTER_REFRESH_S
        was_down = len(conn.down)
        # Whether the connection's down or not: a lost subscription's slots may have moved (a
        # failover seen first by the subscription). In a task of its own: a master that does
        # not answer takes the whole connect timeout, and the other masters' pushes go on.
        conn.refresh_soon(force=True)
        error = conn.refresh_error
        if error and error != self._mend_error:
            log.warning("asking the cluster for its slot map failed: %s", error)
        self._mend_error = error or ""
        # A subscription to a master the connection finds down, or that no longer is one (a
        # black hole that stays silent, a failover seen first here), goes.
        stale = {n for n in sub.nodes if n in conn.down or n not in conn.slots.masters}
        if stale:
            sub.drop(stale, "its master is down")
        unfollowed = len(sub.unfollowed)
        followed = await self._redis.follow_unfollowed(sub, conn.slots, conn.down)
        self.metrics.redis_masters_down = len(conn.down)
        if followed:
            self.follower.reconnected()
        if conn.down and len(conn.down) != was_down:
            log.warning(
                "Redis Cluster masters down: %s; their channels wait, the others go on",
                "; ".join(conn.down.values()),
            )
        if followed and not sub.unfollowed:
            log.info("every slot is followed again (%d were not)", unfollowed)

    async def _catch_up(self, conn: RedisLink) -> None:
        """One XREAD (no BLOCK) of the channels behind: one per hash slot on a cluster."""
        commands = self.follower.read_commands(
            channel_slot if isinstance(conn, ClusterConnection) else None
        )
        if not commands:
            return
        self.metrics.catchup_reads += 1
        joined: list[Any] = []
        replies = await conn.pipeline(commands, timeout=self.config.redis_reply_timeout_s)
        for command, reply in zip(commands, replies, strict=True):
            if isinstance(reply, NodeDown):
                # Its master is down: read again once it or its replica is up (`_mend`).
                continue
            if wrong_type(reply):
                await self._set_aside_foreign(conn, command)
                continue
            if isinstance(reply, RedisReplyError):
                # E.g. LOADING while Redis replays its AOF, MOVED after a failover: back off,
                # find the topology again and read again.
                raise RedisUnavailable(f"XREAD refused: {reply}")
            joined += reply or ()
        batches = self.follower.take_read(joined)
        if batches:
            self._fanout(batches, self.clock_ns())

    async def _set_aside_foreign(self, conn: RedisLink, command: list[Arg]) -> None:
        """An XREAD failed with WRONGTYPE: some stream key it names holds another type
        (someone wrote there). Leave those channels out of reads, not the others, and go on:
        taken for a Redis failure, it had the reader reconnect in a loop, every channel
        stalled."""
        channels = self.follower.read_channels(command)
        types = await conn.pipeline(
            [["TYPE", c.stream_key] for c in channels],
            timeout=self.config.redis_reply_timeout_s,
        )
        foreign = {
            c: t
            for c, t in zip(channels, types, strict=True)
            if isinstance(t, (str, bytes)) and _text(t) not in ("stream", "none")
        }
        new = self.follower.set_aside(foreign)
        if new:
            log.warning(
                "%d channels not read: their stream keys hold another type (someone wrote "
                "there), e.g. %s holds a %s; read again every %g s",
                len(new),
                new[0].stream_key,
                _text(foreign[new[0]]),
                self.config.meta_recheck_s,
            )

    def _fanout(self, batches: list[Batch], read_ns: int) -> None:
        if not batches:
            return
        n = sum(len(b.events) for b in batches)
        self.metrics.events_read += n
        start, cpu = self.monotonic(), self.cpu_clock()
        deliveries = self.hub.dispatch(batches)
        cost = self.cpu_clock() - cpu
        self.follower.fanned_out(cost, start, self.monotonic())
        self.metrics.deliveries += deliveries
        now = self.clock_ns()
        if deliveries:
            self.metrics.read_to_write.observe((now - read_ns) / 1e9, deliveries)
        latest = 0
        for b in batches:
            pt = publish_ns_of(b.events[-1])
            if pt:
                latest = max(latest, pt)
                weight = self.hub.subscriber_count(b.channel) or 1
                self.metrics.latency.observe(max(0.0, (now - pt) / 1e9), weight)
                self.metrics.publish_to_read.observe(max(0.0, (read_ns - pt) / 1e9), weight)
        if latest:
            self.metrics.read_lag_seconds = max(0.0, (now - latest) / 1e9)


def _text(reply: str | bytes) -> str:
    return reply.decode(errors="replace") if isinstance(reply, bytes) else reply
