"""Reads of stored history on the server's own connections: the registry, metas, event ranges.

Two lanes, each one connection: `control` for the channel registry, metas, `list` and the
first page of every snapshot or resume, and `bulk` for the further pages of long replays. One
client replaying 100 k events then never delays another client's snapshot, a `list` or the
registry poll by more than one small command. On a lane, one pipeline is out at a time, and the
requests that came meanwhile go together in the next: a storm of subscribes (thousands of
clients reconnecting) costs a round trip per `MAX_BATCH` of them, not one each.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any, NamedTuple

from tickwire.core.channels import REGISTRY_KEY, Channel
from tickwire.core.commands import Arg, NodeDown, RedisReplyError, wrong_type
from tickwire.core.errors import ChannelError, RedisUnavailable
from tickwire.core.redis_target import RedisLink, RedisTopology
from tickwire.server.batch import Batch
from tickwire.server.stored import Meta, meta_commands, parse_metas, to_batches

log = logging.getLogger("tickwire.server.history")


#: Requests of one pipeline at most: a batch of first pages (up to 1 000 events each) stays a
#: few MB, and a request never waits behind more than that.
MAX_BATCH = 64


class _Call(NamedTuple):
    """One caller's request on a lane."""

    commands: tuple[list[Arg], ...]
    timeout: float
    future: asyncio.Future[list[Any]]


class _Lane:
    """One connection and one pipeline at a time; it is reopened after any failure."""

    def __init__(self, redis: RedisTopology) -> None:
        self.redis = redis
        self._conn: RedisLink | None = None
        #: Requests waiting for the next pipeline.
        self._queue: deque[_Call] = deque()
        self._task: asyncio.Task[None] | None = None

    async def call(self, commands: tuple[list[Arg], ...], timeout: float) -> list[Any]:
        """The replies to `commands`. A caller's cancellation leaves the others' pipeline be."""
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._queue.append(_Call(commands, timeout, future))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="tickwire-history")
        return await future

    async def _run(self) -> None:
        queue = self._queue
        batch: list[_Call] = []
        try:
            while queue:
                batch = []
                while queue and len(batch) < MAX_BATCH:
                    call = queue.popleft()
                    if not call.future.done():  # not cancelled while it waited
                        batch.append(call)
                if not batch:
                    continue
                commands = [command for call in batch for command in call.commands]
                try:
                    if self._conn is None or self._conn.closed:
                        self._conn = await self.redis.open()
                    replies = await self._conn.pipeline(
                        commands, timeout=max(call.timeout for call in batch)
                    )
                except Exception as exc:
                    for _, _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                start = 0
                for call in batch:
                    end = start + len(call.commands)
                    if not call.future.done():
                        call.future.set_result(replies[start:end])
                    start = end
        finally:
            # Cancelled (the server closes): nothing waits for ever.
            for _, _, future in [*batch, *queue]:
                if not future.done():
                    future.set_exception(RedisUnavailable("history reads stopped"))
            queue.clear()

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._conn is not None:
            self._conn.close()


class History:
    """Registry, meta and history reads."""

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        self.url = url
        #: Seconds a read may take before Redis counts as not answering.
        self.timeout = timeout
        redis = RedisTopology(url)
        self._control = _Lane(redis)
        self._bulk = _Lane(redis)
        #: Registry entries parsed so far: a registry of thousands is read whole when it grows.
        self._parsed: dict[bytes, Channel | None] = {}

    async def call(self, *commands: list[Arg], timeout: float | None = None) -> list[Any]:
        return await self._control.call(commands, self.timeout if timeout is None else timeout)

    def close(self) -> None:
        self._control.close()
        self._bulk.close()

    async def metas(self, channels: list[Channel]) -> dict[Channel, Meta | None]:
        """(epoch, last seq, epoch's first seq) per channel; None where the channel has no meta.

        A channel whose Redis Cluster master is down is left out (`parse_metas`): the caller
        places the others now and asks again for it. Redis down as a whole raises."""
        if not channels:
            return {}
        return parse_metas(channels, await self.call(*meta_commands(channels)))

    async def range(
        self, channel: Channel, after: int, count: int, *, bulk: bool = False
    ) -> list[Batch]:
        """Up to `count` stored events with seq > `after`, as consecutive batches."""
        lane = self._bulk if bulk else self._control
        (entries,) = await lane.call(
            (["XRANGE", channel.stream_key, f"{after + 1}-0", "+", "COUNT", count],), self.timeout
        )
        return to_batches(channel, _checked(entries, "XRANGE"))

    async def registry_size(self) -> int:
        (size,) = await self.call(["SCARD", REGISTRY_KEY])
        return int(_checked(size, "SCARD"))

    async def registry(self) -> list[Channel]:
        (members,) = await self.call(["SMEMBERS", REGISTRY_KEY])
        members = _checked(members, "SMEMBERS")
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


class ForeignKey(RedisUnavailable):
    """A key read holds another type than tickwire writes there (someone else wrote it): its
    channel waits aside, as one whose cluster master is down, and the others go on."""


def _checked(reply: Any, command: str) -> Any:
    """The reply, or RedisUnavailable for an error reply (LOADING while Redis replays its
    AOF, CLUSTERDOWN during a failover): the caller backs off and reads again."""
    if isinstance(reply, NodeDown):
        raise reply  # a RedisUnavailable already, and callers may tell it apart
    if wrong_type(reply):
        raise ForeignKey(f"{command} refused: {reply}")
    if isinstance(reply, RedisReplyError):
        raise RedisUnavailable(f"{command} refused: {reply}")
    return reply
