"""Follows every live channel: pushed appends as they happen, stream reads to catch up.

Each append reaches Redis with a push of the same events on the live pub/sub channel (see
`tickwire.feeds.store`). The reader subscribes to it, and delivers a pushed batch when it
continues a channel's seq exactly. It reads the streams themselves (XREAD, no BLOCK) only to catch
up: a channel it starts following, a hole in the pushed seqs, and any channel whose stored seq
is past what it read when it compares the two (after a (re)connect and at every registry poll,
in case some writer does not push). Seqs are dense, so a batch is never delivered twice, and a
hole is never skipped: it is read from the stream.

Why not one blocking XREAD over every live stream: Redis costs grow with the number of keys per
read (about 0.5 ms per read of 200 streams on this kind of machine, most of it blocking and
unblocking each key), Redis 7.0 answers a blocked read with only the stream that woke it (two
reads per flush), and building and parsing those reads was a fifth of the server's CPU.

Two connections of its own, each with one user: the subscription, and the reader's own for metas
and catch-up reads (any failure throws it away: see `tickwire.core.redis_wire`). The channel
registry is read through `History` (`tickwire.server.history`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import orjson

from tickwire.core.channels import Channel, live_channel
from tickwire.core.config import ServerConfig
from tickwire.core.errors import RedisUnavailable
from tickwire.core.redis_pubsub import RedisSubscription
from tickwire.core.redis_wire import Arg, RedisAddress, RedisConnection, RedisReplyError
from tickwire.core.stream import publish_ns_of
from tickwire.server.batch import Batch
from tickwire.server.history import History, meta_commands, parse_metas, to_batches
from tickwire.server.hub import Hub
from tickwire.server.metrics import Metrics

log = logging.getLogger("tickwire.server.reader")
#: At most one reconnect this often goes unannounced (no `status` down/up to clients).
QUIET_RETRY_EVERY_S = 5.0


def next_count(previous: int, full: bool, streams: int, read_count: int) -> int:
    """XREAD COUNT per stream for the next read.

    Replies stay near `read_count` entries in all (large replies cost GC time), so the floor is
    read_count/streams; but while some stream fills its COUNT the count doubles (up to
    read_count), so one hot stream among many is not held to a trickle per round trip.
    """
    floor = max(16, read_count // streams)
    if full:
        return min(max(previous, floor) * 2, max(read_count, floor))
    return max(floor, previous // 2)


def fanout_pause(cost_s: float, idle_s: float, config: ServerConfig) -> float:
    """Seconds the reader waits after a fan-out that cost `cost_s` of CPU, `idle_s` after the
    previous one (and its pause) ended.

    A fan-out costs about one socket write per subscriber, whatever the frame carries. When the
    fan-outs keep the server busy, reading again at once after one makes the next frames small
    and the writes per event many: the server spends its CPU on writes while its clients (which
    share the machine in the bench) fall behind. Waiting about as long as the fan-out took lets
    events gather, so each write carries more, at a latency of about one more fan-out. A
    server with time to spare (`fanout_pause_busy`) does not wait.
    """
    if cost_s * 1000 <= config.fanout_pause_after_ms:
        return 0.0
    if cost_s < config.fanout_pause_busy * (cost_s + idle_s):
        return 0.0
    return min(cost_s * config.fanout_pause_ratio, config.fanout_pause_max_ms / 1000)


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
    ) -> None:
        self.config = config
        #: CPU seconds used so far (a fan-out's cost is its CPU time, not its wall time: a
        #: fan-out the scheduler preempted was not costly).
        self.cpu_clock = cpu_clock
        self.monotonic = monotonic
        #: Seconds to wait before the next read (`fanout_pause`), and when the last fan-out
        #: (or the pause after it) ended.
        self._pause = 0.0
        self._ready_at = 0.0
        self.hub = hub
        self.metrics = metrics
        self.history = history
        self.on_status = on_status
        self.clock_ns = clock_ns
        #: Last seq read per live channel, and the epoch it belongs to.
        self.positions: dict[Channel, int] = {}
        self.epochs: dict[Channel, str] = {}
        self._keys: dict[bytes, Channel] = {}
        self._started = False
        self._recheck = True
        self._registry_loaded = False
        #: The registry's size when last read whole (-1: never).
        self._registry_size = -1
        #: Followed channels still to compare with their metas in this round of the sweep, the
        #: share of them due (a fraction carried over), and whether a poll asked for one.
        self._sweep: list[Channel] = []
        self._sweep_credit = 0.0
        self._sweep_due = False
        #: Channels that appeared while we were running: read from their epoch's start.
        self._fresh: set[Channel] = set()
        self.up = False
        #: Channels to catch up from their stream: pushes alone may not continue them.
        self._behind: set[Channel] = set()
        #: XREAD COUNT of the next read, and whether the last reply filled it for some stream.
        self._read_count = 0
        self._full = False
        #: Set once the reader has connected and loaded the registry for the first time.
        self.ready = asyncio.Event()

    async def run(self) -> None:
        delay = 0.05
        poller = asyncio.create_task(self._poll_registry(), name="tickwire-registry")
        try:
            url = self.config.redis_url
            live = live_channel(RedisAddress.parse(url).db)
            quiet_at = -QUIET_RETRY_EVERY_S
            while True:
                conn: RedisConnection | None = None
                sub: RedisSubscription | None = None
                try:
                    # Subscribed first: whatever the catch-up reads miss arrives as a push.
                    sub = await RedisSubscription.open(url, [live])
                    conn = await RedisConnection.open(url)
                    await self.refresh_registry(force=True)
                    self._recheck = True
                    self._set_up(True)
                    self.ready.set()
                    delay = 0.05
                    await self._read_loop(conn, sub)
                except RedisUnavailable as exc:
                    now = time.monotonic()
                    if self.up and now - quiet_at > QUIET_RETRY_EVERY_S:
                        # One connection lost while Redis itself may be fine (Redis dropped a
                        # subscriber past its pubsub output limit, CLIENT KILL, a proxy reset):
                        # reconnect at once before telling every client Redis is down.
                        log.warning("lost a Redis connection: %s; reconnecting", exc)
                        quiet_at = now
                        continue
                    if self.up:
                        log.warning("lost Redis: %s; reconnecting with backoff", exc)
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

        Both had been done whole at every poll: at 3 000 symbols (6 000 channels, 1 000
        followed) reading and parsing the registry and 1 000 metas four times a second took the
        server from 26 to 37 % of a core and p99 from 10 to 45 ms, at 10 k events/s. Rechecking
        all 6 000 followed channels at once every 5 s still stalled the fan-out ~50 ms (1 000
        clients: p99 38 ms against 19 ms without); a share per poll does not.
        """
        while True:
            await asyncio.sleep(self.config.registry_poll_s)
            with contextlib.suppress(RedisUnavailable):  # the reader loop reports Redis state
                await self.refresh_registry()  # new channels: the hub says it changed
            self._sweep_due = True

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
            self._fresh.update(new)
        self._registry_loaded = True

    async def _sync_channels(self, conn: RedisConnection) -> None:
        """Start reading new live channels, stop reading dropped ones, and notice new epochs.

        The metas come over the reader's own connection, like its catch-up reads: on the shared
        control connection they queued behind the registry polls and clients' history reads,
        and when Redis stopped answering, the reader waited for those to time out first."""
        live = self.hub.live_channels()
        dropped = [c for c in self.positions if c not in live]
        for c in dropped:
            del self.positions[c]
            self.epochs.pop(c, None)
            self._behind.discard(c)
        added = [c for c in live if c not in self.positions]
        if self._recheck:
            check = list(live)
        elif self._sweep_due:
            check = added + self._next_sweep(live)
        else:
            check = added
        self._recheck = self._sweep_due = False
        metas = (
            parse_metas(check, await conn.pipeline(meta_commands(check), timeout=5.0))
            if check
            else {}
        )
        for c in check:
            meta = metas[c]
            if c in added:
                if meta is None:
                    self.positions[c] = 0  # read it from its first event when it appears
                else:
                    self.epochs[c] = meta[0]
                    # A channel born while we run is read whole, so wildcard subscribers get
                    # its first events; an old one from now on.
                    self.positions[c] = meta[2] - 1 if c in self._fresh else meta[1]
                self._fresh.discard(c)
                self._behind.add(c)
            elif meta is not None and self.epochs.get(c) != meta[0]:
                # A new epoch: the stream was recreated or rolled back. Read it from its start;
                # each outbox announces the reset.
                self.epochs[c] = meta[0]
                self.positions[c] = meta[2] - 1
                self._behind.add(c)
            elif meta is not None and meta[1] > self.positions[c]:
                # Stored past what was read: its pushes are on the way, or were lost (a
                # reconnect) or never made. The stream tells; a push that follows is dropped.
                self._behind.add(c)
        if added or dropped:  # rebuilt per poll, it cost ~6 ms at 6 000 channels
            self._keys = {c.stream_key.encode(): c for c in self.positions}

    def _next_sweep(self, live: set[Channel]) -> list[Channel]:
        """The followed channels this poll compares with their metas: every one once per
        `meta_recheck_s`, a share per poll, so that no poll stalls the fan-out. It finds appends
        nobody pushed (another writer, a hand repair); pushes, holes and reconnects set off a
        whole recheck (`_recheck`) at once."""
        cfg = self.config
        self._sweep_credit += len(live) * cfg.registry_poll_s / cfg.meta_recheck_s
        n = int(self._sweep_credit)
        if n == 0:
            return []
        self._sweep_credit -= n
        if not self._sweep:
            self._sweep = list(live)
        share, self._sweep = self._sweep[:n], self._sweep[n:]
        # Followed still, and not new (new ones are checked as `added`).
        return [c for c in share if c in self.positions]

    async def _read_loop(self, conn: RedisConnection, sub: RedisSubscription) -> None:
        # A new subscription is followed at once, not at the next push or idle turn.
        self.hub.on_change = sub.wake
        try:
            await self._follow(conn, sub)
        finally:
            self.hub.on_change = None

    async def _follow(self, conn: RedisConnection, sub: RedisSubscription) -> None:
        idle_s = self.config.read_block_ms / 1000
        #: When a PING went out on the idle subscription (0: none owed).
        ping_at = 0.0
        while True:
            if self._pause:
                pause, self._pause = self._pause, 0.0
                self.metrics.fanout_pauses += 1
                self.metrics.fanout_pause_seconds += pause
                await asyncio.sleep(pause)
                self._ready_at = self.monotonic()
            if self.hub.changed.is_set() or self._recheck or self._sweep_due:
                self.hub.changed.clear()
                await self._sync_channels(conn)
            if self._behind:
                await self._catch_up(conn)
            messages = sub.take()
            if not messages and not self._behind and not self.hub.changed.is_set():
                if not await sub.wait(idle_s):
                    # Quiet, or Redis stopped answering (a pause, a dead link): a PING tells.
                    now = time.monotonic()
                    if not ping_at:
                        ping_at = now
                        sub.ping()
                    elif now - ping_at > idle_s + 5.0:
                        raise RedisUnavailable("no reply from Redis to PING within 5 s")
                    continue
                messages = sub.take()
            if messages:
                ping_at = 0.0
                read_ns = self.clock_ns()
                self._fanout(self._take_pushes(messages), read_ns)

    async def _catch_up(self, conn: RedisConnection) -> None:
        """One XREAD (no BLOCK) of the channels behind; those it brings up to date are no longer."""
        cfg = self.config
        channels = [c for c in self._behind if c in self.positions]
        if not channels:
            self._behind = set()
            return
        self._read_count = count = next_count(
            self._read_count, self._full, len(channels), cfg.read_count
        )
        cmd: list[Arg] = ["XREAD", "COUNT", count, "STREAMS"]
        cmd += [c.stream_key for c in channels]
        cmd += [f"{self.positions[c]}-0" for c in channels]
        self.metrics.catchup_reads += 1
        (reply,) = await conn.pipeline([cmd], timeout=5.0)
        if isinstance(reply, RedisReplyError):
            # E.g. LOADING while Redis replays its AOF: back off and read again.
            raise RedisUnavailable(f"XREAD refused: {reply}")
        keys = self._keys
        full = {keys[k] for k, entries in reply or () if len(entries) >= count and k in keys}
        self._full = bool(full)
        # A channel whose stream gave less than COUNT is up to date as of this read; what is
        # appended after it comes as a push (the subscription was there before the read).
        self._behind = full
        if reply:
            self._fanout(self._take(reply), self.clock_ns())

    def _take_pushes(self, messages: list[Any]) -> list[Batch]:
        """The pushed batches that continue their channel exactly; a hole sends it to catch up.

        A channel's events from all of `messages` make one batch: when the server falls behind,
        pushes pile up, and one batch per channel instead of one per push and channel is what
        lets its fan-out cost per event fall as the load rises (fewer, larger frames).
        """
        runs: dict[Channel, tuple[str, int, list[bytes]]] = {}
        for message in messages:
            # [b"message", channel, b"<stream key> <epoch> <first seq> <count>\n<event>\n…"],
            # a section per batch (see tickwire.feeds.store); the other replies here (pong)
            # only prove the link is alive.
            if len(message) != 3 or message[0] != b"message":
                continue
            lines = message[2].split(b"\n")
            i = 0
            while i < len(lines):
                try:
                    head = lines[i].split(b" ")
                    first = int(head[2])
                    # Three fields: the one-batch format of earlier publishers, to the end.
                    n = int(head[3]) if len(head) == 4 else len(lines) - i - 1
                    if len(head) not in (3, 4) or n < 1 or i + 1 + n > len(lines):
                        raise ValueError
                    epoch = head[1].decode()
                except (ValueError, IndexError, UnicodeDecodeError):
                    # Not an append's push (someone else publishing here): the streams are the
                    # truth, and this is not one of them.
                    self.metrics.bad_pushes += 1
                    break
                self._take_push(head[0], epoch, first, lines[i + 1 : i + 1 + n], runs)
                i += 1 + n
        return [Batch(channel, *run) for channel, run in runs.items()]

    def _take_push(
        self,
        key: bytes,
        epoch: str,
        first: int,
        events: list[bytes],
        runs: dict[Channel, tuple[str, int, list[bytes]]],
    ) -> None:
        channel = self._keys.get(key)
        if channel is None:
            return  # nobody here follows it
        pos = self.positions.get(channel)
        if pos is None:
            return
        known = self.epochs.get(channel)
        if known is not None and epoch != known:
            self._recheck = True  # a new epoch: reposition from the meta, then catch up
            return
        if first > pos + 1:
            self._behind.add(channel)  # a hole: the stream has it
            return
        last = first + len(events) - 1
        if last <= pos:
            return  # read already (a catch-up overlapped the push)
        if first <= pos:
            events = events[pos + 1 - first :]
            first = pos + 1
        self.epochs[channel] = epoch
        self.positions[channel] = last
        run = runs.get(channel)
        if run is None:
            runs[channel] = (epoch, first, events)
        else:
            # Continues it exactly: same epoch (checked above against `epochs`, which the run
            # set), and `first` is the run's end + 1 (checked against `positions`).
            run[2].extend(events)

    def _take(self, reply: list[Any]) -> list[Batch]:
        """The reply's batches, in order; the read positions move past them."""
        batches: list[Batch] = []
        for key, entries in reply:
            channel = self._keys.get(key)
            if channel is None or channel not in self.positions:
                continue
            for batch in to_batches(channel, entries):
                known = self.epochs.get(channel)
                if known is not None and batch.epoch != known:
                    # Read into a new epoch before the epoch check saw it: reposition first.
                    self._recheck = True
                    break
                self.epochs[channel] = batch.epoch
                self.positions[channel] = batch.last_seq
                batches.append(batch)
        return batches

    def _fanout(self, batches: list[Batch], read_ns: int) -> None:
        if not batches:
            return
        n = sum(len(b.events) for b in batches)
        self.metrics.events_read += n
        start, cpu = self.monotonic(), self.cpu_clock()
        deliveries = self.hub.dispatch(batches)
        cost = self.cpu_clock() - cpu
        pause = fanout_pause(cost, start - self._ready_at, self.config)
        self._pause = max(self._pause, pause)
        self._ready_at = self.monotonic()
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


def status_message(up: bool) -> bytes:
    return orjson.dumps({"type": "status", "redis": "up" if up else "down"})
