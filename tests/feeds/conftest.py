"""Helpers for feed tests: read a channel's stored events back from Redis."""

from __future__ import annotations

from typing import Any

import orjson

from tickwire.core.channels import Channel
from tickwire.core.redis_wire import RedisConnection
from tickwire.core.stream import seq_of


async def stored_events(conn: RedisConnection, channel: Channel) -> list[dict[str, Any]]:
    entries = await conn.execute("XRANGE", channel.stream_key, "-", "+")
    out = []
    for entry_id, fields in entries:
        doc = orjson.loads(fields[1])
        assert doc["seq"] == seq_of(entry_id), "entry ID and event seq disagree"
        out.append(doc)
    return out
