"""The naive reference server, written the way a competent user would in ~50 lines.

redis-py asyncio `XREAD` over the subscribed streams → one frame per stream batch → websockets
`broadcast` to that stream's subscribers. Same wire shape as tickwire's `events` messages, so the
bench's clients measure both the same way. No resume, no backpressure, no slow-consumer policy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

import redis.asyncio as aioredis
from websockets.asyncio.server import ServerConnection, broadcast, serve

subscribers: dict[str, set[ServerConnection]] = {}
changed = asyncio.Event()


def key(channel: str) -> str:
    kind, sym = channel.split(":", 1)
    return f"tw:{{{sym}}}:{kind}"


async def handler(ws: ServerConnection) -> None:
    mine: list[str] = []
    try:
        async for message in ws:
            req = json.loads(message)
            for ch in req.get("channels", []):
                subscribers.setdefault(ch, set()).add(ws)
                mine.append(ch)
            changed.set()
    finally:
        for ch in mine:
            subscribers[ch].discard(ws)


async def reader(url: str) -> None:
    r = aioredis.Redis.from_url(url)
    last: dict[str, bytes | str] = {}
    while True:
        for ch in subscribers:
            last.setdefault(ch, "$")
        if not last:
            await changed.wait()
            changed.clear()
            continue
        streams = {key(ch): pos for ch, pos in last.items()}
        reply: Any = await r.xread(streams, count=1000, block=100)  # type: ignore[arg-type]
        for stream, entries in reply or []:
            kind_sym = stream.decode()
            sym = kind_sym[kind_sym.index("{") + 1 : kind_sym.index("}")]
            ch = f"{kind_sym.rsplit(':', 1)[1]}:{sym}"
            last[ch] = entries[-1][0]
            events = b",".join(fields[b"d"] for _, fields in entries)
            frame = b'{"type":"events","ch":"%s","events":[%s]}' % (ch.encode(), events)
            broadcast(subscribers.get(ch, ()), frame, text=True)


async def main(url: str, port: int) -> None:
    async with serve(handler, "127.0.0.1", port, compression=None):
        await reader(url)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="naive baseline server for the bench")
    p.add_argument("--redis", required=True)
    p.add_argument("--port", type=int, required=True)
    a = p.parse_args()
    import uvloop

    uvloop.run(main(a.redis, a.port))
