"""A TCP proxy for fault injection: pass traffic through, delay it, black-hole it or reset it."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import random
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tickwire.core.waits import within

CHUNK = 65536
#: Chunks in flight per direction; past it the proxy stops reading and TCP pushes back.
QUEUE_CHUNKS = 1024


class ProxyMode(enum.Enum):
    PASS = "pass"
    #: Every chunk is held `delay_s` (+ up to `jitter_s`) before it goes on, order preserved.
    DELAY = "delay"
    #: Bytes are read and dropped; connections stay open and nobody is told.
    BLACKHOLE = "blackhole"
    #: New connections are reset (RST) as soon as they are accepted.
    RESET = "reset"


@dataclass
class ProxyStats:
    accepted: int = 0
    #: Open connections aborted with RST by `reset()`.
    resets: int = 0
    #: New connections reset at once: RESET mode, or the target could not be reached.
    refused: int = 0
    bytes_forwarded: int = 0
    bytes_dropped: int = 0


def abort_with_rst(writer: asyncio.StreamWriter) -> None:
    """Close at once with a TCP RST (SO_LINGER 0), as a crashed peer or a middlebox would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Link:
    """One proxied connection: client ⇄ upstream, one forwarding pipe per direction."""

    def __init__(
        self,
        proxy: Proxy,
        down: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        up: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.proxy = proxy
        #: Its bytes dropped whatever the proxy's mode (`Proxy.blackhole(existing_only=True)`).
        self.blackholed = False
        self.writers = (down[1], up[1])
        self.tasks = [
            asyncio.create_task(self._pipe(down[0], up[1])),
            asyncio.create_task(self._pipe(up[0], down[1])),
        ]

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(QUEUE_CHUNKS)
        sender = asyncio.create_task(self._send(queue, writer))
        try:
            due = 0.0
            while data := await reader.read(CHUNK):
                if self.blackholed or self.proxy.mode is ProxyMode.BLACKHOLE:
                    self.proxy.stats.bytes_dropped += len(data)
                    continue
                # Never earlier than the chunk before it: a smaller jitter must not reorder.
                due = max(due, time.monotonic() + self.proxy.latency())
                await queue.put((due, data))
            await queue.put(None)
            await sender
        except (OSError, RuntimeError):
            self.abort()
        finally:
            sender.cancel()

    async def _send(
        self, queue: asyncio.Queue[tuple[float, bytes] | None], writer: asyncio.StreamWriter
    ) -> None:
        try:
            while (item := await queue.get()) is not None:
                due, data = item
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if self.blackholed or self.proxy.mode is ProxyMode.BLACKHOLE:
                    self.proxy.stats.bytes_dropped += len(data)
                    continue
                if writer.transport.is_closing():
                    raise ConnectionResetError("the receiving peer is gone")
                writer.write(data)
                self.proxy.stats.bytes_forwarded += len(data)
                await writer.drain()
            # The sender finished: pass the half-close on, the other direction may still talk.
            if writer.can_write_eof() and not writer.transport.is_closing():
                writer.write_eof()
        except (OSError, RuntimeError):
            # The receiving peer is gone (uvloop raises RuntimeError on a write to a closed
            # transport): the sending one must learn it too.
            self.abort()

    def abort(self) -> None:
        for w in self.writers:
            abort_with_rst(w)
        for t in self.tasks:
            t.cancel()

    async def finished(self) -> None:
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for w in self.writers:
            w.close()


class Proxy:
    """`async with Proxy(target_port) as p:` listens on `p.port` and forwards to the target.

    Switch modes at any time with `pass_through()`, `delay()`, `blackhole()` and `reset()`.
    """

    def __init__(
        self,
        target_port: int,
        target_host: str = "127.0.0.1",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        rng: random.Random | None = None,
    ) -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.port = port
        self.mode = ProxyMode.PASS
        self.delay_s = 0.0
        self.jitter_s = 0.0
        self.stats = ProxyStats()
        self._rng = rng or random.Random(0)
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._changed = asyncio.Event()

    @property
    def open_connections(self) -> int:
        return len(self._links)

    def latency(self) -> float:
        if self.mode is not ProxyMode.DELAY:
            return 0.0
        return self.delay_s + (self._rng.uniform(0.0, self.jitter_s) if self.jitter_s else 0.0)

    async def wait_until(self, cond: Callable[[ProxyStats], bool]) -> None:
        """Wait until `cond(stats)` holds; checked whenever a connection comes, goes or is reset."""
        while not cond(self.stats):
            self._changed.clear()
            await self._changed.wait()

    # -- modes ---------------------------------------------------------------------------------
    def pass_through(self) -> None:
        self.mode = ProxyMode.PASS

    def delay(self, seconds: float, jitter_s: float = 0.0) -> None:
        """Hold each chunk `seconds` plus uniform(0, `jitter_s`), in both directions."""
        self.delay_s, self.jitter_s = seconds, jitter_s
        self.mode = ProxyMode.DELAY

    def blackhole(self, *, existing_only: bool = False) -> None:
        """Drop every byte, both ways, nobody told. `existing_only`: only those of the
        connections open now (their state lost in a middlebox), new ones pass as before."""
        if not existing_only:
            self.mode = ProxyMode.BLACKHOLE
            return
        for link in self._links:
            link.blackholed = True

    def reset(self, *, refuse_new: bool = True) -> int:
        """Abort every open connection with RST; with `refuse_new`, reset new ones too until
        another mode is set (else new ones pass through). Returns how many were reset."""
        links = list(self._links)
        for link in links:
            link.abort()
        self.stats.resets += len(links)
        self._changed.set()
        self.mode = ProxyMode.RESET if refuse_new else ProxyMode.PASS
        return len(links)

    # -- life ----------------------------------------------------------------------------------
    async def start(self) -> Proxy:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.abort()
        if self._handlers:
            # Let the handlers end: on 3.11 a handler cancelled at loop shutdown logs an error.
            await asyncio.wait(self._handlers, timeout=1.0)
        if self._server is not None:
            await within(self._server.wait_closed(), 1.0)
            self._server = None

    async def __aenter__(self) -> Proxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.accepted += 1
        self._changed.set()
        if self.mode is ProxyMode.RESET:
            self.stats.refused += 1
            abort_with_rst(writer)
            return
        try:
            up = await asyncio.open_connection(*self.target)
        except OSError:
            # The target is down: the client sees its connection reset, as if refused.
            self.stats.refused += 1
            abort_with_rst(writer)
            return
        link = _Link(self, (reader, writer), up)
        self._links.add(link)
        handler = asyncio.current_task()
        if handler is not None:
            self._handlers.add(handler)
        try:
            await link.finished()
        finally:
            self._links.discard(link)
            self._handlers.discard(handler)
            self._changed.set()
