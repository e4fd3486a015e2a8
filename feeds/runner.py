"""Runs the simulator into a publisher, keeping the rate honestly and reporting what it achieved."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from tickwire.core.channels import Channel
from tickwire.core.waits import within
from tickwire.feeds.bars import BarAggregator, ClosedBar
from tickwire.feeds.publisher import Publisher
from tickwire.feeds.simulator import (
    RELEASE_TICK_S,
    Chunk,
    Instrument,
    MarketSimulator,
    paced_chunks,
)

log = logging.getLogger("tickwire.feeds.sim")


@dataclass(frozen=True, slots=True)
class FeedReport:
    events: int  # simulated quotes and trades
    seconds: float
    bars: int = 0  # closed bars published besides

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


#: Closed bars published per release, at most. Every symbol's bars close at the same boundary:
#: at 100 symbols that is 100 channels at once, and one append of 120 channels held the feed
#: ~3.5 ms and Redis ~2.5 ms, delaying that release's quotes and trades and the next ones'
#: (about 1 % of them, which set the bench's p99). So a release sends its quotes and trades
#: first, then at most this many bars, in a call of their own behind them: a second's bars
#: drain over a few releases (milliseconds), each adding a fraction of a millisecond.
BARS_PER_RELEASE = 25


async def run_simulator(
    publisher: Publisher,
    sim: MarketSimulator,
    *,
    bar_intervals: Sequence[str] = (),
    count: int | None = None,
    duration: float | None = None,
    throttle: bool = True,
    tick_s: float = RELEASE_TICK_S,
    flush_timeout_s: float | None = None,
    progress: Callable[[int, float], None] | None = None,
    progress_every_s: float = 1.0,
    venue_clock_ns: Callable[[], int] | None = None,
) -> FeedReport:
    """Publish simulated chunks until `count`/`duration`; returns events sent and time taken.

    With `bar_intervals` (e.g. `("1s",)`), the bars of the simulated trades go out too: each
    once a chunk passes its end, after that chunk's quotes and trades, at most
    `BARS_PER_RELEASE` a release. The interval in progress at the end of the run is incomplete
    and not published. At the end it waits until Redis has every event, or for at most
    `flush_timeout_s` (then the rest stays with the publisher: Redis is down or refuses them).
    `tick_s`, `venue_clock_ns`: see `paced_chunks`. `progress` is told the events handed to
    the publisher so far, bars included, and the seconds since the start.
    """
    chunk_bars = ChunkBars(sim.instruments, bar_intervals) if bar_intervals else None
    due: deque[ClosedBar] = deque()
    t0 = time.monotonic()
    sent = 0
    bars = 0
    next_report = t0 + progress_every_s
    paced = paced_chunks(
        sim,
        count=count,
        duration=duration,
        throttle=throttle,
        tick_s=tick_s,
        venue_clock_ns=venue_clock_ns,
    )
    async for chunk in paced:
        await publisher.publish(sim.encode(chunk, publisher.clock_ns()))
        sent += len(chunk)
        if chunk_bars is not None:
            due.extend(chunk_bars.add(chunk))
            bars += await publish_bars(publisher, due, BARS_PER_RELEASE)
        now = time.monotonic()
        if progress is not None and now >= next_report:
            progress(sent + bars, now - t0)
            next_report = now + progress_every_s
    bars += await publish_bars(publisher, due, len(due))
    await within(publisher.flush(), flush_timeout_s)
    return FeedReport(sent, time.monotonic() - t0, bars)


async def publish_bars(publisher: Publisher, due: deque[ClosedBar], limit: int) -> int:
    """Publish up to `limit` of the oldest `due` bars, stamped now; returns how many."""
    if not due or limit <= 0:
        return 0
    pt = publisher.clock_ns()
    batch: dict[Channel, list[bytes]] = {}
    n = min(limit, len(due))
    for _ in range(n):
        bar = due.popleft()
        batch.setdefault(bar.channel, []).append(bar.encode(pt))
    await publisher.publish(batch)
    return n


class ChunkBars:
    """Bars of the simulator's trades, fed to the aggregators a batch of chunks at a time.

    Only a chunk that reaches a bar boundary can close bars, and aggregating costs mostly per
    call, so chunks wait (up to `max_pending_events`) until one does: the same bars, in the same
    chunk's batch, at half the cost when chunks are small (measured on the 5-event chunks that
    `--max` at the default rate makes: 5.8 → 2.7 µs a chunk; 4096-event chunks: 160 → 70 µs).
    But not many: the feed hands out ~1 ms slices, and a whole second of them aggregated at the
    boundary stalled it 4.4 ms once a second (at 10 k events/s; 0.6 ms with this bound), which
    was the end-to-end latency tail.
    """

    def __init__(
        self,
        instruments: Sequence[Instrument],
        intervals: Sequence[str],
        *,
        max_pending_events: int = 1024,
    ) -> None:
        self.aggregators = [BarAggregator(instruments, interval) for interval in intervals]
        self.max_pending_events = max_pending_events
        self._pending: list[Chunk] = []
        self._pending_events = 0
        self._next_boundary = -(1 << 62)  # feed the first chunk at once

    def add(self, chunk: Chunk) -> list[ClosedBar]:
        """Take a chunk; returns the bars it closed."""
        self._pending.append(chunk)
        self._pending_events += len(chunk)
        # Quotes move venue time too: a bar closes with the first event past its end, not the
        # first trade, which on a quiet symbol may come much later.
        now = int(chunk.ts[-1])
        if now < self._next_boundary and self._pending_events < self.max_pending_events:
            return []
        chunks, self._pending, self._pending_events = self._pending, [], 0
        if len(chunks) == 1:
            one = chunks[0]
            kind, ts, sym, price, size = one.kind, one.ts, one.sym, one.price, one.size
        else:
            kind = np.concatenate([c.kind for c in chunks])
            ts = np.concatenate([c.ts for c in chunks])
            sym = np.concatenate([c.sym for c in chunks])
            price = np.concatenate([c.price for c in chunks])
            size = np.concatenate([c.size for c in chunks])
        trades = np.flatnonzero(kind)  # kind 1: trade; `take` beats masking 4 times
        ts, sym = ts.take(trades), sym.take(trades)
        price, size = price.take(trades), size.take(trades)
        closed: list[ClosedBar] = []
        for aggregator in self.aggregators:
            closed += aggregator.add_trades(ts, sym, price, size, now=now)
        self._next_boundary = min(
            (a.watermark // a.interval_ns + 1) * a.interval_ns for a in self.aggregators
        )
        return closed
