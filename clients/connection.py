"""Asyncio client: a `Feed` that keeps a WebSocket connection up and delivers events exactly once.

    import asyncio
    import tickwire.clients as tw

    async def main() -> None:
        async with tw.connect("ws://127.0.0.1:8765/ws") as feed:
            await feed.subscribe("trades:BTC-USD", "quotes:*", snapshot=True)
            async for msg in feed:
                match msg:
                    case tw.Received(channel=ch, event=tw.Trade(price=p), latency_ns=lat):
                        print(f"{ch} {p} ({lat / 1e6:.2f} ms)")
                    case tw.Gap() | tw.Reset():
                        print("not delivered:", msg)

    asyncio.run(main())

When the connection drops, for whatever reason, the feed reconnects by itself with exponential
backoff and full jitter, subscribes again and resumes every channel from the last event it
delivered; the iterator just goes on. It stops retrying only when the server refuses the
credentials (HTTP 401/403 or close code 4001/4003: `AuthenticationFailed`), or after
`max_attempts` failed attempts in a row if set (`ConnectFailed`).

The protocol logic lives in the sans-I/O `ClientSession`; this module only moves frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl as ssl_module
import time
from asyncio import FIRST_COMPLETED
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, fields, replace
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import (
    ConnectionClosed,
    InvalidHandshake,
    InvalidMessage,
    InvalidStatus,
    InvalidURI,
)
from websockets.protocol import State

from tickwire import __version__
from tickwire.clients.errors import (
    AuthenticationFailed,
    CertificateRefused,
    ConnectFailed,
    ConnectionLost,
    FeedClosed,
    InvalidFrame,
    ServerError,
)
from tickwire.clients.messages import (
    ChannelList,
    EventBatch,
    Gap,
    Heartbeat,
    Message,
    Pong,
    Position,
    Received,
    Reset,
    ResumeNeeded,
    Status,
    Subscribed,
    Unsubscribed,
    Welcome,
)
from tickwire.clients.session import ClientSession
from tickwire.core.waits import cancel_and_wait

log = logging.getLogger("tickwire.clients")

#: Close codes and HTTP statuses that mean "your credentials were refused": never retried.
AUTH_CLOSE_CODES = frozenset({4001, 4003})
AUTH_HTTP_STATUSES = frozenset({401, 403})


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """How a `Feed` connects, waits and reconnects. Pass fields to `connect()` as keywords."""

    # Reconnection: attempt n waits uniform(0, min(backoff_max_s, backoff_initial_s·factor^n)).
    backoff_initial_s: float = 0.1
    backoff_max_s: float = 10.0
    backoff_factor: float = 2.0
    #: Failed attempts in a row before giving up with ConnectFailed (None: keep trying).
    max_attempts: int | None = None
    #: Retry the first connection too, instead of raising ConnectFailed at once.
    wait_for_server: bool = False
    # Timeouts
    open_timeout_s: float = 10.0
    request_timeout_s: float = 10.0
    close_timeout_s: float = 2.0
    ping_interval_s: float | None = 20.0
    ping_timeout_s: float | None = 20.0
    #: Reconnect when nothing came for this many heartbeat intervals (None: rely on pings only).
    idle_heartbeats: float | None = 3.0
    # Limits
    max_frame_bytes: int = 16 * 1024 * 1024
    #: Messages (event batches and notices) held for the application; past it reading pauses.
    max_queue: int = 1024
    # Delivery
    #: Keep each event's decoded JSON object (`Received.raw`), e.g. to print it unchanged.
    keep_raw: bool = False
    #: Reconnects tried to fill an unexplained hole before announcing it as a Gap.
    max_resume_attempts: int = 3
    #: Extra HTTP headers for the opening handshake.
    headers: tuple[tuple[str, str], ...] = ()
    #: For a `wss://` URL, whom to trust: e.g. `ssl.create_default_context(cafile="ca.pem")`
    #: for a private CA. None: the system's CAs.
    ssl: ssl_module.SSLContext | None = None


class Backoff:
    """Exponential backoff with full jitter: attempt n waits uniform(0, min(cap, base·factor^n))."""

    def __init__(
        self,
        initial_s: float,
        max_s: float,
        factor: float = 2.0,
        rng: random.Random | None = None,
    ) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.factor = factor
        self._rng = rng or random.Random()
        self.attempts = 0

    def ceiling(self) -> float:
        """The longest the next delay can be."""
        return min(self.max_s, self.initial_s * self.factor ** min(self.attempts, 64))

    def next_delay(self) -> float:
        delay = self._rng.uniform(0.0, self.ceiling())
        self.attempts += 1
        return delay

    def reset(self) -> None:
        self.attempts = 0


# --- Notices the feed adds to the server's messages --------------------------------------------


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The connection dropped; the feed tries again in `retry_in_s` (attempt `attempt`)."""

    reason: str
    retry_in_s: float
    attempt: int


