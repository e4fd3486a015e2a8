"""A light WebSocket client for the bench: counts frames, bytes and events, hands over payloads.

The load generator must not be the bottleneck, nor cost the server it shares the machine with
more CPU than it must. This client walks only the frame headers (server frames are unmasked),
answers pings and closes, and counts events by the `"seq":` marker every event carries. Sampled
connections pass `on_message` to get each complete message's payload (to parse and check);
the others never look inside.
"""

from __future__ import annotations

import asyncio
import base64
import os
import ssl
import time
from collections.abc import Callable
from typing import cast
from urllib.parse import urlsplit

MARKER = b'"seq":'
#: Bytes of a payload's head and of its tail that, with its length, key `EventCounter`'s lookup.
_EDGE = 32
Buffer = bytes | bytearray


def count_events(buf: Buffer, start: int = 0, end: int | None = None) -> int:
    """The events in `buf[start:end]`: every event carries the marker once."""
    return buf.count(MARKER, start, len(buf) if end is None else end)


class EventCounter:
    """Counts the events of whole frame payloads, remembering recent payloads.

    In a broadcast every connection of a load process gets the same frames. Scanning each for
    the marker was half the load's CPU, and the limit of the broadcast bench; hashing each whole
    payload for a dict lookup then took 14 % of it (siphash: 47 us for a 70 KB frame here, the
    scan 100 us). So a payload is looked up by its length and its first and last bytes, and
    compared whole with the one remembered there: a copy and a memcmp, 2 us each. Exact: a
    payload only ever matches an equal one. Where frames seldom repeat (each client on channels
    of its own) it stops looking them up for a while.
    """

    def __init__(
        self, capacity: int = 512, min_bytes: int = 2048, max_bytes: int = 32 << 20
    ) -> None:
        self.capacity = capacity
        self.min_bytes = min_bytes  # smaller payloads are scanned: cheaper than a lookup
        self.max_bytes = max_bytes  # what the remembered payloads may hold in all
        self._seen: dict[tuple[int, bytes, bytes], tuple[bytes, int]] = {}
        self._held = 0
        self.hits = 0  # payloads counted by a lookup, in all
        #: Lookups and hits since the last check of whether lookups pay.
        self._window_lookups = 0
        self._window_hits = 0
        self._skip_lookups = 0

    def __call__(self, buf: Buffer, start: int = 0, end: int | None = None) -> int:
        """The events in `buf[start:end]`, a whole payload."""
        end = len(buf) if end is None else end
        size = end - start
        if size < self.min_bytes:
            return buf.count(MARKER, start, end)
        if self._skip_lookups:
            self._skip_lookups -= 1
            return buf.count(MARKER, start, end)
        # A copy, to compare bytes with bytes: memcpy and memcmp run at tens of GB/s, where a
        # memoryview compares byte by byte (~0.2 GB/s).
        payload = bytes(buf[start:end])
        key = (size, payload[:_EDGE], payload[-_EDGE:])
        seen = self._seen.get(key)
        if seen is not None and seen[0] == payload:
            n = seen[1]
            self._window_hits += 1
            self.hits += 1
        else:
            n = payload.count(MARKER)
            if len(self._seen) >= self.capacity or self._held + size > self.max_bytes:
                self._seen.clear()
                self._held = 0
            elif seen is not None:
                self._held -= len(seen[0])
            self._seen[key] = (payload, n)
            self._held += size
        self._window_lookups += 1
        if self._window_lookups == 1024:
            if self._window_hits < 256:  # a lookup that seldom hits costs more than it saves
                self._skip_lookups = 8192
            self._window_lookups = self._window_hits = 0
        return n


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One masked, final client frame (RFC 6455 requires clients to mask)."""
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    key = (mask * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
    return head + mask + masked


class SinkProtocol(asyncio.Protocol):
    def __init__(
        self,
        host: str,
        path: str,
        first_message: bytes,
        on_message: Callable[[bytes, int], None] | None = None,
        counter: Callable[[Buffer, int, int], int] = count_events,
    ) -> None:
        self._request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        self._first = first_message
        self._transport: asyncio.Transport | None = None
        self._head = b""  # the HTTP response until it is complete
        self._open = False
        self._pending = b""  # an incomplete frame header or control frame
        self._skip = 0  # payload bytes of the current data frame not yet received
        #: A data frame split over reads: its opcode, whether it is final, its payload so far.
        #: Assembling it (a copy) is cheaper than scanning its pieces for the marker.
        self._part = bytearray()
        self._part_opcode = 0
        self._part_fin = False
        #: Events in `buf[start:end]`, a whole frame's payload.
        self._count = counter
        #: With on_message: the message being assembled, and whether its last frame is final.
        self.on_message = on_message
        self._message: bytearray | None = None
        self._now = 0
        self.frames = 0
        self.bytes = 0
        self.events = 0
        self.close_code: int | None = None
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self._transport = cast(asyncio.Transport, transport)
        self._transport.write(self._request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionError("closed during the handshake"))
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        if not self._open:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            status = self._head.split(b"\r\n", 1)[0]
            data, self._head = self._head[end + 4 :], b""
            if b" 101 " not in status + b" ":
                if not self.opened.done():
                    self.opened.set_exception(ConnectionError(f"handshake refused: {status!r}"))
                assert self._transport is not None
                self._transport.close()
                return
            self._open = True
            if self.opened.done():  # its opener gave up waiting (a timeout): it closes us
                return
            self.opened.set_result(None)
            assert self._transport is not None
            self._transport.write(client_frame(0x1, self._first))
            if not data:
                return
        self.bytes += len(data)
        if self.on_message is not None:
            self._now = time.time_ns()
        self._frames(data)

    def _frames(self, data: bytes) -> None:
        i = 0
        if self._skip:
            take = min(self._skip, len(data))
            self._skip -= take
            self._part += memoryview(data)[:take]
            if self._skip:
                return
            part, self._part = self._part, bytearray()
            self._frame(self._part_opcode, self._part_fin, part, 0, len(part))
            i = take
        buf = self._pending + data[i:] if self._pending else data[i:] if i else data
        self._pending = b""
        i, n = 0, len(buf)
        while i < n:
            if n - i < 2:
                self._pending = buf[i:]
                return
            b0, b1 = buf[i], buf[i + 1]
            size, h = b1 & 0x7F, 2
            if size == 126:
                h = 4
                if n - i < h:
                    self._pending = buf[i:]
                    return
                size = int.from_bytes(buf[i + 2 : i + 4], "big")
            elif size == 127:
                h = 10
                if n - i < h:
                    self._pending = buf[i:]
                    return
                size = int.from_bytes(buf[i + 2 : i + 10], "big")
            opcode = b0 & 0x0F
            if opcode >= 0x8:
                if n - i < h + size:
                    self._pending = buf[i:]
                    return
                self._control(opcode, buf[i + h : i + h + size])
                i += h + size
                continue
            end = i + h + size
            if end > n:
                self._part += memoryview(buf)[i + h :]
                self._part_opcode, self._part_fin = opcode, bool(b0 & 0x80)
                self._skip = end - n
                return
            self._frame(opcode, bool(b0 & 0x80), buf, i + h, end)
            i = end

    def _frame(self, opcode: int, fin: bool, buf: Buffer, start: int, end: int) -> None:
        """A whole data frame, its payload `buf[start:end]`."""
        if opcode:  # a continuation frame belongs to the message already counted
            self.frames += 1
        self.events += self._count(buf, start, end)
        if self.on_message is None:
            return
        if opcode and fin:
            self._deliver(bytes(buf[start:end]))  # the usual case: a message in one frame
            return
        if opcode:
            self._message = bytearray(buf[start:end])
        elif self._message is not None:
            self._message += buf[start:end]
        if fin and self._message is not None:
            self._deliver(bytes(self._message))

    def _deliver(self, payload: bytes) -> None:
        self._message = None
        assert self.on_message is not None
        self.on_message(payload, self._now)

    def _control(self, opcode: int, payload: bytes) -> None:
        assert self._transport is not None
        if opcode == 0x9:  # ping: the server closes connections that do not answer
            self._transport.write(client_frame(0xA, payload))
        elif opcode == 0x8:
            self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            self._transport.write(client_frame(0x8, payload[:2]))
            self._transport.close()

    def close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(client_frame(0x8, (1000).to_bytes(2, "big")))
            self._transport.close()


async def connect_sink(
    url: str,
    first_message: bytes,
    on_message: Callable[[bytes, int], None] | None = None,
    counter: Callable[[Buffer, int, int], int] = count_events,
    tls: ssl.SSLContext | None = None,
) -> SinkProtocol:
    """Open a sink on `url` (ws://host:port/path, or wss:// with `tls`, the context trusting
    the server) and send `first_message` once it is open; `on_message(payload, receive time
    ns)` gets every message if given; `counter` counts the events of a whole frame's payload
    (an `EventCounter` may serve every sink of a process)."""
    parts = urlsplit(url)
    secure = parts.scheme == "wss"
    if secure and tls is None:
        tls = ssl.create_default_context()
    host, port = parts.hostname or "127.0.0.1", parts.port or (443 if secure else 80)
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(30):
        _, proto = await loop.create_connection(
            lambda: SinkProtocol(
                f"{host}:{port}", parts.path or "/", first_message, on_message, counter
            ),
            host,
            port,
            ssl=tls if secure else None,
        )
        await proto.opened
    return proto
