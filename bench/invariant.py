"""Checks protocol v1's delivery invariant on what one client received, message by message.

Per channel: seqs strictly increase within an epoch, and every hole between two delivered events
is covered by exactly one `gap`, or by the `skipped` count of the `events` message that ends it
(a throttled subscription's superseded quotes and bars), or the epoch changed with a `reset`.
Used by the tests and by the bench on every sampled connection.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ChannelTrack:
    epoch: str | None = None
    last: int | None = None
    #: Seqs announced as gaps and not yet passed: (from, to).
    announced: list[tuple[int, int]] = field(default_factory=list)
    delivered: int = 0


@dataclass
class InvariantChecker:
    channels: dict[str, ChannelTrack] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    duplicates: int = 0
    lost: int = 0
    gaps_announced: int = 0
    gap_events: int = 0
    resets: int = 0
    #: Seqs that `events` messages said they skipped (throttled subscriptions).
    skipped: int = 0

    def feed(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "events":
            self._events(message)
        elif kind == "gap":
            t = self.channels.setdefault(message["ch"], ChannelTrack())
            a, b = int(message["from_seq"]), int(message["to_seq"])
            if t.last is not None and a != t.last + 1:
                self.violations.append(
                    f"{message['ch']}: gap {a}..{b} does not start after {t.last}"
                )
            self.gaps_announced += 1
            self.gap_events += b - a + 1
            t.last = b
        elif kind == "reset":
            t = self.channels.setdefault(message["ch"], ChannelTrack())
            t.epoch = message["epoch"]
            t.last = None
            self.resets += 1

    def _events(self, message: dict[str, Any]) -> None:
        ch = message["ch"]
        t = self.channels.setdefault(ch, ChannelTrack())
        events = message["events"]
        # The baseline server's frames carry no epoch; the events do.
        epoch = message.get("epoch") or (events[0].get("epoch", "") if events else "")
        if t.epoch is not None and epoch != t.epoch and t.last is not None:
            self.violations.append(f"{ch}: epoch changed {t.epoch} → {epoch} without a reset")
        t.epoch = epoch
        skipped = int(message.get("skipped", 0))
        if skipped and events:
            # A throttled channel's latest event: the hole before it is exactly `skipped` long
            # (when the client stands anywhere: a channel's first events skip nothing).
            first = int(events[0]["seq"])
            if t.last is not None and first - t.last - 1 != skipped:
                self.violations.append(
                    f"{ch}: skipped {skipped} before {first}, but the hole after {t.last}"
                    f" is {first - t.last - 1}"
                )
            if t.last is not None:
                t.last = first - 1
            self.skipped += skipped
        for ev in events:
            seq = int(ev["seq"])
            if ev.get("epoch", epoch) != epoch:
                self.violations.append(f"{ch}: event epoch {ev.get('epoch')} in a frame of {epoch}")
            if t.last is not None:
                if seq <= t.last:
                    self.duplicates += 1
                    self.violations.append(f"{ch}: seq {seq} after {t.last} (duplicate or reorder)")
                    continue
                if seq != t.last + 1:
                    self.lost += seq - t.last - 1
                    self.violations.append(f"{ch}: silent hole {t.last + 1}..{seq - 1}")
            t.last = seq
            t.delivered += 1

    def expect_from(self, channel: str, epoch: str, last_seq: int) -> None:
        """Declare a starting point (e.g. the resume position a client asked for)."""
        t = self.channels.setdefault(channel, ChannelTrack())
        t.epoch, t.last = epoch, last_seq

    @property
    def delivered(self) -> int:
        return sum(t.delivered for t in self.channels.values())

    @property
    def ok(self) -> bool:
        return not self.violations
