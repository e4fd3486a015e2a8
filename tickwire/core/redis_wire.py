"""A lean asyncio Redis connection: hiredis packs and parses, one owner, pipelining.

Why not redis-py on the hot paths: its asyncio client packs commands in Python (publish tops out
near 100 k events/s), and a cancelled or timed-out command can leave a pooled connection one reply
behind (redis-py #2624/#2665). A `RedisConnection` has exactly one user; any failure, timeout or
cancellation while a reply is outstanding closes it, so a late reply can never reach another
request. Callers reconnect with `RedisConnection.open`.
"""

from __future__ import annotations

import asyncio
from asyncio import BaseProtocol, Transport
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlparse

import hiredis

from tickwire.core.commands import Arg, Command, Packed, RedisReplyError
from tickwire.core.errors import ConfigError, RedisTimeout, RedisUnavailable
from tickwire.core.tls import TLS_OPTIONS, ClientTls
from tickwire.core.urls import redact_url

_P = TypeVar("_P", bound=BaseProtocol)


@dataclass(frozen=True, slots=True)
class RedisAddress:
    host: str
    port: int
    db: int = 0
    username: str | None = None
    password: str | None = None
    #: A Unix socket's path (`unix://` URLs); host and port are then unused. On one machine a
    #: Unix socket costs about a third less per round trip than loopback TCP (redis-benchmark
    #: PING on a 2-core development machine: 28 k against 18 k round trips/s).
    path: str | None = None
    #: TLS (`rediss://`), None: plain TCP.
    tls: ClientTls | None = None

    @classmethod
    def parse(cls, url: str) -> RedisAddress:
        """`redis://[[user]:password@]host[:port][/db]`, the same over TLS as
        `rediss://…[?ssl_ca_certs=…]` (see `tickwire.core.tls`) or, as redis-py spells
        it, `unix://[[user]:password@]/path/to/redis.sock[?db=N]`."""
        u = urlparse(url)
        if u.scheme not in ("redis", "rediss", "unix", ""):
            raise ConfigError(
                f"unsupported Redis URL scheme in {redact_url(url)!r} (use redis://host:port/db, "
                "rediss://host:port/db for TLS or unix:///path/to/redis.sock?db=N)"
            )
        tls = _tls_of(u.scheme, u.query, url)
        try:
            if u.scheme == "unix":
                if not u.path:
                    raise ConfigError(f"no socket path in Redis URL {redact_url(url)!r}")
                db_text = parse_qs(u.query).get("db", ["0"])[-1]
                db, port, path = int(db_text), 0, unquote(u.path)
            else:
                db, port, path = int(u.path.lstrip("/") or 0), u.port or 6379, None
        except ValueError:
            raise ConfigError(f"invalid Redis URL {redact_url(url)!r}") from None
        return cls(
            host=u.hostname or "127.0.0.1",
            port=port,
            db=db,
            username=unquote(u.username) if u.username else None,
            password=unquote(u.password) if u.password else None,
            path=path,
            tls=tls,
        )

    async def connect(self, factory: Callable[[], _P], timeout: float) -> tuple[Transport, _P]:
        """A connected transport and protocol; RedisUnavailable if Redis cannot be reached."""
        loop = asyncio.get_running_loop()
        try:
            if self.path is not None:
                opening = loop.create_unix_connection(factory, self.path)
            elif self.tls is not None:
                opening = loop.create_connection(
                    factory, self.host, self.port, ssl=self.tls.context(), server_hostname=self.host
                )
            else:
                opening = loop.create_connection(factory, self.host, self.port)
            async with asyncio.timeout(timeout):
                transport, protocol = await opening
        except (OSError, TimeoutError) as exc:
            why = str(exc) or "timeout"
            # A TLS handshake unanswered (Redis takes it for an unfinished inline command) or
            # answered in plain text: the usual mistake, the plain port.
            if self.tls is not None and (why == "timeout" or "WRONG_VERSION_NUMBER" in why):
                why += " (not a TLS port? rediss:// needs Redis's tls-port)"
            raise RedisUnavailable(f"cannot connect to {self}: {why}") from None
        return transport, protocol

    def auth_command(self) -> list[Arg] | None:
        """The AUTH a new connection sends first (None without a password)."""
        if self.password is None:
            return None
        return ["AUTH", self.username, self.password] if self.username else ["AUTH", self.password]

    def __str__(self) -> str:
        # Never shows the password.
        if self.path is not None:
            return f"unix://{self.path}?db={self.db}"
        return f"{'rediss' if self.tls else 'redis'}://{self.host}:{self.port}/{self.db}"


