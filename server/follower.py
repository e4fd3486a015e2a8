"""The stream follower's rules, sans-I/O: where each live channel stands, what a push or a read
delivers, which metas and streams to read next, and how long to pause after a costly fan-out.

Every append reaches Redis with a push of the same events (see `tickwire.feeds.store`). A pushed
batch is delivered when it continues its channel's seq exactly; a hole in the pushed seqs, a
channel the follower starts on, and any channel whose stored seq is past what was read when the
two are compared, are read from the stream instead ("behind"). Seqs are dense, so a batch is never
delivered twice and a hole is never skipped: it is read from the stream.

The I/O loop around it (`tickwire.server.reader.StreamReader`) asks, in turn:
- `plan_sync(live)`: the channels whose metas to read (new ones, and rechecks), then hands the
  answers to `apply_metas`;
- `read_commands()`: the XREADs of the channels behind (one per hash slot on a cluster), whose
  replies go to `take_read`;
- `take_pushes(messages)`: the pushed batches to fan out;
- `fanned_out(...)` after each fan-out, and `take_pause()` before the next read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from tickwire.core.channels import Channel
from tickwire.core.commands import Arg
from tickwire.core.config import ServerConfig
from tickwire.core.stream import PushSection, StreamPosition, parse_push
from tickwire.server.batch import Batch
from tickwire.server.stored import Meta, to_batches

_PUSH_KINDS = (b"message", b"smessage")


def next_count(previous: int, full: bool, streams: int, read_count: int) -> int:
    """XREAD COUNT per stream for the next read.

    Replies stay near `read_count` entries in all (large replies cost GC time), so the floor is
    read_count/streams; but while some stream fills its COUNT the count doubles (up to
    read_count), so one hot stream among many is not held to a trickle per round trip.
    """
    floor = max(16, read_count // streams)
    if full:
        return min(max(previous, floor) * 2, max(read_count, floor))
    return max(floor, previous // 2)


def fanout_pause(cost_s: float, idle_s: float, config: ServerConfig) -> float:
    """Seconds to wait after a fan-out that cost `cost_s` of CPU, `idle_s` after the previous
    one (and its pause) ended.

    A fan-out costs about one socket write per subscriber, whatever the frame carries. When the
    fan-outs keep the server busy, reading again at once after one makes the next frames small
    and the writes per event many: the server spends its CPU on writes while its clients (which
    share the machine in the bench) fall behind. Waiting about as long as the fan-out took lets
    events gather, so each write carries more, at a latency of about one more fan-out. A
    server with time to spare (`fanout_pause_busy`) does not wait.
    """
    if cost_s * 1000 <= config.fanout_pause_after_ms:
        return 0.0
    if cost_s < config.fanout_pause_busy * (cost_s + idle_s):
        return 0.0
    return min(cost_s * config.fanout_pause_ratio, config.fanout_pause_max_ms / 1000)


class StreamFollower:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        #: Last seq read per followed channel, and the epoch it belongs to.
        self.positions: dict[Channel, int] = {}
        self.epochs: dict[Channel, str] = {}
        #: Pushes that were not an append's (someone else publishing on the live channel).
        self.bad_pushes = 0
        self._keys: dict[bytes, Channel] = {}
        #: Compare every followed channel with its meta at the next sync (start, reconnect,
        #: a push of another epoch).
        self._recheck = True
        #: Followed channels still to compare with their metas in this round of the sweep, the
        #: share of them due (a fraction carried over), and whether a poll asked for one.
        self._sweep: list[Channel] = []
        self._sweep_credit = 0.0
        self._sweep_due = False
        #: Channels that appeared while we were running: read from their epoch's start.
        self._fresh: set[Channel] = set()
        #: Channels to catch up from their stream: pushes alone may not continue them.
        self._behind: set[Channel] = set()
        #: Followed channels whose stream key holds another type (someone wrote there): an
        #: XREAD naming one fails for every stream it names, so they are not read until the
        #: sweep comes to them again (`set_aside`).
        self._aside: set[Channel] = set()
        #: Channels `plan_sync` started following, placed once their metas come.
        self._added: set[Channel] = set()
        #: Channels stored behind what was read in the same epoch: (epoch, seq read).
        self._rolled_back: dict[Channel, StreamPosition] = {}
        #: Channels moved to a new epoch: where their new epoch starts (before its first seq).
        self._renewed: dict[Channel, StreamPosition] = {}
        #: XREAD COUNT of the next read, and whether the last reply filled it for some stream.
        self._read_count = 0
        self._full = False
        #: Seconds to wait before the next read (`fanout_pause`), and when the last fan-out
        #: (or the pause after it) ended.
        self._pause = 0.0
        self._ready_at = 0.0

    def position_of(self, channel: Channel) -> StreamPosition | None:
        """Where the follower stands on `channel` (epoch "": none stored yet), None if it does
        not follow it. Kept apart as seq and epoch inside: a push moves the seq of a channel
        many times a second, its epoch almost never."""
        seq = self.positions.get(channel)
        return None if seq is None else StreamPosition(self.epochs.get(channel, ""), seq)

    # -- the set of followed channels ----------------------------------------------------------
    @property
    def wants_sync(self) -> bool:
        """A recheck or a sweep is owed: `plan_sync` has metas to read even if nothing changed."""
        return self._recheck or self._sweep_due

    @property
    def behind(self) -> frozenset[Channel]:
        """The channels to read from their streams before pushes can continue them."""
        return frozenset(c for c in self._behind if c in self.positions)

    def reconnected(self) -> None:
        """A new connection to Redis: what was pushed meanwhile is lost; compare everything."""
        self._recheck = True

    def poll(self) -> None:
        """A registry poll passed: a share of the followed channels is due for comparison."""
        self._sweep_due = True

    def appeared(self, channels: Iterable[Channel]) -> None:
        """Channels new to the registry while running: followed from their epoch's start, so
        that wildcard subscribers get their first events."""
        self._fresh.update(channels)

    def plan_sync(self, live: set[Channel]) -> list[Channel]:
        """Follow exactly `live`; the channels whose metas `apply_metas` needs next."""
        dropped = [c for c in self.positions if c not in live]
        for c in dropped:
            del self.positions[c]
            self.epochs.pop(c, None)
            self._behind.discard(c)
            self._aside.discard(c)
        added = [c for c in live if c not in self.positions]
        if self._recheck:
            check = list(live)
        elif self._sweep_due:
            check = added + self._next_sweep(live)
        else:
            check = added
        self._recheck = self._sweep_due = False
        # Not in `positions` until placed: a catch-up waits for the follower's position.
        self._added = set(added)
        if added or dropped:  # rebuilt per poll, it cost ~6 ms at 6 000 channels
            self._keys = {c.stream_key.encode(): c for c in live}
        return check

    def apply_metas(self, metas: Mapping[Channel, Meta | None]) -> None:
        """Place the channels `plan_sync` added, and notice epochs and appends nobody pushed."""
        added, self._added = self._added, set()
        for c, meta in metas.items():
            if c in added:
                if meta is None:
                    self.positions[c] = 0  # read it from its first event when it appears
                else:
                    self.epochs[c] = meta[0]
                    # A channel born while we run is read whole, so wildcard subscribers get
                    # its first events; an old one from now on.
                    self.positions[c] = meta[2] - 1 if c in self._fresh else meta[1]
                self._fresh.discard(c)
                self._behind.add(c)
            elif c not in self.positions:
                continue
            elif meta is not None and self.epochs.get(c) != meta[0]:
                # A new epoch: the stream was recreated or rolled back. Read it from its start;
                # the loop announces the reset to subscribers at once (`take_renewed`).
                self.epochs[c] = meta[0]
                self.positions[c] = meta[2] - 1
                self._behind.add(c)
                self._renewed[c] = StreamPosition(meta[0], meta[2] - 1)
            elif meta is not None and meta[1] < self.positions[c]:
                # Stored behind what was read, in the same epoch: Redis lost the tail. The loop
                # gives the channel a new epoch (`take_rolled_back`) before it reads a push.
                self._rolled_back[c] = StreamPosition(meta[0], self.positions[c])
            elif meta is not None and meta[1] > self.positions[c]:
                # Stored past what was read: its pushes are on the way, or were lost (a
                # reconnect) or never made. The stream tells; a push that follows is dropped.
                self._behind.add(c)

    def take_rolled_back(self) -> dict[Channel, StreamPosition]:
        """The channels found stored behind what was read in the same epoch since the last
        call, with where they were read to: the loop gives each a new epoch in Redis
        (`tickwire.server.stored.FENCE_LUA`) and hands the metas after to `apply_metas`."""
        out, self._rolled_back = self._rolled_back, {}
        return {c: p for c, p in out.items() if c in self.positions}

    def take_renewed(self) -> dict[Channel, StreamPosition]:
        """The channels `apply_metas` moved to a new epoch since the last call, each with the
        position its new epoch starts after."""
        out, self._renewed = self._renewed, {}
        return {c: p for c, p in out.items() if c in self.positions}

    def _next_sweep(self, live: set[Channel]) -> list[Channel]:
        """The followed channels this poll compares with their metas: every one once per
        `meta_recheck_s`, a share per poll, so that no poll stalls the fan-out. It finds appends
        nobody pushed (another writer, a hand repair); pushes, holes and reconnects set off a
        whole recheck at once."""
        cfg = self.config
        self._sweep_credit += len(live) * cfg.registry_poll_s / cfg.meta_recheck_s
        n = int(self._sweep_credit)
        if n == 0:
            return []
        self._sweep_credit -= n
        if not self._sweep:
            self._sweep = list(live)
        share, self._sweep = self._sweep[:n], self._sweep[n:]
        if self._aside:
            # Read again: the key may have been put right (`set_aside`).
            back = self._aside.intersection(share)
            self._aside -= back
            self._behind |= back
        # Followed still, and not new (new ones are checked as added).
        return [c for c in share if c in self.positions]

    # -- reads ---------------------------------------------------------------------------------
    def read_commands(self, slot_of: Callable[[Channel], int] | None = None) -> list[list[Arg]]:
        """The XREADs (no BLOCK) of the channels behind ([] when none is): one, or with
        `slot_of` (Redis Cluster, where a command's keys must share a slot) one per slot."""
        aside = self._aside
        channels = [c for c in self._behind if c in self.positions and c not in aside]
        if not channels:
            self._behind = set()
            return []
        self._read_count = count = next_count(
            self._read_count, self._full, len(channels), self.config.read_count
        )
        groups: dict[int, list[Channel]] = {}
        if slot_of is None:
            groups[0] = channels
        else:
            for c in channels:
                groups.setdefault(slot_of(c), []).append(c)
        commands = []
        for group in groups.values():
            cmd: list[Arg] = ["XREAD", "COUNT", count, "STREAMS"]
            cmd += [c.stream_key for c in group]
            cmd += [f"{self.positions[c]}-0" for c in group]
            commands.append(cmd)
        return commands

    def read_channels(self, command: list[Arg]) -> list[Channel]:
        """The followed channels an XREAD of `read_commands` names."""
        keys = command[4:]
        streams = keys[: len(keys) // 2]
        found = (self._keys.get(str(k).encode()) for k in streams)
        return [c for c in found if c is not None]

    def set_aside(self, channels: Iterable[Channel]) -> list[Channel]:
        """Leave `channels` out of reads (their stream keys hold another type) until the sweep
        comes to them, every `meta_recheck_s`; those not already aside."""
        new = [c for c in channels if c in self.positions and c not in self._aside]
        self._aside.update(new)
        return new

    def take_read(self, reply: list[Any] | None) -> list[Batch]:
        """The batches of the reads' replies (joined: each is a list of [key, entries]), in
        order; positions move past them. A channel whose stream gave less than COUNT is up to
        date as of this read: what is appended after it comes as a push (the subscription was
        there before the read)."""
        keys, count = self._keys, self._read_count
        full = {keys[k] for k, entries in reply or () if len(entries) >= count and k in keys}
        self._full = bool(full)
        self._behind = full
        batches: list[Batch] = []
        for key, entries in reply or ():
            channel = keys.get(key)
            if channel is None or channel not in self.positions:
                continue
            for batch in to_batches(channel, entries):
                known = self.epochs.get(channel)
                if known is not None and batch.epoch != known:
                    # Read into a new epoch before the epoch check saw it: reposition first.
                    self._recheck = True
                    break
                self.epochs[channel] = batch.epoch
                self.positions[channel] = batch.last_seq
                batches.append(batch)
        return batches

    # -- pushes --------------------------------------------------------------------------------
    def take_pushes(self, messages: list[Any]) -> list[Batch]:
        """The pushed batches that continue their channel exactly; a hole sends it to catch up.

        A channel's events from all of `messages` make one batch: when the server falls behind,
        pushes pile up, and one batch per channel instead of one per push and channel is what
        lets its fan-out cost per event fall as the load rises (fewer, larger frames).
        """
        runs: dict[Channel, tuple[str, int, list[bytes]]] = {}
        for message in messages:
            # [b"message", channel, payload] (b"smessage": sharded pub/sub, a cluster); the
            # other replies here (pong) only prove the link is alive.
            if len(message) != 3 or message[0] not in _PUSH_KINDS:
                continue
            sections, whole = parse_push(message[2])
            for section in sections:
                self._take_push(section, runs)
            if not whole:
                # Not an append's push (someone else publishing here): the streams are the
                # truth, and this is not one of them.
                self.bad_pushes += 1
        return [Batch(channel, *run) for channel, run in runs.items()]

    def _take_push(
        self, section: PushSection, runs: dict[Channel, tuple[str, int, list[bytes]]]
    ) -> None:
        channel = self._keys.get(section.key)
        if channel is None:
            return  # nobody here follows it
        pos = self.positions.get(channel)
        if pos is None:
            return
        epoch, first, events = section.epoch, section.first_seq, section.events
        known = self.epochs.get(channel)
        if known is not None and epoch != known:
            self._recheck = True  # a new epoch: reposition from the meta, then catch up
            return
        if first > pos + 1:
            self._behind.add(channel)  # a hole: the stream has it
            return
        last = first + len(events) - 1
        if last <= pos:
            return  # read already (a catch-up overlapped the push)
        if first <= pos:
            events = events[pos + 1 - first :]
            first = pos + 1
        self.epochs[channel] = epoch
        self.positions[channel] = last
        run = runs.get(channel)
        if run is None:
            runs[channel] = (epoch, first, events)
        else:
            # Continues it exactly: same epoch (checked above against `epochs`, which the run
            # set), and `first` is the run's end + 1 (checked against `positions`).
            run[2].extend(events)

    # -- pacing --------------------------------------------------------------------------------
    def fanned_out(self, cost_s: float, started: float, ended: float) -> None:
        """A fan-out that cost `cost_s` of CPU ran from `started` to `ended` (monotonic)."""
        pause = fanout_pause(cost_s, started - self._ready_at, self.config)
        self._pause = max(self._pause, pause)
        self._ready_at = ended

    @property
    def pause(self) -> float:
        return self._pause

    def take_pause(self) -> float:
        """Seconds to wait before the next read (0: none); owed once."""
        pause, self._pause = self._pause, 0.0
        return pause

    def resumed(self, now: float) -> None:
        """The pause ended at `now` (monotonic)."""
        self._ready_at = now
