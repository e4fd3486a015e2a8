"""Reads of stored history on the server's own connections: the registry, metas, event ranges.

Two lanes, each one connection serialised by a lock: `control` for the channel registry, metas,
`list` and the first page of every snapshot or resume, and `bulk` for the further pages of long
replays. One client replaying 100 k events then never delays another client's snapshot, a
`list` or the registry poll by more than one small command.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from tickwire.core.channels import REGISTRY_KEY, Channel
from tickwire.core.commands import Arg, RedisReplyError
from tickwire.core.errors import ChannelError, RedisUnavailable
from tickwire.core.redis_target import RedisLink, RedisTopology
from tickwire.server.batch import Batch
from tickwire.server.stored import Meta, meta_commands, parse_metas, to_batches

log = logging.getLogger("tickwire.server.history")


class _Lane:
    """One connection, one command (or pipeline) at a time; reopened after any failure."""

    def __init__(self, redis: RedisTopology) -> None:
        self.redis = redis
        self._conn: RedisLink | None = None
        self._lock = asyncio.Lock()

    async def call(self, commands: tuple[list[Arg], ...], timeout: float) -> list[Any]:
        async with self._lock:
            if self._conn is None or self._conn.closed:
                self._conn = await self.redis.open()
            return await self._conn.pipeline(commands, timeout=timeout)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


class History:
    """Registry, meta and history reads."""

    def __init__(self, url: str) -> None:
        self.url = url
        redis = RedisTopology(url)
        self._control = _Lane(redis)
        self._bulk = _Lane(redis)
        #: Registry entries parsed so far: a registry of thousands is read whole when it grows.
        self._parsed: dict[bytes, Channel | None] = {}

    async def call(self, *commands: list[Arg], timeout: float = 5.0) -> list[Any]:
        return await self._control.call(commands, timeout)

    def close(self) -> None:
        self._control.close()
        self._bulk.close()

    async def metas(self, channels: list[Channel]) -> dict[Channel, Meta | None]:
        """(epoch, last seq, epoch's first seq) per channel; None where the channel has no meta."""
        if not channels:
            return {}
        return parse_metas(channels, await self.call(*meta_commands(channels)))

    async def range(
        self, channel: Channel, after: int, count: int, *, bulk: bool = False
    ) -> list[Batch]:
        """Up to `count` stored events with seq > `after`, as consecutive batches."""
        lane = self._bulk if bulk else self._control
        (entries,) = await lane.call(
            (["XRANGE", channel.stream_key, f"{after + 1}-0", "+", "COUNT", count],), 5.0
        )
        if isinstance(entries, RedisReplyError):
            raise RedisUnavailable(f"XRANGE refused: {entries}")
        return to_batches(channel, entries)

    async def registry_size(self) -> int:
        (size,) = await self.call(["SCARD", REGISTRY_KEY])
        return int(size)

    async def registry(self) -> list[Channel]:
        (members,) = await self.call(["SMEMBERS", REGISTRY_KEY])
        out = []
        parsed = self._parsed
        for m in members:
            if m not in parsed:
                try:
                    parsed[m] = Channel.parse(m.decode())
                except (ChannelError, UnicodeDecodeError):
                    log.warning("ignoring malformed registry entry %r", m)
                    parsed[m] = None
            channel = parsed[m]
            if channel is not None:
                out.append(channel)
        return out