def _tls_of(scheme: str, query: str, url: str) -> ClientTls | None:
    """The TLS a URL asks for: `rediss://` with its `ssl_*` options, None for the others (where
    an `ssl_*` option is a mistake worth saying: it would be ignored)."""
    options = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
    ssl_given = sorted(k for k in options if k.startswith("ssl"))
    if scheme != "rediss":
        if ssl_given:
            raise ConfigError(
                f"{', '.join(ssl_given)} in {redact_url(url)!r}: TLS options need rediss://"
            )
        return None
    unknown = sorted(set(options) - set(TLS_OPTIONS))
    if unknown:
        raise ConfigError(
            f"unknown option {', '.join(unknown)} in {redact_url(url)!r} "
            f"(a rediss:// URL takes {', '.join(TLS_OPTIONS)})"
        )
    return ClientTls.from_redis_options(options, repr(redact_url(url)))


class _Replies(asyncio.Protocol):
    """Parses replies as they arrive; wakes the one waiter once it has as many as it wants.

    A protocol, not a stream reader: a reply that is already in when asked for costs no await,
    and a wait costs one future and one timer handle (the stream reader's buffer copies and
    `asyncio.timeout`'s bookkeeping were a tenth of a paced feed's CPU)."""

    def __init__(self) -> None:
        # Error replies at any depth (inside an EXEC reply too) come back as RedisReplyError.
        self.parser = hiredis.Reader(replyError=RedisReplyError)
        self.transport: Transport | None = None
        self.ready: deque[Any] = deque()
        #: The waiter of `RedisConnection.replies`, and how many replies it needs.
        self.waiter: asyncio.Future[None] | None = None
        self.wanted = 0
        #: Why the connection ended (None while it is up).
        self.lost: str | None = None
        #: Called after replies arrive and when the connection ends (`RedisConnection.listen`).
        self.listener: Callable[[], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        parser.feed(data)
        ready = self.ready
        try:
            while (reply := parser.gets()) is not False:
                ready.append(reply)
        except hiredis.ProtocolError as exc:
            self.lost = f"lost connection to Redis: {exc or type(exc).__name__}"
            if self.transport is not None:
                self.transport.close()
        if self.waiter is not None and (len(ready) >= self.wanted or self.lost is not None):
            _wake(self.waiter)
        if self.listener is not None:
            self.listener()

    def eof_received(self) -> bool | None:
        self.lost = self.lost or "lost connection to Redis: Redis closed the connection"
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = self.lost or f"lost connection to Redis: {exc or 'closed'}"
        if self.waiter is not None:
            _wake(self.waiter)
        if self.listener is not None:
            self.listener()


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class RedisConnection:
    """One TCP connection to Redis, used by one task at a time."""

    def __init__(self, transport: Transport, protocol: _Replies) -> None:
        self._transport = transport
        self._protocol = protocol
        self._closed = False

    @classmethod
    async def open(cls, url: str | RedisAddress, timeout: float = 2.0) -> RedisConnection:
        addr = url if isinstance(url, RedisAddress) else RedisAddress.parse(url)
        transport, protocol = await addr.connect(_Replies, timeout)
        conn = cls(transport, protocol)
        try:
            auth = addr.auth_command()
            if auth is not None:
                await conn.execute(*auth, timeout=timeout)
            if addr.db:
                await conn.execute("SELECT", addr.db, timeout=timeout)
        except RedisReplyError as exc:
            conn.close()
            raise RedisUnavailable(f"{addr} refused the connection set-up: {exc}") from None
        return conn

    @property
    def closed(self) -> bool:
        """Closed here, or ended by the peer (once the loop has seen it)."""
        return self._closed or self._protocol.lost is not None or self._transport.is_closing()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            # Not again after a parse error closed it: see `RedisSubscription.close`.
            if not self._transport.is_closing():
                self._transport.close()

    def listen(self, listener: Callable[[], None] | None) -> None:
        """Call `listener` after replies arrive and when the connection ends (None: stop).
        It may take the replies that are in with `take_ready`, when no `replies` waits."""
        self._protocol.listener = listener

    @property
    def ready(self) -> int:
        """Replies that have arrived and are not taken yet."""
        return len(self._protocol.ready)

    def peek(self, n: int) -> list[Any]:
        """The next `n` replies that have arrived, left in place."""
        ready = self._protocol.ready
        return [ready[i] for i in range(n)]

    def take_ready(self, n: int) -> list[Any]:
        """The next `n` replies, which must have arrived (`ready`)."""
        ready = self._protocol.ready
        return [ready.popleft() for _ in range(n)]

    async def execute(self, *args: Arg, timeout: float | None = None) -> Any:
        """One command; raises RedisReplyError on an error reply."""
        (reply,) = await self.pipeline([args], timeout=timeout)
        if isinstance(reply, RedisReplyError):
            raise reply
        return reply

    async def pipeline(
        self, commands: Sequence[Command], timeout: float | None = None
    ) -> list[Any]:
        """Send all commands in one write, return their replies in order.

        An error reply comes back as a RedisReplyError value in its place. Connection loss,
        timeout or cancellation close the connection and raise (RedisUnavailable or the
        cancellation), because the replies still owed would desynchronise it.
        """
        self.send(commands)
        return await self.replies(len(commands), timeout)

    def send(self, commands: Sequence[Command]) -> None:
        """Write commands without waiting; `replies(len(commands))` must follow."""
        if self._closed:
            raise RedisUnavailable("connection is closed")
        if self._protocol.lost is not None or self._transport.is_closing():
            # The peer went away while we were idle (e.g. a reset). uvloop raises RuntimeError
            # on a write to such a transport where asyncio drops it: report both alike.
            self.close()
            raise RedisUnavailable("lost connection to Redis: closed by the peer")
        pack = hiredis.pack_command
        try:
            self._transport.write(
                b"".join(
                    [c.wire if isinstance(c, Packed) else pack(tuple(c)) for c in commands]  # type: ignore[arg-type]
                )
            )
        except (OSError, RuntimeError) as exc:
            self.close()
            raise RedisUnavailable(f"lost connection to Redis: {exc}") from None

    async def wait_ready(self, n: int, timeout: float | None = None) -> bool:
        """Until `n` replies have arrived or the connection ends (True; `replies` then takes
        them or says why), or `timeout` passes (False). The connection stays open either way:
        a caller may go on waiting."""
        p = self._protocol
        if len(p.ready) >= n or self._closed or p.lost is not None:
            return True
        loop = asyncio.get_running_loop()
        waiter = p.waiter = loop.create_future()
        p.wanted = n
        timer = None if timeout is None else loop.call_later(timeout, _wake, waiter)
        try:
            await waiter
        finally:
            p.waiter = None
            if timer is not None:
                timer.cancel()
        return len(p.ready) >= n or p.lost is not None

    async def replies(self, n: int, timeout: float | None = None) -> list[Any]:
        """The next `n` replies (see `pipeline` for errors)."""
        p = self._protocol
        if len(p.ready) < n:
            if self._closed:
                raise RedisUnavailable("connection is closed")
            try:
                await self.wait_ready(n, timeout)
            except BaseException:
                self.close()
                raise
            if len(p.ready) < n:
                self.close()
                if p.lost is not None:
                    raise RedisUnavailable(p.lost)
                raise RedisTimeout(f"no reply from Redis within {timeout} s")
        return self.take_ready(n)
