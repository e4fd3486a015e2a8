"""One client connection: its protocol session, outbox and catch-up, and the writes to its socket."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from websockets.frames import CloseCode

from tickwire.core.channels import Channel, ChannelPattern
from tickwire.core.errors import RedisUnavailable
from tickwire.core.stream import StreamPosition
from tickwire.server.admission import Admitted
from tickwire.server.auth import Grant
from tickwire.server.catchup import CatchUp
from tickwire.server.hub import Subscriber
from tickwire.server.messages import (
    RequestId,
    heartbeat_message,
    notice_message,
    reply,
    subscribed_message,
    welcome_message,
)
from tickwire.server.outbox import START, Outbox
from tickwire.server.session import (
    FROM_NOW,
    UNAUTHORIZED,
    Authenticated,
    ClientSession,
    Close,
    FromNow,
    ListChannels,
    Rejected,
    Reply,
    Subscribe,
    Target,
    Unsubscribe,
    plan_subscribe,
)
from tickwire.server.wire import Wire

if TYPE_CHECKING:
    from tickwire.server.app import TickwireServer

log = logging.getLogger("tickwire.server")

# Socket write buffer per client: above HIGH the outbox holds data back (and sheds it per policy);
# writing resumes below LOW.
WRITE_HIGH = 64 * 1024
WRITE_LOW = 16 * 1024
#: Client frames up to this many times `limits.max_message_bytes` are read and refused with
#: error `too_large`, so the connection stays and the client can split its request; larger ones
#: close with 1009 from their header alone (websockets' `max_size`), before any payload is kept.
FRAME_LIMIT_FACTOR = 2


def _closed_already(exc: Exception) -> None:
    """A closed connection's subscriber, should the hub still deliver to it: nothing to close."""
    log.debug("delivering to a closed connection failed", exc_info=exc)


def _nothing() -> None:
    """A closed connection's flush."""


