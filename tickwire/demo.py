"""`make demo`: Redis (private unless REDIS_URL), simulator, bar maker and server, until Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from tickwire.core.config import ServerConfig
from tickwire.core.redis_process import RedisProcess
from tickwire.core.urls import redact_url
from tickwire.server.app import TickwireServer


async def run_demo(port: int, rate: float, symbols: int) -> int:
    redis: RedisProcess | None = None
    url = os.environ.get("REDIS_URL")
    if not url:
        redis = RedisProcess().start()
        url = redis.url
        print(f"started a private redis-server on {url} (data in {redis.data_dir})", flush=True)
    else:
        print(f"using Redis at {redact_url(url)} (REDIS_URL)", flush=True)
    exe = Path(sys.executable).parent / "tickwire"
    # Popen only forks; it does not wait for the child.
    # 1 s and 1 min bars: the intervals the page's chart offers.
    feed = subprocess.Popen(  # noqa: ASYNC220
        [
            *(str(exe), "feed", "sim", "--redis", url),
            *("--rate", str(rate), "--symbols", str(symbols), "--bars", "1s,1m"),
        ],
    )
    # On-demand bars (250 ms, 5 s, 15 min … on the chart): made from the stored trades while
    # someone subscribes, by their own process (docs/protocol.md, On-demand bars).
    bars = subprocess.Popen(  # noqa: ASYNC220
        [str(exe), "bars", "--redis", url],
    )
    children = {"the simulator feed": feed, "the bar maker": bars}
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with TickwireServer(ServerConfig(redis_url=url, port=port)) as srv:
            print(
                f"\n  tickwire demo is live: open {srv.http_url}\n"
                f"  WebSocket: {srv.url}   health: {srv.http_url}healthz   metrics: {srv.http_url}metrics\n"
                f"  try: .venv/bin/tickwire watch 'quotes:*'\n  Ctrl-C stops everything.\n",
                flush=True,
            )
            waiter = asyncio.create_task(stop.wait())
            while not waiter.done():
                await asyncio.wait([waiter], timeout=1.0)
                for name, child in children.items():
                    if child.poll() is not None:
                        print(f"{name} exited with {child.returncode}", file=sys.stderr)
                        return 1
    finally:
        for child in children.values():
            if child.poll() is None:
                child.terminate()
        for child in children.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(5)
        if redis is not None:
            redis.stop()
    return 0
