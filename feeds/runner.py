"""Runs the simulator into a publisher, keeping the rate honestly and reporting what it achieved."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from tickwire.feeds.publisher import Publisher
from tickwire.feeds.simulator import MarketSimulator, paced_chunks

log = logging.getLogger("tickwire.feeds.sim")


@dataclass(frozen=True, slots=True)
class FeedReport:
    events: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


async def run_simulator(
    publisher: Publisher,
    sim: MarketSimulator,
    *,
    count: int | None = None,
    duration: float | None = None,
    throttle: bool = True,
    progress: Callable[[int, float], None] | None = None,
    progress_every_s: float = 1.0,
) -> FeedReport:
    """Publish simulated chunks until `count`/`duration`; returns events sent and time taken."""
    t0 = time.monotonic()
    sent = 0
    next_report = t0 + progress_every_s
    async for chunk in paced_chunks(sim, count=count, duration=duration, throttle=throttle):
        await publisher.publish(sim.encode(chunk, publisher.clock_ns()))
        sent += len(chunk)
        now = time.monotonic()
        if progress is not None and now >= next_report:
            progress(sent, now - t0)
            next_report = now + progress_every_s
    await publisher.flush()
    return FeedReport(sent, time.monotonic() - t0)
