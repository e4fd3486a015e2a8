"""Tells `tickwire bars` which on-demand bar channels this server's clients want, in Redis.

The patterns of on-demand bar intervals the hub has subscribers for (`bars.5s:*`,
`bars.250ms:BTC-USD`) are written to the sorted set `BAR_DEMAND_KEY`, each scored with the time
(ms since 1970) its demand lapses: now + `bar_retention_s`. One `ZADD … GT` per pass, on that
one key, so scores only go up whichever server writes. A pass runs when a subscription to an
on-demand interval comes or goes (`changed`), and every third of the retention while any is
held, and when Redis comes back after an outage; a pattern whose last subscriber left is
written once more then, so it lapses a retention after that (within the pass's `min_gap_s`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

from tickwire.core.channels import BAR_DEMAND_KEY, ChannelPattern, is_on_demand
from tickwire.core.commands import Arg, RedisReplyError
from tickwire.core.errors import RedisUnavailable
from tickwire.core.redis_target import RedisLink, RedisTopology
from tickwire.core.waits import wait_set
from tickwire.server.hub import Hub

log = logging.getLogger("tickwire.server.demand")


class BarDemand:
    """The demand recorder; `run()` is one of the server's tasks."""

    def __init__(
        self,
        url: str,
        hub: Hub,
        *,
        retention_s: float,
        clock: Callable[[], float] = time.time,
        min_gap_s: float = 0.2,
    ) -> None:
        self.url = url
        self.hub = hub
        self.retention_s = retention_s
        self.clock = clock
        self.min_gap_s = min_gap_s
        #: Patterns written in the last pass (still subscribed then).
        self.recorded: frozenset[ChannelPattern] = frozenset()
        self.passes = 0
        self._conn: RedisLink | None = None
        self._redis = RedisTopology(self.url)
        self._wakeup = asyncio.Event()

    def changed(self, patterns: Iterable[ChannelPattern]) -> None:
        """Subscriptions to `patterns` were added or removed: record at once if it matters."""
        if any(is_on_demand(p.kind) for p in patterns):
            self._wakeup.set()

    def renew(self) -> None:
        """Record again now (Redis came back, and may have come back empty)."""
        if self.recorded:
            self._wakeup.set()

    def wanted(self) -> frozenset[ChannelPattern]:
        """The on-demand bar patterns this server's clients subscribe to now."""
        hub = self.hub
        return frozenset(
            p for sub in hub.subscribers for p in hub.patterns_of(sub) if is_on_demand(p.kind)
        )

    async def record(self) -> None:
        """One pass: write the wanted patterns, and those just left, with their lapse time."""
        wanted = self.wanted()
        members = wanted | self.recorded
        if members:
            until = int((self.clock() + self.retention_s) * 1000)
            command: list[Arg] = ["ZADD", BAR_DEMAND_KEY, "GT"]
            for p in sorted(members, key=str):
                command += [until, p.name]
            if self._conn is None or self._conn.closed:
                self._conn = await self._redis.open()
            await self._conn.execute(*command, timeout=5.0)
        self.recorded = wanted
        self.passes += 1

    async def run(self) -> None:
        renew = max(self.retention_s / 3, self.min_gap_s)
        backoff = 0.1
        try:
            while True:
                await wait_set(self._wakeup, renew if self.recorded else None)
                self._wakeup.clear()
                try:
                    await self.record()
                    backoff = 0.1
                except (RedisUnavailable, RedisReplyError) as exc:
                    log.warning("cannot record bar demand: %s; again in %.1f s", exc, backoff)
                    self._close()
                    self._wakeup.set()
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                await asyncio.sleep(self.min_gap_s)
        finally:
            self._close()

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
