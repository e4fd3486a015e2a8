"""Per-subscription throttle (`max_hz`): what a hub group's channels send now, and what waits.

Sans-I/O: the hub offers each group's batches with the time (`offer`), and asks at the deadlines
the throttle names (`next_due`) for what became due (`due`); a timer at the I/O edge calls it.
One throttle serves a whole hub group, so its cost is per distinct set of rates, not per client.

Per channel, at most one message goes out per tick, ticks being `1 / max_hz` seconds apart:

- what comes waits for the next tick of a clock of `1 / max_hz` seconds shared by every channel
  of that rate (ticks at whole multiples of the interval), then goes; so every channel of a
  group that changed since the last tick goes at the same tick, in one frame per client, and a
  client's view is never older than one interval plus the usual latency;
- quotes and bars send only their latest event, which supersedes the others: its batch says how
  many seqs it skipped (`Batch.skipped`, `"skipped":N` in the frame), so the client's hole is
  accounted for exactly;
- trades are never dropped: what waited goes together, as one batch when consecutive.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping

from tickwire.core.channels import WILDCARD, Channel, ChannelPattern
from tickwire.core.errors import ProtocolError
from tickwire.server.batch import Batch

#: Bounds of `max_hz` (frames per second per channel). The lowest rate still shows a dashboard
#: moving every 10 s; above the highest, a throttle would save nothing over the live stream.
MIN_HZ = 0.1
MAX_HZ = 1000.0
#: A deadline this close is due: the loop's timers round to whole milliseconds (uvloop).
SLACK_S = 0.001

#: A pattern's rate; None: not throttled.
Rate = float | None


def parse_max_hz(value: object) -> Rate:
    """A `subscribe` request's `max_hz` (ProtocolError `bad_request` if out of bounds)."""
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not MIN_HZ <= value <= MAX_HZ  # NaN fails too
    ):
        raise ProtocolError(
            "bad_request", f"'max_hz' must be a number from {MIN_HZ:g} to {MAX_HZ:g}"
        )
    return float(value)


class _Slot:
    """One channel's state: its rate, the tick it waits for (or last went at), what waits."""

    __slots__ = ("held", "hz", "tick")

    def __init__(self, hz: float) -> None:
        self.hz = hz
        #: The tick (a whole multiple of 1 / hz, as its index) `held` waits for, or the last
        #: one it went at.
        self.tick = 0
        self.held: list[Batch] = []


class Throttle:
    """The rates of one hub group's patterns, and each throttled channel's slot.

    A channel covered by several patterns gets the fastest of their rates, and is not throttled
    if one of them is not (like `tickwire.server.projection.Projection`'s fields).
    """

    __slots__ = ("_deadlines", "_rate_of", "_slots", "patterns", "rates")

    def __init__(
        self, patterns: frozenset[ChannelPattern], rates: Mapping[ChannelPattern, float]
    ) -> None:
        self.patterns = patterns
        self.rates = dict(rates)
        self._rate_of: dict[Channel, Rate] = {}
        self._slots: dict[Channel, _Slot] = {}
        #: (deadline, channel) of each channel holding batches; stale entries are skipped.
        self._deadlines: list[tuple[float, Channel]] = []

    def interval_of(self, channel: Channel) -> float | None:
        """Seconds between two frames of `channel`; None: it is not throttled."""
        hz = self.rate_of(channel)
        return None if hz is None else 1.0 / hz

    def rate_of(self, channel: Channel) -> Rate:
        """The `max_hz` of `channel`; None: it is not throttled."""
        try:
            return self._rate_of[channel]
        except KeyError:
            pass
        hz: Rate = None
        for pattern in (
            ChannelPattern(channel.kind, channel.symbol),
            ChannelPattern(channel.kind, WILDCARD),
        ):
            if pattern not in self.patterns:
                continue
            own = self.rates.get(pattern)
            if own is None:
                hz = None
                break
            hz = own if hz is None else max(hz, own)
        self._rate_of[channel] = hz
        return hz

    def offer(self, batches: list[Batch], now: float) -> list[Batch]:
        """The batches (of this group's channels) to send now; the rest waits for `due`."""
        out: list[Batch] = []
        for batch in batches:
            channel = batch.channel
            slot = self._slots.get(channel)
            if slot is None:
                hz = self.rate_of(channel)
                if hz is None:
                    out.append(batch)
                    continue
                slot = self._slots[channel] = _Slot(hz)
            if not slot.held:
                # The next tick, and never the one it last went at (a timer that fired a
                # little early may have sent it already).
                # A tick that went late is not made up for by skipping the next one: that
                # would double the age of the client's view when the machine is busy.
                slot.tick = max(math.floor(now * slot.hz) + 1, slot.tick + 1)
                heapq.heappush(self._deadlines, (slot.tick / slot.hz, channel))
            slot.held.append(batch)
        return out

    def next_due(self) -> float | None:
        """When the next waiting batch is due (None: nothing waits)."""
        return self._deadlines[0][0] if self._deadlines else None

    def due(self, now: float) -> list[Batch]:
        """The waiting batches whose slot has come, rendered (and no longer waiting)."""
        out: list[Batch] = []
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now + SLACK_S:
            _, channel = heapq.heappop(deadlines)
            slot = self._slots.get(channel)
            if slot is None or not slot.held:
                continue
            out += _render(slot.held)
            slot.held = []
        return out

    def keep_epoch(self, channel: Channel, epoch: str) -> None:
        """`channel` moved to `epoch` (its old one was lost or recreated): what waits of any
        other epoch is dropped, never to follow the `reset` its subscribers are sent now."""
        slot = self._slots.get(channel)
        if slot is not None and slot.held:
            slot.held = [b for b in slot.held if b.epoch == epoch]

    def waiting(self) -> list[Batch]:
        """What waits, rendered as it would go (for a member leaving the group); it still
        waits for the others."""
        return [b for slot in self._slots.values() if slot.held for b in _render(slot.held)]


def _render(batches: list[Batch]) -> list[Batch]:
    """What goes for `batches` (of one channel, in the order read): per run of one epoch, the
    latest event superseding the rest (quotes, bars), or the events merged (trades)."""
    channel = batches[0].channel
    runs: list[list[Batch]] = []
    for batch in batches:
        if runs and runs[-1][-1].epoch == batch.epoch and runs[-1][-1].last_seq < batch.first_seq:
            runs[-1].append(batch)
        else:
            runs.append([batch])
    out: list[Batch] = []
    for run in runs:
        first, last = run[0], run[-1]
        if channel.kind != "trades":
            if len(run) == 1:
                out.append(last.superseding())
            else:
                skipped = last.last_seq - first.start
                latest = last.events[-1:]
                out.append(Batch(channel, last.epoch, last.last_seq, latest, False, skipped))
            continue
        if len(run) == 1:
            out.append(first)
            continue
        # Trades: consecutive batches become one; a hole (a catch-up read's) splits them.
        events = list(first.events)
        begin, end = first.first_seq, first.last_seq
        for batch in run[1:]:
            if batch.first_seq != end + 1:
                out.append(Batch(channel, first.epoch, begin, events))
                events, begin = list(batch.events), batch.first_seq
            else:
                events += batch.events
            end = batch.last_seq
        out.append(Batch(channel, first.epoch, begin, events))
    return out
