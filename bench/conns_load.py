"""Connection-scale load: one process holding many light clients that subscribe, count and resume.

Run by `tickwire bench conns`, several at once. Each client is a raw WebSocket (`sink.py`) bound
to one of the process's loopback source addresses (each address has its own ~28 k ephemeral
ports), subscribed to one channel. It parses each message only for what it needs: the seqs
(to find holes and to resume), `pt` of events and `ts` of heartbeats (latency). When the server
goes away it reconnects after a random delay (jitter, then backoff) and resumes from its last
(epoch, seq), or from its `subscribed` ack's position when no event came yet.

Commands on stdin, one per line; every answer is one JSON line on stdout:
`connect` (open every client, no subscription), `subscribe`, `go` (start measuring), `report
FILE.npz` (stop measuring, latency samples to the file), `storm` (count resumes until every
client resumed), `check FILE.json` (lost events against the final seqs), `stop`.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import socket
import ssl
import sys
import time
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import orjson

from tickwire.bench.sink import SinkProtocol, client_frame
from tickwire.core.collector import FreezePolicy, PauseTimer
from tickwire.core.runtime import raise_open_files_limit, tune_gc
from tickwire.core.waits import wait_set

#: Linux: bind picks no port, connect does (per destination), so one source address is not
#: limited to one ephemeral port range shared by every socket bound to it.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
#: Handshakes in flight per process: more only queues SYNs past the listeners' backlog.
IN_FLIGHT = 64
PING = orjson.dumps({"op": "ping", "id": 0})


def say(**fields: Any) -> None:
    print(orjson.dumps(fields).decode(), flush=True)


class Sink(SinkProtocol):
    """A sink that can also send a request after its first message."""

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def send(self, message: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(client_frame(0x1, message))


class Measure:
    """The latency samples (ns) of this process while a step is measured."""

    def __init__(self) -> None:
        self.on = False
        self.events = array("q")
        #: When each of `events` arrived (unix ns): latency over time, for a closer look.
        self.events_at = array("q")
        self.heartbeats = array("q")


class Client:
    """One connection's stream state on its channel, and what it saw go wrong."""

    __slots__ = (
        "acked",
        "changed_at",
        "channel",
        "connects",
        "dups",
        "epoch",
        "gaps",
        "holes",
        "last",
        "load",
        "resets",
        "resumed",
        "sink",
        "storm_connects",
        "storm_failures",
    )

    def __init__(self, load: Load, channel: str) -> None:
        self.load = load
        self.channel = channel
        self.epoch: str | None = None  # None: no position yet ("" : the channel was empty)
        self.last = 0
        self.connects = 0
        #: Connections opened and attempts failed since the storm began, and when the last
        #: connection opened or closed (monotonic): what a storm that does not end tells apart
        #: (stuck, cycling, or still waiting for its turn).
        self.storm_connects = self.storm_failures = 0
        self.changed_at = 0.0
        self.acked = False
        #: Acknowledged since the storm began (counted once, however often it reconnects).
        self.resumed = False
        self.holes = self.dups = self.gaps = self.resets = 0
        self.sink: Sink | None = None

    def subscribe_message(self) -> bytes:
        request: dict[str, Any] = {"op": "subscribe", "id": 1, "channels": [self.channel]}
        if self.epoch is not None:
            request["resume"] = {self.channel: {"epoch": self.epoch, "seq": self.last}}
        return orjson.dumps(request)

    def on_message(self, payload: bytes, now: int) -> None:
        doc = orjson.loads(payload)
        for m in doc if isinstance(doc, list) else (doc,):
            kind = m["type"]
            if kind == "events":
                self._events(m["epoch"], m["events"], now)
            elif kind == "heartbeat":
                if self.load.measure.on:
                    self.load.measure.heartbeats.append(now - m["ts"])
            elif kind == "subscribed":
                pos = m.get("positions", {}).get(self.channel)
                if pos is not None and self.epoch is None:
                    self.epoch, self.last = pos["epoch"], pos["seq"]
                if not self.acked:
                    self.acked = True
                    self.load.acked(self)
            elif kind == "gap":
                self.gaps += m["to_seq"] - m["from_seq"] + 1
                self.last = max(self.last, m["to_seq"])
            elif kind == "reset":
                self.resets += 1
                self.epoch, self.last = m["epoch"], 0

    def _events(self, epoch: str, events: list[dict[str, Any]], now: int) -> None:
        first = events[0]["seq"]
        # "" is the epoch of a channel nothing was stored of when the client subscribed.
        if self.epoch in (epoch, ""):
            if first > self.last + 1:
                self.holes += first - self.last - 1
            elif first <= self.last:
                self.dups += self.last - first + 1
        self.epoch, self.last = epoch, events[-1]["seq"]
        if self.load.measure.on:
            measure = self.load.measure
            for e in events:
                measure.events.append(now - e["pt"])
                measure.events_at.append(now)


