"""The latency floor of this machine: a timestamp relayed through loopback hops, with no work.

tickwire's path from the feed to a client crosses three processes (feed → Redis → server →
client), each woken by a socket write. On an idle virtual machine each such wake-up costs tens
of microseconds before any work is done (one hop measured 58 µs p50 at 1 000 messages/s on a
2-core development machine, against a 56 µs round trip back to back). `measure_floor` times just
that: a source process writes its clock `rate` times a second into a chain of relay processes,
and the last one records the arrival time. `tickwire bench --floor` prints it beside the figures
of the same run, so a latency can be read against what the machine allows at that moment.

Run as `python -m tickwire.bench.floor ROLE PORT RATE SECONDS COUNT` by `measure_floor` itself.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import uvloop

from tickwire.core.redis_process import free_port
from tickwire.core.waits import wait_set


@dataclass(frozen=True)
class Floor:
    hops: int
    rate: float
    #: Timestamps the source wrote, and those the last hop received.
    sent: int
    received: int
    #: Those the percentiles are of: the first fifth received is left out.
    samples: int
    p50_us: float
    p90_us: float
    p99_us: float


class _Relay(asyncio.Protocol):
    def __init__(self, out: asyncio.Transport) -> None:
        self.out = out

    def data_received(self, data: bytes) -> None:
        self.out.write(data)


class _Sink(asyncio.Protocol):
    def __init__(self, expected: int) -> None:
        self.latencies: list[int] = []
        self._rest = b""
        self.expected = expected
        self.complete = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        now = time.time_ns()
        *lines, self._rest = (self._rest + data).split(b"\n")
        self.latencies += [now - int(line) for line in lines]
        if len(self.latencies) >= self.expected:
            self.complete.set()


def _nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _serve(role: str, port: int, rate: float, seconds: float, count: int) -> None:
    loop = asyncio.get_running_loop()
    if role == "sink":
        sink = _Sink(count)
        server = await loop.create_server(lambda: sink, "127.0.0.1", port)
        print("ready", flush=True)
        await wait_set(sink.complete, seconds)
        server.close()
        # The first fifth is left out: connections and caches settling.
        received = len(sink.latencies)
        ns = np.array(sink.latencies[received // 5 :], dtype=np.float64)
        p50, p90, p99 = np.percentile(ns / 1000, [50, 90, 99]) if len(ns) else (0, 0, 0)
        print(f"{received} {len(ns)} {p50:.1f} {p90:.1f} {p99:.1f}", flush=True)
    elif role == "relay":
        out, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port + 1)
        _nodelay(out)
        server = await loop.create_server(lambda: _Relay(out), "127.0.0.1", port)
        print("ready", flush=True)
        await asyncio.sleep(seconds)
        server.close()
    else:
        out, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
        _nodelay(out)
        # `count` timestamps on a fixed schedule: a source slowed down (a busy machine) sends
        # late, not fewer.
        start = time.monotonic()
        for i in range(count):
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            out.write(b"%d\n" % time.time_ns())


def measure_floor(hops: int = 3, rate: float = 1000.0, seconds: float = 5.0) -> Floor:
    """Relay `rate` timestamps a second through `hops` loopback hops for `seconds`."""
    count = max(1, round(rate * seconds))
    # Consecutive free ports: relay i listens on base + i and writes to base + i + 1.
    base = free_port()
    while any(not _port_free(base + i) for i in range(hops)):
        base = free_port()
    cmd = [sys.executable, "-m", "tickwire.bench.floor"]
    wait = seconds + 2.0
    procs: list[subprocess.Popen[str]] = []
    try:
        for i in range(hops - 1, -1, -1):
            role = "sink" if i == hops - 1 else "relay"
            proc = subprocess.Popen(
                [*cmd, role, str(base + i), str(rate), str(wait), str(count)],
                stdout=subprocess.PIPE,
                text=True,
                cwd=tempfile.gettempdir(),  # not a checkout, whose `tickwire/` has no bench
            )
            procs.append(proc)
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"the floor's {role} did not start")
        subprocess.run(
            [*cmd, "source", str(base), str(rate), str(seconds), str(count)],
            check=True,
            cwd=tempfile.gettempdir(),
        )
        out, _ = procs[0].communicate(timeout=wait + 10)
        received, n, p50, p90, p99 = out.split()
        return Floor(hops, rate, count, int(received), int(n), float(p50), float(p90), float(p99))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


if __name__ == "__main__":
    role, port, rate, seconds, count = sys.argv[1:6]
    uvloop.run(_serve(role, int(port), float(rate), float(seconds), int(count)))
