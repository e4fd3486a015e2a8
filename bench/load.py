"""Client load for the bench: one process holding many WebSocket clients.

Run by `tickwire bench` as a separate process (so the load generator does not share the server's
event loop). Sampled connections parse every event: latency (receive time minus publish time `pt`)
and the seq invariant. The others are light sinks counting frames, bytes and events.
Reads one line `go <unix ns>` on stdin, then runs until `stop` or its deadline, and prints one
JSON object with everything it measured.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import orjson
import websockets

from tickwire.bench.invariant import InvariantChecker


@dataclass
class ClientStats:
    sampled: bool
    frames: int = 0
    bytes: int = 0
    events: int = 0
    latencies: list[int] = field(default_factory=list)
    checker: InvariantChecker = field(default_factory=InvariantChecker)
    error: str | None = None
    close_code: int | None = None


async def run_client(
    url: str,
    channels: list[str],
    stats: ClientStats,
    measure_from: list[int],
    stop: asyncio.Event,
    connected: asyncio.Event,
) -> None:
    try:
        async with websockets.connect(
            url, compression=None, max_size=None, max_queue=None, open_timeout=30
        ) as ws:
            await ws.send(orjson.dumps({"op": "subscribe", "id": 1, "channels": channels}).decode())
            connected.set()
            recv = ws.recv
            count_marker = b'"seq":'
            while not stop.is_set():
                try:
                    frame = await recv(decode=False)
                except websockets.ConnectionClosed as exc:
                    stats.close_code = exc.rcvd.code if exc.rcvd else None
                    return
                now = time.time_ns()
                stats.frames += 1
                stats.bytes += len(frame)
                if not stats.sampled:
                    stats.events += frame.count(count_marker)
                    continue
                doc = orjson.loads(frame)
                for m in doc if isinstance(doc, list) else (doc,):
                    if m.get("type") == "events":
                        events = m["events"]
                        stats.events += len(events)
                        start = measure_from[0]
                        for ev in events:
                            pt = ev["pt"]
                            if pt >= start:
                                stats.latencies.append(now - pt)
                    stats.checker.feed(m)
    except (OSError, websockets.WebSocketException, TimeoutError) as exc:
        stats.error = f"{type(exc).__name__}: {exc}"
        connected.set()


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    plan: list[list[str]] = orjson.loads(args.plan)
    stats = [ClientStats(sampled=i % args.sample_every == 0) for i in range(len(plan))]
    stop = asyncio.Event()
    measure_from = [2**62]
    connected = [asyncio.Event() for _ in plan]
    tasks = []
    for i, channels in enumerate(plan):
        tasks.append(
            asyncio.create_task(
                run_client(args.url, channels, stats[i], measure_from, stop, connected[i])
            )
        )
        if i % 50 == 49:
            await asyncio.sleep(0.01)  # don't SYN-flood the accept queue
    await asyncio.gather(*(c.wait() for c in connected))
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    go = (await reader.readline()).decode().split()
    measure_from[0] = int(go[1]) if len(go) > 1 else time.time_ns()
    await reader.readline()  # "stop"
    stop.set()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    lat = np.array([x for s in stats for x in s.latencies], dtype=np.int64)
    np.save(args.latency_file, lat)
    sampled = [s for s in stats if s.sampled]
    # Per sampled (client, channel): the last seq seen, to count a lost tail against Redis.
    last_seqs = [[ch, t.last] for s in sampled for ch, t in s.checker.channels.items() if t.last]
    return {
        "clients": len(stats),
        "sampled": len(sampled),
        "errors": [s.error for s in stats if s.error][:5],
        "closed": [s.close_code for s in stats if s.close_code is not None][:5],
        "frames": sum(s.frames for s in stats),
        "bytes": sum(s.bytes for s in stats),
        "events": sum(s.events for s in stats),
        "sampled_events": sum(s.checker.delivered for s in sampled),
        "lost": sum(s.checker.lost for s in sampled),
        "duplicates": sum(s.checker.duplicates for s in sampled),
        "gaps": sum(s.checker.gaps_announced for s in sampled),
        "gap_events": sum(s.checker.gap_events for s in sampled),
        "resets": sum(s.checker.resets for s in sampled),
        "violations": [v for s in sampled for v in s.checker.violations][:5],
        "last_seqs": last_seqs,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("--url", required=True)
    p.add_argument("--plan", required=True, help="JSON list: channels per client")
    p.add_argument("--sample-every", type=int, default=1)
    p.add_argument("--latency-file", required=True)
    args = p.parse_args(argv)
    import uvloop

    result = uvloop.run(main_async(args))
    print(orjson.dumps(result).decode(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