@dataclass(frozen=True, slots=True)
class Reconnected:
    """A new connection is up and every subscription restored (resuming where delivery stood)."""

    url: str
    attempts: int


#: What iterating a feed yields.
FeedMessage = Received | Gap | Reset | Status | ServerError | Disconnected | Reconnected
#: What `Feed.batches()` yields.
BatchMessage = EventBatch | Gap | Reset | Status | ServerError | Disconnected | Reconnected


@dataclass
class FeedStats:
    connects: int = 0
    #: Connection attempts that failed (refused, timed out, rejected handshake).
    failed_attempts: int = 0
    #: Connections replaced because events were found missing (a hole, or a heartbeat ahead).
    resumes_asked: int = 0
    heartbeats: int = 0


class _Retry(Exception):
    """A connection attempt failed in a way worth retrying; the text says why."""


class _End:
    """Queue marker: the feed ended (closed, or a fatal error)."""


_END = _End()


class Feed:
    """One logical market-data feed over a sequence of WebSocket connections.

    Use `connect()` rather than building one: `async with connect(url) as feed: ...`.
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        config: ClientConfig | None = None,
        *,
        rng: random.Random | None = None,
        clock_ns: Callable[[], int] = time.time_ns,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.url = url
        self.config = cfg = config or ClientConfig()
        self.stats = FeedStats()
        self._token = token
        self._clock_ns = clock_ns
        self._sleep = sleep
        self._backoff = Backoff(cfg.backoff_initial_s, cfg.backoff_max_s, cfg.backoff_factor, rng)
        self._session = ClientSession(
            keep_raw=cfg.keep_raw, max_resume_attempts=cfg.max_resume_attempts
        )
        self._queue: asyncio.Queue[BatchMessage | _End] = asyncio.Queue(cfg.max_queue)
        self._ws: ClientConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._ended = False
        self._error: BaseException | None = None
        self._closing = False
        # Replies awaited by request id.
        self._waiters: dict[int, asyncio.Future[Message | None]] = {}
        # Subscription changes settled by the next resubscription, and the one in flight.
        self._resync_waiters: list[asyncio.Future[Message | None]] = []
        self._resync_batch: list[asyncio.Future[Message | None]] = []
        self._resync_ids: set[int] = set()
        self._established = False
        self._connected = asyncio.Event()
        self._ready = asyncio.Event()  # the first connection was established
        self._items: Iterator[Received] = iter(())

    # -- life cycle ----------------------------------------------------------------------------

    async def start(self) -> Feed:
        """Connect and wait for the server's welcome; then the feed reads in the background.

        Raises ConnectFailed if the server cannot be reached (or does not welcome us within
        `open_timeout_s`), AuthenticationFailed if it refuses the credentials.
        """
        if self._task is not None:
            return self
        try:
            ws = await self._open()
        except _Retry as exc:
            if not self.config.wait_for_server:
                raise ConnectFailed(f"cannot connect to {self.url}: {exc}") from None
            ws = await self._reconnect(str(exc), announce=False)
        task = self._task = asyncio.create_task(self._run(ws), name=f"tickwire-feed {self.url}")
        ready = asyncio.create_task(self._ready.wait())
        try:
            await asyncio.wait(
                {ready, task}, timeout=self.config.open_timeout_s, return_when=FIRST_COMPLETED
            )
        finally:
            ready.cancel()
        if self._ready.is_set():
            return self
        error = self._error
        await self.close()
        if error is not None:
            raise error
        raise ConnectFailed(f"{self.url} did not welcome us within {self.config.open_timeout_s} s")

    async def close(self) -> None:
        """Close the connection and end iteration; pending requests raise FeedClosed."""
        if self._closing:
            return
        self._closing = True
        task, self._task = self._task, None
        ws = self._ws
        if ws is not None:
            # The reader sees the close and ends; nothing to cancel mid-frame.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.config.close_timeout_s + 1):
                    await ws.close()
        if task is not None:
            await cancel_and_wait(task)
        self._finish(None)

    async def __aenter__(self) -> Feed:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- state ---------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """A connection is up and every subscription has been acknowledged on it."""
        return self._ws is not None and self._established

    @property
    def subscriptions(self) -> tuple[str, ...]:
        return self._session.subscriptions

    @property
    def positions(self) -> dict[str, Position]:
        """Last delivered `(epoch, seq)` per channel."""
        return self._session.positions

    @property
    def welcome(self) -> Welcome | None:
        return self._session.welcome

    @property
    def session(self) -> ClientSession:
        return self._session

    # -- requests ------------------------------------------------------------------------------

    async def subscribe(
        self,
        *channels: str,
        snapshot: bool = False,
        fields: Iterable[str] | None = None,
        max_hz: float | None = None,
    ) -> Subscribed:
        """Subscribe to channels or patterns (`trades:BTC-USD`, `quotes:*`).

        Returns the server's acknowledgement; raises ServerError if it refused (then none of
        these is subscribed), ChannelError for a malformed name before sending anything. If the
        connection is down the subscription is made as soon as it is back. With `snapshot`, the
        latest event of each channel comes first. With `fields`, events carry only those type
        fields (and the common ones); the others are None (see docs/protocol.md, Projection).
        With `max_hz`, each channel sends at most that many frames a second: the latest quote
        or bar (`EventBatch.skipped` says how many it superseded), every trade (see
        docs/protocol.md, Throttle).

            await feed.subscribe("trades:BTC-USD", "bars.1s:*", snapshot=True)
            await feed.subscribe("quotes:*", fields=["bid", "ask"])
            await feed.subscribe("quotes:*", max_hz=4)
        """
        self._check_open()
        req = self._session.subscribe(channels, snapshot=snapshot, fields=fields, max_hz=max_hz)
        reply = await self._settle(req.id, req.frame)
        if reply is None:
            return Subscribed(None, self._session.subscriptions)
        assert isinstance(reply, Subscribed)
        return reply

    async def unsubscribe(self, *channels: str) -> Unsubscribed:
        """Remove exactly these subscriptions; their events stop being delivered at once."""
        self._check_open()
        req = self._session.unsubscribe(channels)
        reply = await self._settle(req.id, req.frame)
        if reply is None:
            return Unsubscribed(None, self._session.subscriptions)
        assert isinstance(reply, Unsubscribed)
        return reply

    async def ping(self) -> float:
        """Round trip to the server and back, in seconds."""
        t0 = time.perf_counter()
        reply = await self._request(self._session.ping)
        assert isinstance(reply, Pong)
        return time.perf_counter() - t0

    async def list_channels(self) -> list[str]:
        """Channels the server knows (every channel ever published)."""
        reply = await self._request(self._session.list_channels)
        assert isinstance(reply, ChannelList)
        return list(reply.channels)

    async def _settle(self, rid: int, frame: str) -> Message | None:
        """Send a subscription change now, or leave it to the next resubscription."""
        fut: asyncio.Future[Message | None] = asyncio.get_running_loop().create_future()
        ws = self._ws
        if ws is not None and self._session.is_open:
            self._waiters[rid] = fut
            # If the connection drops, the reader moves `fut` on to the resubscription.
            with contextlib.suppress(ConnectionClosed):
                await ws.send(frame)
        else:
            self._resync_waiters.append(fut)
        try:
            async with asyncio.timeout(self.config.request_timeout_s):
                reply = await fut
        finally:
            self._waiters.pop(rid, None)
        if isinstance(reply, ServerError):
            raise reply
        return reply

    async def _request(self, make: Callable[[], Any]) -> Message:
        """A ping or list: sent once connected; re-sent if the connection drops first."""
        self._check_open()
        async with asyncio.timeout(self.config.request_timeout_s):
            while True:
                await self._connected.wait()
                ws = self._ws
                if ws is None:
                    continue
                req = make()
                fut: asyncio.Future[Message | None] = asyncio.get_running_loop().create_future()
                self._waiters[req.id] = fut
                try:
                    await ws.send(req.frame)
                    reply = await fut
                except (ConnectionClosed, ConnectionLost):
                    continue
                finally:
                    self._waiters.pop(req.id, None)
                if isinstance(reply, ServerError):
                    raise reply
                assert reply is not None
                return reply

    def _check_open(self) -> None:
        if self._closing or self._ended:
            raise FeedClosed("the feed is closed") from self._error

    # -- receiving -----------------------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[FeedMessage]:
        return self

    async def __anext__(self) -> FeedMessage:
        """Next event (as `Received`) or notice; the loop ends when the feed is closed."""
        while True:
            for item in self._items:
                return item
            try:
                msg = await self._next_message()
            except FeedClosed:
                if self._error is not None:
                    raise self._error from None
                raise StopAsyncIteration from None
            if isinstance(msg, EventBatch):
                self._items = iter(msg)
                continue
            return msg

    async def recv(self) -> FeedMessage:
        """Next message, like iterating; raises FeedClosed (or the fatal error) at the end."""
        try:
            return await self.__anext__()
        except StopAsyncIteration:
            raise FeedClosed("the feed is closed") from None

    async def batches(self) -> AsyncIterator[BatchMessage]:
        """Messages with events grouped per server frame (`EventBatch`), e.g. for `to_numpy()`.

        Use either this or iterating the feed, not both at once.

            async for msg in feed.batches():
                if isinstance(msg, EventBatch):
                    prices = msg.to_numpy()["price"]
        """
        while True:
            try:
                yield await self._next_message()
            except FeedClosed:
                if self._error is not None:
                    raise self._error from None
                return

    async def _next_message(self) -> BatchMessage:
        while True:
            if not self._queue.empty():
                item = self._queue.get_nowait()
            elif self._ended:
                raise FeedClosed("the feed is closed")
            else:
                item = await self._queue.get()
            if not isinstance(item, _End):
                return item

    # -- the connection loop -------------------------------------------------------------------

    async def _open(self) -> ClientConnection:
        """One connection attempt: the open WebSocket, or _Retry / a fatal error."""
        cfg = self.config
        headers = list(cfg.headers)
        if self._token is not None:
            headers.append(("Authorization", f"Bearer {self._token}"))
        # Only for wss://: websockets refuses `ssl` with ws://, and takes None as "no TLS".
        tls: dict[str, Any] = (
            {"ssl": cfg.ssl} if cfg.ssl is not None and self.url.startswith("wss:") else {}
        )
        try:
            ws = await ws_connect(
                self.url,
                **tls,
                additional_headers=headers,
                compression=None,
                user_agent_header=f"tickwire-client/{__version__}",
                open_timeout=cfg.open_timeout_s,
                ping_interval=cfg.ping_interval_s,
                ping_timeout=cfg.ping_timeout_s,
                close_timeout=cfg.close_timeout_s,
                max_size=cfg.max_frame_bytes,
            )
        except InvalidURI as exc:
            raise ConnectFailed(f"invalid URL {self.url!r}: {exc}") from None
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in AUTH_HTTP_STATUSES:
                # The server's reason (tickwire's: a line of text), so the user knows which.
                said = exc.response.body.decode("utf-8", "replace").strip()[:200]
                raise AuthenticationFailed(
                    f"{self.url} refused the credentials (HTTP {status}"
                    + (f": {said})" if said and said.isprintable() else ")")
                ) from None
            self.stats.failed_attempts += 1
            raise _Retry(f"HTTP {status} {exc.response.reason_phrase}".strip()) from None
        except ssl_module.SSLCertVerificationError as exc:
            # Not a server that is down: one that will never be trusted until configured.
            raise CertificateRefused(
                f"{self.url}: the server's certificate was refused: {exc.verify_message} "
                "(a private CA: ClientConfig.ssl, or --cafile for tickwire watch)"
            ) from None
        except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed) as exc:
            self.stats.failed_attempts += 1
            raise _Retry(_describe(exc, tls=self.url.startswith("wss:"))) from None
        self.stats.connects += 1
        return ws

    async def _reconnect(self, reason: str, *, announce: bool = True) -> ClientConnection:
        """Wait with backoff and try again until connected; raises only when retrying is over."""
        limit = self.config.max_attempts
        while True:
            if limit is not None and self._backoff.attempts >= limit:
                raise ConnectFailed(
                    f"cannot connect to {self.url} after {self._backoff.attempts} attempts: {reason}"
                )
            delay = self._backoff.next_delay()
            attempt = self._backoff.attempts
            log.info(
                "%s: %s; reconnecting in %.2f s (attempt %d)", self.url, reason, delay, attempt
            )
            if announce:
                self._notify(Disconnected(reason, delay, attempt))
            await self._sleep(delay)
            try:
                return await self._open()
            except _Retry as exc:
                reason = str(exc)

    async def _run(self, ws: ClientConnection) -> None:
        error: BaseException | None = None
        try:
            while True:
                reason = await self._serve(ws)
                self._lost()
                if self._closing:
                    break
                ws = await self._reconnect(reason)
        except asyncio.CancelledError:
            self._lost()
            raise
        except Exception as exc:  # fatal: auth refused, gave up, or a bug; the iterator raises it
            self._lost()
            error = exc
            if not isinstance(exc, AuthenticationFailed | ConnectFailed):
                log.exception("feed %s failed", self.url)
        self._finish(error)

    async def _serve(self, ws: ClientConnection) -> str:
        """Run one connection until it ends; returns why it ended."""
        self._ws = ws
        self._established = False
        self._connected.set()
        session = self._session
        requests = session.connection_made()
        self._resync_batch, self._resync_waiters = self._resync_waiters, []
        self._resync_ids = {r.id for r in requests}
        graceful = True
        try:
            for req in requests:
                await ws.send(req.frame)
            while True:
                timeout = self._idle_timeout()
                try:
                    async with asyncio.timeout(timeout):
                        frame = await ws.recv()
                except TimeoutError:
                    graceful = False
                    return f"nothing received for {timeout:.1f} s"
                for msg in session.receive(frame, self._clock_ns()):
                    why = await self._dispatch(msg)
                    if why is not None:
                        self.stats.resumes_asked += 1
                        log.info("%s: %s; reconnecting to resume", self.url, why)
                        return why
        except ConnectionClosed as exc:
            rcvd = exc.rcvd
            if rcvd is not None and rcvd.code in AUTH_CLOSE_CODES:
                raise AuthenticationFailed(
                    f"{self.url} closed the connection: {rcvd.code} {rcvd.reason}".strip()
                ) from None
            return _describe(exc)
        except InvalidFrame as exc:
            graceful = False
            log.error("%s sent a frame that breaks protocol v1: %s", self.url, exc)
            return f"protocol error: {exc}"
        finally:
            self._ws = None
            self._established = False
            self._connected.clear()
            if ws.state is not State.CLOSED:
                if graceful:
                    with contextlib.suppress(Exception):
                        await ws.close()
                else:
                    ws.transport.abort()

    def _idle_timeout(self) -> float | None:
        welcome = self._session.welcome
        if welcome is None:
            return self.config.open_timeout_s
        factor = self.config.idle_heartbeats
        if factor is None or welcome.heartbeat_ms <= 0:
            return None
        return max(welcome.heartbeat_ms / 1000 * factor, 0.5)

    async def _dispatch(self, msg: Message) -> str | None:
        """Route one session message; returns a reason when the connection must be replaced."""
        if isinstance(msg, EventBatch | Gap | Reset | Status):
            await self._queue.put(msg)
        elif isinstance(msg, Subscribed | Unsubscribed | Pong | ChannelList | ServerError):
            rid = msg.id
            fut = self._waiters.pop(rid, None) if isinstance(rid, int) else None
            if fut is not None:
                if not fut.done():
                    fut.set_result(msg)
            elif isinstance(rid, int) and rid in self._resync_ids:
                self._resync_ids.discard(rid)
                if isinstance(msg, ServerError):
                    log.warning("%s refused a resubscription: %s", self.url, msg)
                    if not self._resync_batch:
                        await self._queue.put(msg)
                    self._resolve_resync(msg)
                if not self._resync_ids:
                    self._on_established()
            elif isinstance(msg, ServerError):
                await self._queue.put(msg)
        elif isinstance(msg, Welcome):
            if not self._resync_ids:
                self._on_established()
        elif isinstance(msg, ResumeNeeded):
            return msg.reason
        elif isinstance(msg, Heartbeat):
            self.stats.heartbeats += 1
        return None

    def _on_established(self) -> None:
        self._established = True
        self._ready.set()
        attempts = self._backoff.attempts
        self._backoff.reset()
        self._resolve_resync(None)
        if self.stats.connects > 1:
            log.info("%s: reconnected", self.url)
            self._notify(Reconnected(self.url, attempts))

    def _resolve_resync(self, result: Message | None) -> None:
        batch, self._resync_batch = self._resync_batch, []
        for fut in batch:
            if not fut.done():
                fut.set_result(result)

    def _lost(self) -> None:
        """Bookkeeping after a connection ended: unanswered requests wait for the next one."""
        if self._session.is_open:
            for req in self._session.connection_lost():
                fut = self._waiters.pop(req.id, None)
                if fut is None or fut.done():
                    continue
                if req.op in ("subscribe", "unsubscribe"):
                    self._resync_waiters.append(fut)
                else:
                    fut.set_exception(ConnectionLost(f"connection lost before the {req.op} reply"))
        self._resync_waiters[:0] = self._resync_batch
        self._resync_batch = []
        self._resync_ids = set()

    def _notify(self, notice: Disconnected | Reconnected) -> None:
        # Notices never hold the connection loop back: dropped when the application lags.
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(notice)

    def _finish(self, error: BaseException | None) -> None:
        if self._ended:
            return
        self._ended = True
        self._error = error
        failure = error if error is not None else FeedClosed("the feed is closed")
        for fut in [*self._waiters.values(), *self._resync_waiters, *self._resync_batch]:
            if not fut.done():
                fut.set_exception(failure)
                # Nobody may be left to see it.
                fut.exception()
        self._waiters.clear()
        self._resync_waiters.clear()
        self._resync_batch.clear()
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(_END)


def _describe(exc: BaseException, *, tls: bool = False) -> str:
    """Why an attempt failed, for logs and `Disconnected`; `tls`: over `wss://`."""
    if isinstance(exc, InvalidMessage) and isinstance(exc.__cause__, EOFError):
        # A server restarting does this, so it is retried; but a TLS server whose handshake
        # refuses a client certificate tells nothing more either (its asyncio TLS closes
        # without the alert; tickwire's refuses revoked ones after it, with a 401).
        if tls:
            return (
                "the server ended the connection after the TLS handshake without answering "
                "(if this client presents a certificate, the server may have refused it: "
                "from another CA, or expired)"
            )
        return "the server ended the connection without answering"
    if isinstance(exc, ConnectionClosed):
        rcvd = exc.rcvd
        if rcvd is None:
            return "connection lost"
        return f"server closed the connection: {rcvd.code} {rcvd.reason}".rstrip()
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


class Connecting:
    """What `connect()` returns: use with `async with`, or `await` it (then close the feed)."""

    def __init__(self, feed: Feed) -> None:
        self.feed = feed

    def __await__(self) -> Generator[Any, None, Feed]:
        return self.feed.start().__await__()

    async def __aenter__(self) -> Feed:
        return await self.feed.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.feed.close()


_CONFIG_FIELDS = frozenset(f.name for f in fields(ClientConfig))


def connect(
    url: str,
    token: str | None = None,
    *,
    config: ClientConfig | None = None,
    rng: random.Random | None = None,
    clock_ns: Callable[[], int] = time.time_ns,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    **options: Any,
) -> Connecting:
    """Open a feed on `url` (`ws://host:port/ws`); keyword options are `ClientConfig` fields.

        async with connect("ws://127.0.0.1:8765/ws", backoff_max_s=5) as feed:
            await feed.subscribe("trades:BTC-USD")
            async for msg in feed:
                ...

    `token`, if given, is sent as `Authorization: Bearer <token>`. `rng` (backoff jitter),
    `clock_ns` (receive timestamps for latency) and `sleep` (backoff waits) are there for tests.
    Raises ConnectFailed when the server cannot be reached (unless `wait_for_server=True`) and
    AuthenticationFailed when it refuses the token.
    """
    unknown = set(options) - _CONFIG_FIELDS
    if unknown:
        raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
    cfg = replace(config or ClientConfig(), **options)
    return Connecting(Feed(url, token, cfg, rng=rng, clock_ns=clock_ns, sleep=sleep))
