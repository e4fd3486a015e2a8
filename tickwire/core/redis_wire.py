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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlparse

import hiredis

from tickwire.core.commands import Arg, RedisReplyError
from tickwire.core.errors import ConfigError, RedisUnavailable

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

    @classmethod
    def parse(cls, url: str) -> RedisAddress:
        """`redis://[[user]:password@]host[:port][/db]` or, as redis-py spells it,
        `unix://[[user]:password@]/path/to/redis.sock[?db=N]`."""
        u = urlparse(url)
        if u.scheme not in ("redis", "unix", ""):
            raise ConfigError(
                f"unsupported Redis URL scheme in {url!r} "
                "(use redis://host:port/db or unix:///path/to/redis.sock?db=N)"
            )
        try:
            if u.scheme == "unix":
                if not u.path:
                    raise ConfigError(f"no socket path in Redis URL {url!r}")
                db_text = parse_qs(u.query).get("db", ["0"])[-1]
                db, port, path = int(db_text), 0, unquote(u.path)
            else:
                db, port, path = int(u.path.lstrip("/") or 0), u.port or 6379, None
        except ValueError:
            raise ConfigError(f"invalid Redis URL {url!r}") from None
        return cls(
            host=u.hostname or "127.0.0.1",
            port=port,
            db=db,
            username=unquote(u.username) if u.username else None,
            password=unquote(u.password) if u.password else None,
            path=path,
        )

    async def connect(self, factory: Callable[[], _P], timeout: float) -> tuple[Transport, _P]:
        """A connected transport and protocol; RedisUnavailable if Redis cannot be reached."""
        loop = asyncio.get_running_loop()
        try:
            if self.path is not None:
                opening = loop.create_unix_connection(factory, self.path)
            else:
                opening = loop.create_connection(factory, self.host, self.port)
            transport, protocol = await asyncio.wait_for(opening, timeout)
        except (OSError, TimeoutError) as exc:
            raise RedisUnavailable(f"cannot connect to {self}: {exc or 'timeout'}") from None
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
        return f"redis://{self.host}:{self.port}/{self.db}"


class RedisConnection:
    """One TCP connection to Redis, used by one task at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        # Error replies at any depth (inside an EXEC reply too) come back as RedisReplyError.
        self._parser = hiredis.Reader(replyError=RedisReplyError)
        self._closed = False

    @classmethod
    async def open(cls, url: str | RedisAddress, timeout: float = 2.0) -> RedisConnection:
        addr = url if isinstance(url, RedisAddress) else RedisAddress.parse(url)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 22, loop=loop)
        transport, protocol = await addr.connect(
            lambda: asyncio.StreamReaderProtocol(reader, loop=loop), timeout
        )
        conn = cls(reader, asyncio.StreamWriter(transport, protocol, reader, loop))
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
        """Closed here, or reset by the peer (once the loop has seen it); a peer that closed
        its end in order shows only when a read ends."""
        return self._closed or self._writer.transport.is_closing()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._writer.close()

    async def execute(self, *args: Arg, timeout: float | None = None) -> Any:
        """One command; raises RedisReplyError on an error reply."""
        (reply,) = await self.pipeline([args], timeout=timeout)
        if isinstance(reply, RedisReplyError):
            raise reply
        return reply

    async def pipeline(
        self, commands: Sequence[Sequence[Arg]], timeout: float | None = None
    ) -> list[Any]:
        """Send all commands in one write, return their replies in order.

        An error reply comes back as a RedisReplyError value in its place. Connection loss,
        timeout or cancellation close the connection and raise (RedisUnavailable or the
        cancellation), because the replies still owed would desynchronise it.
        """
        self.send(commands)
        return await self.replies(len(commands), timeout)

    def send(self, commands: Sequence[Sequence[Arg]]) -> None:
        """Write commands without waiting; `replies(len(commands))` must follow."""
        if self._closed:
            raise RedisUnavailable("connection is closed")
        if self._writer.transport.is_closing():
            # The peer went away while we were idle (e.g. a reset). uvloop raises RuntimeError
            # on a write to such a transport where asyncio drops it: report both alike.
            self.close()
            raise RedisUnavailable("lost connection to Redis: closed by the peer")
        pack = hiredis.pack_command
        try:
            self._writer.write(b"".join([pack(tuple(c)) for c in commands]))  # type: ignore[arg-type]
        except (OSError, RuntimeError) as exc:
            self.close()
            raise RedisUnavailable(f"lost connection to Redis: {exc}") from None

    async def replies(self, n: int, timeout: float | None = None) -> list[Any]:
        """The next `n` replies (see `pipeline` for errors)."""
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # arrives with the reply, leaving the caller running after it was cancelled.
            async with asyncio.timeout(timeout):
                return await self._read_replies(n)
        except TimeoutError:
            self.close()
            raise RedisUnavailable(f"no reply from Redis within {timeout} s") from None
        except (OSError, EOFError, hiredis.ProtocolError) as exc:
            self.close()
            raise RedisUnavailable(
                f"lost connection to Redis: {exc or type(exc).__name__}"
            ) from None
        except BaseException:
            self.close()
            raise

    async def _read_replies(self, n: int) -> list[Any]:
        parser = self._parser
        replies: list[Any] = []
        while len(replies) < n:
            reply = parser.gets()
            if reply is False:
                data = await self._reader.read(1 << 20)
                if not data:
                    raise EOFError("Redis closed the connection")
                parser.feed(data)
                continue
            replies.append(reply)
        return replies