class Connection:
    """One client: its protocol session, outbox and the writes to its socket."""

    __slots__ = (
        "_catchup",
        "_drain",
        "_listing",
        "_over_since",
        "_tasks",
        "_timers",
        "closing",
        "last_write",
        "outbox",
        "ping_due",
        "pinged_at",
        "round_slice",
        "server",
        "session",
        "sub",
        "wire",
    )

    def __init__(
        self, server: TickwireServer, wire: Wire, admitted: Admitted | None = None
    ) -> None:
        self.server = server
        self.wire = wire
        limits = server.config.limits
        grant, claim = None, None
        if admitted is not None:
            # An `auth` message counts the connection against its credential's cap.
            grant, claim = admitted.grant, functools.partial(server.admission.claim, admitted.slot)
        self.session = ClientSession(limits, server.authenticator, grant, claim)
        self.outbox = Outbox(limits.outbox_bytes, server.metrics.outbox)
        self.sub = Subscriber(
            self.outbox,
            self.flush,
            hold_limit=limits.max_held_bytes,
            write_now=self.write_now,
            on_error=functools.partial(self.failed, "delivering"),
        )
        #: Snapshot and resume work (`tickwire.server.catchup`), made at the first subscribe
        #: that needs it: most connections of a big fan-out never resume.
        self._catchup: CatchUp | None = None
        self.last_write = time.monotonic()
        self._drain: asyncio.Task[None] | None = None
        #: When the data queued for this client (outbox and socket buffer) went over
        #: `outbox_bytes` and has stayed over since; None while it is not.
        self._over_since: float | None = None
        #: Tasks of this connection besides its catch-up: closes, and at most one `list`. None
        #: while there is none, as `_timers`: most connections never have one, and an empty
        #: set or dict per connection adds up at tens of thousands of them.
        self._tasks: set[asyncio.Task[None]] | None = None
        self._listing: asyncio.Task[None] | None = None
        self.closing = False
        #: Deadlines of this connection: "auth" (first auth message), "lifetime", "expiry".
        self._timers: dict[str, asyncio.TimerHandle] | None = None
        #: Keepalive (`keepalive`): when the next ping is due, and when the ping that awaits
        #: its pong (`Wire.ping_out`) went out.
        self.ping_due = time.monotonic() + server.config.ping_interval_s
        self.pinged_at = 0.0
        #: Its slice of the server's heartbeat and keepalive rounds (`Rounds`).
        self.round_slice = 0

    @property
    def catchup(self) -> CatchUp:
        if self._catchup is None:
            server, limits = self.server, self.server.config.limits
            self._catchup = CatchUp(
                self.sub,
                server.history,
                max_events=limits.max_resume_events,
                wait_writable=self.wait_writable,
                read_position=server.reader.positions.get,
                expand=self._expand,
                conflates=functools.partial(server.hub.throttles, self.sub),
                on_error=functools.partial(self.failed, "a catch-up"),
            )
        return self._catchup

    @property
    def _catching_up(self) -> set[Channel]:
        """The channels with catch-up work left (none before the first catch-up)."""
        return self._catchup.channels if self._catchup is not None else set()

    # -- writing -------------------------------------------------------------------------------
    def flush(self) -> None:
        if self.closing:
            return
        if self._takes_data_now():
            self._write()
            return
        if self._drain is None:
            self._drain = asyncio.create_task(self._drain_when_writable())
        # The socket is full: the drain task writes once it takes data again. Meanwhile the
        # outbox is bounded by the slow-consumer policy.
        if self.outbox.over_limit:
            self.outbox.shed()
        self._note_pressure()

    def _note_pressure(self) -> None:
        """Start or stop the clock of a client over its limit: what is queued for it in all
        (control replies, which are never shed, and the socket's buffer included)."""
        transport = self.wire.transport
        buffered = transport.get_write_buffer_size() if transport is not None else 0
        if self.outbox.nbytes + buffered <= self.outbox.limit_bytes:
            self._over_since = None
        elif self._over_since is None:
            self._over_since = time.monotonic()

    def write_now(self, message: bytes, wire: bytes) -> bool:
        """Write `message` past the outbox if the socket takes data now (the hub's shortcut for
        a client in step); False, with nothing written, otherwise. `wire` is the same message
        framed (`text_frame`), shared by every client it goes to."""
        if self.closing or not self._takes_data_now():
            return False
        self._send(message, wire)
        return True

    def _takes_data_now(self) -> bool:
        transport = self.wire.transport
        return (
            self._drain is None
            and transport is not None
            and transport.get_write_buffer_size() <= WRITE_HIGH
        )

    def _write(self) -> None:
        message = self.outbox.take()
        if message is not None:
            self._send(message)

    def _send(self, message: bytes, wire: bytes | None = None) -> None:
        self.wire.send_text(message, wire)
        self.last_write = time.monotonic()
        m = self.server.metrics
        m.frames_sent += 1
        m.bytes_sent += len(message)

    async def _drain_when_writable(self) -> None:
        limits = self.server.config.limits
        try:
            while True:
                # A client that stays over its limit is closed `slow_grace_s` after it went
                # over, however often it reads a little meanwhile; one whose socket takes
                # nothing at all, `slow_grace_s` after it filled.
                grace = limits.slow_grace_s
                if self._over_since is not None:
                    grace -= time.monotonic() - self._over_since
                try:
                    # Woken by the transport's resume_writing (below WRITE_LOW), not by polling:
                    # with a thousand full sockets, polling each every few ms was most of the
                    # server's CPU.
                    async with asyncio.timeout(max(0.0, grace)):
                        await self.wire.drain()
                except TimeoutError:
                    self.server.metrics.slow_disconnects += 1
                    log.info("closing slow consumer %s", self.wire.remote_address)
                    self.stop_receiving()
                    self.wire.close(4008, "slow consumer")
                    return
                transport = self.wire.transport
                if transport is None or transport.is_closing():
                    return
                # What piled up while the socket was full, before it moves to the socket (where
                # the kernel may take much of it at once).
                self._note_pressure()
                self._write()
                if not self.outbox:
                    return
        finally:
            self._drain = None
            # Requests held while over the limit (`on_message`) are answered now.
            self.wire.release()

    async def wait_writable(self) -> None:
        """Until the socket takes data again: no drain task is waiting for it (asyncio.wait, so
        that a cancelled waiter does not cancel the drain)."""
        while (drain := self._drain) is not None:
            await asyncio.wait((drain,))

    def failed(self, what: str, exc: BaseException) -> None:
        """Work for this connection raised unexpectedly (delivering: the hub let it go, and
        the others got their events; a catch-up; a request; its heartbeat or keepalive): it is
        closed, as it may have lost events or be owed an answer that will not come."""
        log.error("%s for %s failed; closing it", what, self.wire.remote_address, exc_info=exc)
        self.stop_receiving()
        self.wire.fail(CloseCode.INTERNAL_ERROR, "internal error")

    def send_control(self, message: bytes) -> None:
        self.outbox.control(message)
        self.flush()

    # -- deadlines -----------------------------------------------------------------------------
    def _later(self, name: str, delay: float, callback: Callable[..., None], *args: Any) -> None:
        old = self._take_timer(name)
        if old is not None:
            old.cancel()
        if self._timers is None:
            self._timers = {}
        self._timers[name] = asyncio.get_running_loop().call_later(max(0.0, delay), callback, *args)

    def _take_timer(self, name: str) -> asyncio.TimerHandle | None:
        return None if self._timers is None else self._timers.pop(name, None)

    def _close_in(self, name: str, delay: float, notice: str, code: int, reason: str) -> None:
        """Close with (code, reason) after `delay`, with a `notice` `lifetime_notice_s` before."""
        lead = min(self.server.config.limits.lifetime_notice_s, max(0.0, delay))
        self._later(name, delay - lead, self._notice, name, notice, lead, code, reason)

    def _notice(self, name: str, notice: str, close_in: float, code: int, reason: str) -> None:
        self.send_control(notice_message(notice, close_in))
        self._later(name, close_in, self.close_soon, code, reason)

    def close_soon(self, code: int, reason: str) -> None:
        """Stop sending data and close the WebSocket with (code, reason)."""
        if self.closing:
            return
        log.info("closing %s: %d %s", self.wire.remote_address, code, reason)
        self.stop_receiving()
        self.wire.close(code, reason)

    def _auth_deadline(self) -> None:
        if self.session.awaiting_auth:
            self.server.metrics.auth_failures += 1
            self.close_soon(UNAUTHORIZED, "auth timeout")

    def _authorized(self, grant: Grant) -> None:
        """The client has a grant (from the handshake or an `auth` message): data may flow."""
        log.info("%s authenticated as %s", self.wire.remote_address, grant.subject)
        timer = self._take_timer("auth")
        if timer is not None:
            timer.cancel()
        self.server.hub.attach(self.sub)
        expiry = self._take_timer("expiry")  # a refresh replaces the old deadline
        if expiry is not None:
            expiry.cancel()
        if grant.expires_at is not None:
            delay = grant.expires_at - time.time()
            self._close_in("expiry", delay, "token_expiring", UNAUTHORIZED, "token expired")

    # -- requests ------------------------------------------------------------------------------
    def start(self) -> None:
        """The handshake is done: welcome the client and set its deadlines."""
        cfg = self.server.config
        session = self.session
        self.send_control(
            welcome_message(
                cfg.limits,
                cfg.heartbeat_ms,
                auth_required=session.awaiting_auth,
                grant=session.grant,
            )
        )
        if cfg.limits.max_lifetime_s > 0:
            self._close_in(
                "lifetime", cfg.limits.max_lifetime_s, "max_lifetime", 1001, "max lifetime"
            )
        if session.awaiting_auth:
            self._later("auth", cfg.auth.timeout_s, self._auth_deadline)
        elif session.grant is not None:
            self._authorized(session.grant)
        else:
            self.server.hub.attach(self.sub)

    def on_message(self, data: bytes) -> bool:
        """One request from the client; False while it has to wait (the wire holds it and
        stops reading until `Wire.release`)."""
        if self.closing:
            return True  # the close is under way: act on nothing more
        if self._listing is not None:
            # Requests are answered in order, and a client asking for lists faster than they
            # are read back makes them wait in its socket, not as replies.
            return False
        if self._over_since is not None and self._drain is not None:
            # Over its limit and not reading: answer nothing more (replies are never shed)
            # until it reads; its requests wait in the socket meanwhile.
            return False
        action = self.session.receive(data, time.monotonic(), time.time_ns())
        if isinstance(action, Reply):
            self.send_control(action.message)
        elif isinstance(action, Rejected):
            self.server.metrics.rejected_requests += 1
            self.send_control(action.message)
        elif isinstance(action, Authenticated):
            self._authorized(action.grant)
            self.send_control(action.reply)
        elif isinstance(action, Subscribe):
            self._subscribe(action)
        elif isinstance(action, Unsubscribe):
            self._unsubscribe(action)
        elif isinstance(action, ListChannels):
            self._list(action.id)
        elif isinstance(action, Close):
            if action.code == UNAUTHORIZED:
                self.server.metrics.auth_failures += 1
            log.info("closing %s: %d %s", self.wire.remote_address, action.code, action.reason)
            self.stop_receiving()
            self.wire.close(action.code, action.reason)
        return True

    def _subscribe(self, req: Subscribe) -> None:
        hub = self.server.hub
        reader = self.server.reader
        hub.subscribe(self.sub, *req.added, fields=req.fields, max_hz=req.max_hz)
        self.server.demand.changed(req.added)
        self.server.metrics.subscriptions += len(req.added)
        plan = plan_subscribe(
            req,
            hub.known_matching,
            self.outbox.positions,
            reader.follower.position_of,
            reader.up,
        )
        #: Where the client stands on each channel it had no position on: the ack says it, so
        #: that a client that gets no event before its connection drops can still resume.
        placed = plan.placed
        for channel, position in placed.items():
            self.outbox.expect(channel, *position)
        # Channels the reader does not follow yet, wanted from now on: placed where the reader
        # starts them, at its next sync (`StreamReader.when_followed`), without a catch-up.
        from_now = [c for c, target in plan.targets.items() if isinstance(target, FromNow)]
        targets = {c: t for c, t in plan.targets.items() if not isinstance(t, FromNow)}
        if not targets and not plan.wildcards and not from_now:
            self.send_control(subscribed_message(req.id, req.all_channels, placed))
            return
        #: Parts of the request still to be placed (catch-up, reader); acknowledged at 0.
        parts = [bool(targets or plan.wildcards) + bool(from_now)]

        def part_done() -> None:
            parts[0] -= 1
            if not parts[0] and not self.closing:
                self.send_control(subscribed_message(req.id, req.all_channels, placed))

        def positioned(fresh: list[Channel]) -> None:
            # Acknowledged once the starting points are read from Redis, so that everything
            # published after the client sees the ack comes after its snapshot or resume point.
            for channel in fresh:
                placed[channel] = self.outbox.positions.get(channel, START)
            part_done()

        def followed(positions: dict[Channel, StreamPosition | None]) -> None:
            if self.closing:
                return
            late: dict[Channel, Target] = {}
            catching_up = self._catching_up
            for channel, position in positions.items():
                if not hub.follows(self.sub, channel) or channel in catching_up:
                    continue  # unsubscribed meanwhile, or another request catches it up
                if channel in self.outbox.positions:
                    placed[channel] = self.outbox.positions[channel]
                elif position is None:
                    late[channel] = FROM_NOW  # not followed after all: the catch-up way
                else:
                    self.outbox.expect(channel, *position)
                    placed[channel] = position
            if late:
                self.catchup.add(late, positioned)
            else:
                part_done()

        if targets or plan.wildcards:
            self.catchup.add(targets, positioned, plan.wildcards)
        if from_now:
            reader.when_followed(from_now, followed)

    async def _expand(self, wildcards: list[ChannelPattern]) -> list[Channel]:
        """The channels of `wildcards` this connection still follows, after a registry read."""
        with contextlib.suppress(RedisUnavailable):
            await self.server.reader.refresh_registry()
        hub = self.server.hub
        return [
            channel
            for pattern in wildcards
            for channel in hub.known_matching(pattern)
            if hub.follows(self.sub, channel)
        ]

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        if self._tasks is None:
            self._tasks = set()
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if self._tasks is not None:
            self._tasks.discard(task)
            if not self._tasks:
                self._tasks = None
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.failed("a request", exc)

    def _list(self, request_id: RequestId) -> None:
        self._listing = self._spawn(self._answer_list(request_id))

    async def _answer_list(self, request_id: RequestId) -> None:
        try:
            with contextlib.suppress(RedisUnavailable):
                await self.server.reader.refresh_registry()
        finally:
            self._listing = None
        grant = self.session.grant
        names = sorted(
            c.name for c in self.server.hub.known if grant is None or grant.allows_channel(c)
        )
        self.send_control(reply("channels", request_id, channels=names))
        self.wire.release()

    def _unsubscribe(self, req: Unsubscribe) -> None:
        hub = self.server.hub
        hub.unsubscribe(self.sub, *req.removed)
        self.server.demand.changed(req.removed)
        self.server.metrics.subscriptions -= len(req.removed)
        concerned = set(self.outbox.positions) | self._catching_up | set(self.sub.holding)
        gone = [c for c in concerned if not hub.follows(self.sub, c)]
        # No more reads for them, nothing held: from the ack on, no event of theirs is queued.
        if self._catchup is not None:
            self._catchup.drop(gone)
        for channel in gone:
            # Forget the position, or a later subscribe would see a hole it never asked for.
            self.outbox.forget(channel)
        self.send_control(reply("unsubscribed", req.id, channels=list(req.all_channels)))

    def tend(self, now: float) -> None:
        """A heartbeat and a keepalive ping when either is due (`TickwireServer._tend`)."""
        self.heartbeat(now)
        cfg = self.server.config
        self.keepalive(now, cfg.ping_interval_s, cfg.ping_timeout_s)

    def heartbeat(self, now: float) -> None:
        if self.session.awaiting_auth:
            return
        if now - self.last_write >= self.server.config.heartbeat_ms / 1000 and not self.outbox:
            self.send_control(heartbeat_message(time.time_ns(), self.outbox.last_sent()))

    def keepalive(self, now: float, interval: float, timeout: float) -> None:
        """Ping the client when a ping is due; close with 1011 `keepalive ping timeout` when
        its pong has not come `timeout` after the ping, as websockets does. Called for every
        connection in the server's rounds (`tend`)."""
        if self.closing:
            return
        wire = self.wire
        if wire.ping_out is not None:
            if now - self.pinged_at > timeout:
                log.info("closing %s: no pong within %g s", wire.remote_address, timeout)
                self.stop_receiving()
                wire.fail(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
            return
        if now >= self.ping_due and wire.ping():
            self.pinged_at = now
            self.ping_due = now + interval

    def stop_receiving(self) -> None:
        """Stop queueing data for this client (it is being closed): its memory goes at once."""
        self.closing = True
        self.server.demand.changed(self.server.hub.patterns_of(self.sub))
        self.server.hub.detach(self.sub)
        self.outbox.take()

    def cleanup(self) -> None:
        self.closing = True
        for timer in (self._timers or {}).values():
            timer.cancel()
        self._timers = None
        if self._catchup is not None:
            self._catchup.close()
        for task in list(self._tasks or ()):
            task.cancel()
        if self._drain is not None:
            self._drain.cancel()
        # Freed by reference counting alone (see `Wire.connection_lost`): the subscriber's
        # and the catch-up's callbacks are this connection's bound methods.
        self.sub.flush = _nothing
        self.sub.write_now = None
        self.sub.on_error = _closed_already
        self._catchup = None
        self.server.metrics.subscriptions -= len(self.session.subscriptions)
