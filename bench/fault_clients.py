"""Fault bench clients: raw WebSocket and library clients that check every message they get."""

from __future__ import annotations

import asyncio
import random
import socket
import time
from typing import Any

import orjson
import websockets
from websockets.asyncio.client import ClientConnection

from tickwire.bench.invariant import InvariantChecker
from tickwire.clients import (
    EventBatch,
    Gap,
    Reconnected,
    Reset,
    Status,
    connect,
)
from tickwire.clients.session import UNRECOVERED


class Watch:
    """What one client received, checked message by message."""

    def __init__(self, name: str, channels: list[str]) -> None:
        self.name = name
        self.channels = channels
        self.checker = InvariantChecker()
        #: Highest seq delivered or announced as a gap, per (channel, epoch).
        self.reached: dict[tuple[str, str], int] = {}
        self.gaps: list[tuple[str, int, int, str]] = []
        self.reset_channels: set[str] = set()
        self.statuses: list[str] = []
        self.connects = 0
        self.reconnects = 0
        self.close_codes: list[int | None] = []
        #: Holes the client library found unexplained and had to announce itself.
        self.unrecovered = 0
        self.mark_ns = 0
        #: When (monotonic) the first event published after `mark()` arrived.
        self.fresh_at: float | None = None
        self.task: asyncio.Task[None] | None = None

    def mark(self, now_ns: int) -> None:
        self.mark_ns = now_ns
        self.fresh_at = None

    def feed(self, m: dict[str, Any]) -> None:
        self.checker.feed(m)
        kind = m.get("type")
        if kind == "events":
            events = m["events"]
            if not events:
                return
            last = events[-1]
            key = (m["ch"], last["epoch"])
            if last["seq"] > self.reached.get(key, 0):
                self.reached[key] = last["seq"]
            if self.fresh_at is None and self.mark_ns and last["pt"] >= self.mark_ns:
                self.fresh_at = time.monotonic()
        elif kind == "gap":
            ch, a, b = m["ch"], int(m["from_seq"]), int(m["to_seq"])
            self.gaps.append((ch, a, b, m["reason"]))
            track = self.checker.channels.get(ch)
            key = (ch, (track.epoch if track else None) or "")
            self.reached[key] = max(self.reached.get(key, 0), b)
        elif kind == "reset":
            self.reset_channels.add(m["ch"])
        elif kind == "status":
            self.statuses.append(m["redis"])

    def shortfall(self, final: dict[str, tuple[str, int]]) -> int:
        """Events of the final positions this client has not reached (0 when done)."""
        missing = 0
        for ch in self.channels:
            if ch in final:
                epoch, seq = final[ch]
                missing += max(0, seq - self.reached.get((ch, epoch), 0))
        return missing

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()


class RawClient(Watch):
    """A plain WebSocket client that resumes by hand from its last (epoch, seq) per channel."""

    def __init__(
        self,
        name: str,
        url: str,
        channels: list[str],
        *,
        resume: bool = True,
        rcvbuf: int | None = None,
    ) -> None:
        super().__init__(name, channels)
        self.url = url
        self.resume = resume
        self.rcvbuf = rcvbuf
        self.ws: ClientConnection | None = None
        self.subscribed = asyncio.Event()
        #: Cleared: stop taking frames (the socket fills up, as with a stalled consumer).
        self.reading = asyncio.Event()
        self.reading.set()
        self._id = 0

    async def _open(self) -> ClientConnection:
        sock = None
        if self.rcvbuf is not None:
            # A small fixed receive buffer (no autotuning): a stalled reader fills up quickly.
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            sock.setblocking(False)
            host, port = self.url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
            try:
                await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
            except OSError:
                sock.close()
                raise
        return await websockets.connect(
            self.url, compression=None, max_size=None, open_timeout=30, max_queue=4, sock=sock
        )

    def _subscribe_frame(self) -> bytes:
        self._id += 1
        resume = {
            ch: {"epoch": t.epoch, "seq": t.last}
            for ch, t in self.checker.channels.items()
            if t.epoch and t.last is not None
        }
        request: dict[str, Any] = {"op": "subscribe", "id": self._id, "channels": self.channels}
        if resume:
            request["resume"] = resume
        return orjson.dumps(request)

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                ws = await self._open()
            except (OSError, websockets.WebSocketException, TimeoutError):
                failures += 1
                await asyncio.sleep(random.uniform(0, min(1.0, 0.05 * 2**failures)))
                continue
            failures = 0
            self.ws = ws
            self.connects += 1
            if self.connects > 1:
                self.reconnects += 1
            try:
                await ws.send(self._subscribe_frame().decode())
                self.subscribed.set()
                while True:
                    await self.reading.wait()
                    frame = await ws.recv(decode=False)
                    doc = orjson.loads(frame)
                    for m in doc if isinstance(doc, list) else (doc,):
                        self.feed(m)
            except websockets.ConnectionClosed:
                pass
            finally:
                self.close_codes.append(ws.close_code)
                self.ws = None
            if not self.resume:
                return

    def drop(self) -> None:
        """Lose the connection without a closing handshake (the client resumes at once)."""
        if self.ws is not None:
            self.ws.transport.abort()


class LibraryClient(Watch):
    """A `tickwire.clients` feed: the library reconnects and resumes by itself."""

    def __init__(self, name: str, url: str, channels: list[str]) -> None:
        super().__init__(name, channels)
        self.url = url
        self.subscribed = asyncio.Event()

    async def run(self) -> None:
        async with connect(
            self.url, backoff_initial_s=0.05, backoff_max_s=1.0, open_timeout_s=30
        ) as feed:
            await feed.subscribe(*self.channels)
            self.connects = 1
            self.subscribed.set()
            async for msg in feed.batches():
                if isinstance(msg, EventBatch):
                    events = [{"seq": e.seq, "epoch": e.epoch, "pt": e.pt} for e in msg.events]
                    self.feed(
                        {"type": "events", "ch": msg.channel, "epoch": msg.epoch, "events": events}
                    )
                elif isinstance(msg, Gap):
                    if msg.reason == UNRECOVERED:
                        self.unrecovered += msg.count
                    self.feed(
                        {
                            "type": "gap",
                            "ch": msg.channel,
                            "from_seq": msg.from_seq,
                            "to_seq": msg.to_seq,
                            "reason": msg.reason,
                        }
                    )
                elif isinstance(msg, Reset):
                    self.feed({"type": "reset", "ch": msg.channel, "epoch": msg.epoch})
                elif isinstance(msg, Status):
                    self.statuses.append(msg.redis)
                elif isinstance(msg, Reconnected):
                    self.connects += 1
                    self.reconnects += 1