class Load:
    """Every client of this process and the phases it goes through."""

    def __init__(
        self,
        url: str,
        channels: list[str],
        sources: list[str],
        jitter_s: float,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        #: For a wss:// URL: the context that trusts the server.
        self.tls = tls if parts.scheme == "wss" else None
        self.path = parts.path or "/"
        self.sources = sources
        self.jitter_s = jitter_s
        self.clients = [Client(self, ch) for ch in channels]
        self.measure = Measure()
        #: This process's collector pauses (its clients' latency includes them), counted from
        #: the start of the measured window.
        self.pauses = PauseTimer()
        self.gate = asyncio.Semaphore(IN_FLIGHT)
        self.tasks: list[asyncio.Task[None]] = []
        self.stopping = False
        self.open_count = self.failed = 0
        self.acks = 0
        self.resumed = 0
        self.storm = False
        self._all_acked = asyncio.Event()
        self._all_open = asyncio.Event()
        self._all_resumed = asyncio.Event()
        self.resumed_at = 0

    async def _open(self, client: Client, source: str, first: bytes) -> Sink:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sink: Sink | None = None
        try:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
            sock.setblocking(False)
            async with self.gate, asyncio.timeout(30):
                await loop.sock_connect(sock, (self.host, self.port))
                _, sink = await loop.create_connection(
                    lambda: Sink(f"{self.host}:{self.port}", self.path, first, client.on_message),
                    sock=sock,
                    ssl=self.tls,
                    server_hostname=self.host if self.tls is not None else None,
                )
                await sink.opened
        except BaseException:
            # A handshake that timed out must not stay half open on the server.
            if sink is not None:
                sink.abort()
            sock.close()
            raise
        return sink

    async def _run(self, i: int, client: Client) -> None:
        source = self.sources[i % len(self.sources)]
        first, failures = PING, 0
        while not self.stopping:
            try:
                sink = await self._open(client, source, first)
            except (OSError, TimeoutError, ConnectionError):
                failures += 1
                if self.storm:
                    client.storm_failures += 1
                if client.connects == 0 and failures >= 5:
                    self.failed += 1
                    self._counted_open()
                    return
                # Full jitter, doubling up to 5 s: a restarted server is not hit all at once.
                await asyncio.sleep(random.uniform(0, min(5.0, 0.25 * 2**failures)))
                continue
            failures = 0
            client.sink = sink
            client.connects += 1
            client.changed_at = time.monotonic()
            if self.storm:
                client.storm_connects += 1
            if client.connects == 1:
                self.open_count += 1
                self._counted_open()
            await sink.closed
            client.sink = None
            client.changed_at = time.monotonic()
            if self.stopping:
                return
            client.acked = False
            # Resumed from where it stands when it reconnects, not when it went down.
            await asyncio.sleep(random.uniform(0, self.jitter_s))
            first = client.subscribe_message()

    def _counted_open(self) -> None:
        if self.open_count + self.failed == len(self.clients):
            self._all_open.set()

    def acked(self, client: Client) -> None:
        if client.connects == 1:
            self.acks += 1
            if self.acks == self.open_count:
                self._all_acked.set()
        elif self.storm and not client.resumed:
            client.resumed = True
            self.resumed += 1
            if self.resumed == self.open_count:
                self.resumed_at = time.time_ns()
                self._all_resumed.set()

    async def connect(self) -> None:
        t0 = time.monotonic()
        for i, client in enumerate(self.clients):
            self.tasks.append(asyncio.create_task(self._run(i, client)))
        await self._progress(self._all_open, lambda: self.open_count)
        say(connected=self.open_count, failed=self.failed, seconds=time.monotonic() - t0)

    async def subscribe(self) -> None:
        t0 = time.monotonic()
        for client in self.clients:
            if client.sink is not None:
                client.sink.send(client.subscribe_message())
        await self._progress(self._all_acked, lambda: self.acks)
        say(subscribed=self.acks, seconds=time.monotonic() - t0)

    async def wait_storm(self) -> None:
        self.storm = True
        await self._progress(self._all_resumed, lambda: self.resumed, self._waiting)
        say(resumed=self.resumed, at_ns=self.resumed_at)

    def _waiting(self) -> dict[str, int]:
        """Of the clients not resumed yet, what a storm that does not end is stuck on: how many
        have no connection, how many have one but no `subscribed` yet, and how many were
        acknowledged on a connection made before the storm began (never closed by it); for the
        first two, the longest time one has been so (ms), and the connections they opened and
        the attempts that failed since the storm began (a client stuck on one connection, one
        closed again and again, or one still waiting for its turn)."""
        down = unacked = before = 0
        oldest_down = oldest_unacked = cycles = failed = 0.0
        now = time.monotonic()
        for c in self.clients:
            if c.resumed:
                continue
            if c.sink is None:
                down += 1
                oldest_down = max(oldest_down, now - c.changed_at)
            elif not c.acked:
                unacked += 1
                oldest_unacked = max(oldest_unacked, now - c.changed_at)
            else:
                before += 1
                continue
            cycles += c.storm_connects
            failed += c.storm_failures
        return {
            "down": down,
            "unacked": unacked,
            "acked_before": before,
            "oldest_down_ms": round(oldest_down * 1000),
            "oldest_unacked_ms": round(oldest_unacked * 1000),
            "storm_connects": round(cycles),
            "storm_failures": round(failed),
        }

    async def _progress(
        self,
        done: asyncio.Event,
        count: Callable[[], int],
        detail: Callable[[], dict[str, int]] = dict,
    ) -> None:
        while not done.is_set():
            say(progress=count(), **detail())
            await wait_set(done, 0.5)

    def report(self, path: str) -> None:
        m = self.measure
        m.on = False
        np.savez(
            path,
            events=np.frombuffer(m.events, np.int64),
            events_at=np.frombuffer(m.events_at, np.int64),
            heartbeats=np.frombuffer(m.heartbeats, np.int64),
        )
        say(
            events=len(m.events),
            heartbeats=len(m.heartbeats),
            gc_pauses=self.pauses.count,
            gc_longest_ms=self.pauses.longest * 1000,
        )

    def check(self, path: str) -> None:
        """Lost events: holes seen, and what each client is short of its channel's final seq."""
        final: dict[str, list[Any]] = orjson.loads(Path(path).read_bytes())
        short = 0
        for c in self.clients:
            epoch, seq = final.get(c.channel, ("", 0))
            if c.connects and c.epoch in (epoch, ""):
                short += max(0, seq - c.last)
        say(
            holes=sum(c.holes for c in self.clients),
            short=short,
            duplicates=sum(c.dups for c in self.clients),
            gaps=sum(c.gaps for c in self.clients),
            resets=sum(c.resets for c in self.clients),
            connected=sum(1 for c in self.clients if c.sink is not None),
            reconnected=sum(1 for c in self.clients if c.connects > 1),
        )

    async def close(self) -> None:
        self.stopping = True
        for c in self.clients:
            if c.sink is not None:
                c.sink.close()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def main_async(args: argparse.Namespace, channels: list[str]) -> None:
    tls = ssl.create_default_context(cafile=args.cafile) if args.url.startswith("wss:") else None
    load = Load(args.url, channels, args.sources.split(","), args.jitter, tls)
    tune_gc()
    # Tens of thousands of client connections here too: the same short collector pauses as
    # the server's, or they would show as its latency.
    freezing = asyncio.create_task(FreezePolicy().run())
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print("ready", flush=True)
    gc.callbacks.append(load.pauses)
    try:
        while line := (await reader.readline()).decode().split():
            if line[0] == "connect":
                await load.connect()
            elif line[0] == "subscribe":
                await load.subscribe()
            elif line[0] == "go":
                load.measure = Measure()
                load.pauses.reset()
                load.measure.on = True
                say(go=True)
            elif line[0] == "report":
                load.report(line[1])
            elif line[0] == "storm":
                await load.wait_storm()
            elif line[0] == "check":
                load.check(line[1])
            elif line[0] == "stop":
                break
    finally:
        freezing.cancel()
        await load.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("--url", required=True)
    p.add_argument("--plan", required=True, help="JSON file: the channel of each client")
    p.add_argument("--sources", required=True, help="loopback source addresses, comma-separated")
    p.add_argument("--jitter", type=float, default=2.0, help="reconnect delay: uniform 0..this s")
    p.add_argument("--cafile", default=None, help="for a wss:// URL: the CA to trust (PEM)")
    args = p.parse_args(argv)
    soft, _ = raise_open_files_limit()
    print(f"load: open files limit {soft}", file=sys.stderr)
    import uvloop

    uvloop.run(main_async(args, orjson.loads(Path(args.plan).read_bytes())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
