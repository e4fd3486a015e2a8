"""Where a connection's server memory goes: tracemalloc over one in-process server, by owner.

    python -m tickwire.bench.conns_memory [--clients 2000] [--top 15] [--tls]

Runs one server in this process with tracemalloc on, connects `--clients` light clients from a
load process (`tickwire.bench.conns_load`), and prints the bytes per connection that Python
allocations grew by, idle (connected) and subscribed to one channel: by owner (websockets'
connection, protocol and parser; asyncio and uvloop; each tickwire module) and by source line,
beside the RSS growth per connection. What RSS has beyond the traced bytes is C memory Python
does not see (libuv handles, allocator overhead and fragmentation; with `--tls`, the clients on
`wss://`, OpenSSL's state and buffers per connection).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import tempfile
import tracemalloc
from collections import defaultdict
from pathlib import Path

import orjson

from tickwire.bench.conns import QUOTE_SHARE
from tickwire.bench.e2e_run import LoadProcess
from tickwire.bench.harness import rss_mb, self_signed_pem, start_feed
from tickwire.core.argtypes import count
from tickwire.core.config import ServerConfig
from tickwire.core.redis_process import RedisProcess
from tickwire.core.runtime import raise_open_files_limit
from tickwire.feeds.simulator import default_symbols
from tickwire.server.app import TickwireServer

#: Path fragments → the owner a traced allocation is put down to (first match wins).
OWNERS = (
    ("/websockets/", "websockets"),
    ("/uvloop/", "asyncio/uvloop"),
    ("/asyncio/", "asyncio/uvloop"),
    ("/tickwire/server/", "tickwire "),
)


def owner(filename: str) -> str:
    for fragment, name in OWNERS:
        if fragment in filename:
            if name == "tickwire ":
                return "tickwire " + Path(filename).stem
            return name
    return "other: " + Path(filename).name


def per_connection(
    before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, n: int, key: str
) -> list[tuple[str, float]]:
    """Bytes per connection by `key` ("owner" or "lineno"), largest first."""
    grouped: dict[str, int] = defaultdict(int)
    for stat in after.compare_to(before, "lineno"):
        frame = stat.traceback[0]
        label = owner(frame.filename)
        if key == "lineno":
            label = f"{label} {Path(frame.filename).name}:{frame.lineno}"
        grouped[label] += stat.size_diff
    return sorted(((k, v / n) for k, v in grouped.items()), key=lambda kv: -kv[1])


async def measure(args: argparse.Namespace, redis_url: str, workdir: Path) -> None:
    tracemalloc.start(1)
    cert = str(self_signed_pem(workdir / "tls.pem")) if args.tls else ""
    srv = TickwireServer(ServerConfig(redis_url=redis_url, port=0, workers=1, tls_cert_file=cert))
    await srv.start()
    symbols = default_symbols(args.symbols)
    plan = workdir / "plan.json"
    plan.write_bytes(
        orjson.dumps([f"quotes:{symbols[i % len(symbols)]}" for i in range(args.clients)])
    )
    cmd = [
        sys.executable, "-m", "tickwire.bench.conns_load", "--url", srv.url, "--plan", str(plan),
        "--sources", "127.0.0.2", *(["--cafile", cert] if cert else []),
    ]  # fmt: skip
    log = open(workdir / "load.log", "wb")  # noqa: SIM115 - the load's life
    load = LoadProcess(cmd, log)
    pid = os.getpid()
    try:
        await asyncio.to_thread(load.wait_ready, workdir / "load.log")

        async def phase(command: str, key: str) -> None:
            load.send(command)
            while True:
                msg = await asyncio.to_thread(load.lines.get, True, 120)
                if key in msg:
                    return

        async def settle() -> tuple[tracemalloc.Snapshot, float]:
            await asyncio.sleep(2.0)
            gc.collect()
            return tracemalloc.take_snapshot(), rss_mb([pid])

        s0, r0 = await settle()
        await phase("connect", "connected")
        s1, r1 = await settle()
        # What subscribing holds at its peak, beyond what stays: freed objects leave their
        # allocator pages behind, so a transient peak shows in RSS long after.
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        await phase("subscribe", "subscribed")
        peak = tracemalloc.get_traced_memory()[1]
        s2, r2 = await settle()
        n = len(srv.connections)
        print(f"{n} connections in one server process (tracemalloc on: RSS includes its traces)")
        settled = tracemalloc.get_traced_memory()[0]
        print(
            f"subscribing: traced peak {(peak - base) / n:,.0f} B/conn above idle, "
            f"{(settled - base) / n:,.0f} B/conn once settled"
        )
        for label, before, after, rss in (
            ("idle (connected)", s0, s1, r1 - r0),
            ("subscribed to one channel", s0, s2, r2 - r0),
            ("subscribing, the step alone", s1, s2, r2 - r1),
        ):
            owners = per_connection(before, after, n, "owner")
            traced = sum(v for _, v in owners)
            print(
                f"\n{label}: traced {traced:,.0f} B/conn, RSS {rss * 1024 * 1024 / n:,.0f} B/conn"
            )
            for name, v in owners[: args.top]:
                if abs(v) >= 8:
                    print(f"  {v:9,.0f}  {name}")
        print("\nsubscribed, by source line:")
        for name, v in per_connection(s0, s2, n, "lineno")[: args.top * 2]:
            print(f"  {v:9,.0f}  {name}")
    finally:
        load.send("stop")
        await asyncio.to_thread(load.proc.wait, 30)
        log.close()
        await srv.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("--clients", type=count, default=2000)
    p.add_argument("--symbols", type=count, default=100)
    p.add_argument("--top", type=count, default=15)
    p.add_argument("--tls", action="store_true", help="the server serves wss:// (self-signed)")
    args = p.parse_args(argv)
    raise_open_files_limit()
    redis = RedisProcess().start()
    tmp = tempfile.TemporaryDirectory(prefix="tickwire-mem-")
    flog = open(Path(tmp.name) / "feed.log", "wb")  # noqa: SIM115 - the feed's life
    feed = start_feed(
        redis.url,
        rate=args.symbols / QUOTE_SHARE,
        symbols=args.symbols,
        duration=600,
        seed=1,
        log=flog,
    )
    try:
        import uvloop

        uvloop.run(measure(args, redis.url, Path(tmp.name)))
    finally:
        feed.kill()
        feed.wait()
        flog.close()
        redis.stop()
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
