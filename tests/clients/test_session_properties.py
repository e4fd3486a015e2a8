"""Property tests of the client's resume and dedupe logic.

1. Whatever a server sends (overlaps, duplicates, holes, resets, stale heartbeats, reconnects),
   what the session delivers keeps the protocol's invariant: per channel, seqs strictly increase
   within an epoch, each hole is covered by exactly one Gap, and the epoch changes only after a
   Reset.
2. Against a model of a faithful server (Redis history, trimming, stream deletion, resume on
   reconnect) that drops connections with frames in flight, resends, and sometimes skips events
   by mistake: the session delivers every event of the history exactly once and in order, except
   what was really trimmed (announced with a `trimmed` Gap) or lost with a deleted epoch (after a
   Reset), and ends where the server ends.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tickwire.clients.messages import EventBatch, Gap, Message, Position, Reset, ResumeNeeded
from tickwire.clients.session import ClientSession, Request

CHANNELS = ("trades:AAA", "trades:BBB")


def trade(ch: str, epoch: str, seq: int) -> dict[str, Any]:
    return {
        "v": 1,
        "type": "trade",
        "sym": ch.partition(":")[2],
        "ts": seq,
        "pt": seq,
        "price": 1.5,
        "size": 1.0,
        "side": "sell",
        "trade_id": seq,
        "epoch": epoch,
        "seq": seq,
    }


def events_msg(ch: str, epoch: str, seqs: list[int]) -> dict[str, Any]:
    return {
        "type": "events",
        "ch": ch,
        "epoch": epoch,
        "events": [trade(ch, epoch, s) for s in seqs],
    }


@dataclass
class InvariantChecker:
    """What the application sees must keep protocol v1's invariant."""

    # channel → (epoch or None if unknown yet, last seq covered or None)
    state: dict[str, tuple[str | None, int | None]] = field(default_factory=dict)
    delivered: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    gaps: list[Gap] = field(default_factory=list)
    # channel → what was delivered, in order: Reset, Gap, or (epoch, seq) of an event
    timeline: dict[str, list[Reset | Gap | tuple[str, int]]] = field(default_factory=dict)

    def feed(self, messages: list[Message]) -> None:
        for m in messages:
            if isinstance(m, Reset):
                self.state[m.channel] = (m.epoch, None)
                self.timeline.setdefault(m.channel, []).append(m)
            elif isinstance(m, Gap):
                assert m.from_seq <= m.to_seq
                epoch, last = self.state.get(m.channel, (None, None))
                if last is not None:
                    assert m.from_seq == last + 1, f"{m} does not start after {last}"
                self.state[m.channel] = (epoch, m.to_seq)
                self.gaps.append(m)
                self.timeline.setdefault(m.channel, []).append(m)
            elif isinstance(m, EventBatch):
                for e in m.events:
                    assert e.channel_name == m.channel
                    epoch, last = self.state.get(m.channel, (None, None))
                    if epoch is not None:
                        assert e.epoch == epoch, f"epoch {epoch} → {e.epoch} without a Reset"
                    if last is not None:
                        assert e.seq == last + 1, f"{m.channel}: {e.seq} after {last}"
                    self.state[m.channel] = (e.epoch, e.seq)
                    self.delivered.setdefault(m.channel, []).append((e.epoch, e.seq))
                    self.timeline.setdefault(m.channel, []).append((e.epoch, e.seq))

    def current_segment(self, channel: str, epoch: str) -> list[Gap | tuple[str, int]] | None:
        """What was delivered of `epoch` since the session entered it (None if it never did)."""
        items = self.timeline.get(channel, [])
        resets = [i for i, x in enumerate(items) if isinstance(x, Reset)]
        if resets:
            last = items[resets[-1]]
            assert isinstance(last, Reset)
            if last.epoch != epoch:
                return None
            items = items[resets[-1] + 1 :]
        elif not any(isinstance(x, tuple) and x[0] == epoch for x in items):
            return None
        return [x for x in items if not isinstance(x, Reset)]


# --- 1. arbitrary server behaviour ------------------------------------------------------------

channel_st = st.sampled_from(CHANNELS)
epoch_st = st.sampled_from(["A", "B", "C"])
seq_st = st.integers(1, 30)
op_st = st.one_of(
    st.tuples(st.just("events"), channel_st, epoch_st, seq_st, st.integers(1, 6)),
    st.tuples(st.just("gap"), channel_st, seq_st, st.integers(0, 5)),
    st.tuples(st.just("reset"), channel_st, epoch_st),
    st.tuples(st.just("heartbeat"), channel_st, seq_st),
    st.tuples(st.just("reconnect")),
)


@settings(max_examples=400, deadline=None)
@given(
    ops=st.lists(op_st, max_size=60),
    batch=st.integers(1, 4),
    attempts=st.integers(0, 3),
)
def test_delivered_stream_keeps_the_invariant_whatever_the_server_sends(
    ops: list[tuple[Any, ...]], batch: int, attempts: int
) -> None:
    session = ClientSession(max_resume_attempts=attempts)
    session.connection_made()
    session.subscribe(["trades:*"])
    checker = InvariantChecker()
    pending: list[dict[str, Any]] = []

    def flush() -> None:
        if pending:
            checker.feed(session.receive(orjson.dumps(pending), now_ns=0))
            pending.clear()

    for op in ops:
        if op[0] == "events":
            _, ch, epoch, start, n = op
            pending.append(events_msg(ch, epoch, list(range(start, start + n))))
        elif op[0] == "gap":
            _, ch, start, extra = op
            pending.append(
                {"type": "gap", "ch": ch, "from_seq": start, "to_seq": start + extra, "reason": "x"}
            )
        elif op[0] == "reset":
            pending.append({"type": "reset", "ch": op[1], "epoch": op[2]})
        elif op[0] == "heartbeat":
            pending.append({"type": "heartbeat", "ts": 0, "last": {op[1]: op[2]}})
        else:
            flush()
            session.connection_lost()
            session.connection_made()
        if len(pending) >= batch:
            flush()
    flush()
    # Positions are what was delivered last.
    for ch, pos in session.positions.items():
        if ch in checker.state:
            assert checker.state[ch][1] in (pos.seq, None)


# --- 2. a faithful server, an unreliable network ---------------------------------------------


@dataclass
class Stream:
    """One channel's Redis stream: epoch, retained window, everything ever appended."""

    epoch: str
    last: int = 0
    first_retained: int = 1
    log: set[tuple[str, int]] = field(default_factory=set)
    trimmed: set[tuple[str, int]] = field(default_factory=set)

    def append(self, n: int) -> None:
        for _ in range(n):
            self.last += 1
            self.log.add((self.epoch, self.last))

    def trim(self, keep: int) -> None:
        new_first = max(self.first_retained, self.last - keep + 1)
        for s in range(self.first_retained, new_first):
            self.trimmed.add((self.epoch, s))
        self.first_retained = new_first


class ServerModel:
    """Protocol v1 as the server keeps it: resume from Redis, gap for trimmed, reset for epochs."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.streams: dict[str, Stream] = {}
        self.epochs = 0
        # Per connection: the position sent so far per channel.
        self.cursor: dict[str, tuple[str, int]] = {}

    def new_epoch(self) -> str:
        self.epochs += 1
        return f"E{self.epochs}"

    def stream(self, ch: str) -> Stream:
        if ch not in self.streams:
            self.streams[ch] = Stream(self.new_epoch())
            # A channel appearing under a wildcard is followed from its start.
            self.cursor[ch] = (self.streams[ch].epoch, 0)
        return self.streams[ch]

    def delete(self, ch: str) -> None:
        old = self.stream(ch)
        self.streams[ch] = Stream(self.new_epoch(), log=old.log, trimmed=old.trimmed)

    def connect(self, requests: list[Request]) -> None:
        resume: dict[str, Position] = {}
        for r in requests:
            # What the server reads is the frame.
            for ch, pos in orjson.loads(r.frame).get("resume", {}).items():
                resume[ch] = Position(pos["epoch"], pos["seq"])
        self.cursor = {}
        for ch, s in self.streams.items():
            pos = resume.get(ch)
            if pos is None:
                self.cursor[ch] = (s.epoch, s.last)  # live from now
            elif pos.epoch == s.epoch and pos.seq <= s.last:
                self.cursor[ch] = (pos.epoch, pos.seq)
            else:
                self.cursor[ch] = (pos.epoch, -1)  # a reset comes first

    def produce(self, ch: str, n: int, resend: int) -> list[dict[str, Any]]:
        """The next messages for `ch`: reset/gap as needed, then up to n events (some resent)."""
        s = self.stream(ch)
        out: list[dict[str, Any]] = []
        epoch, sent = self.cursor[ch]
        if epoch != s.epoch or sent < 0:
            out.append({"type": "reset", "ch": ch, "epoch": s.epoch})
            epoch, sent = s.epoch, 0
        if sent + 1 < s.first_retained:
            out.append(
                {
                    "type": "gap",
                    "ch": ch,
                    "from_seq": sent + 1,
                    "to_seq": s.first_retained - 1,
                    "reason": "trimmed",
                }
            )
            sent = s.first_retained - 1
        start = max(s.first_retained, sent + 1 - resend)
        end = min(s.last, sent + n)
        if end >= start:
            seqs = list(range(start, end + 1))
            while seqs:
                k = self.rng.randint(1, len(seqs))
                out.append(events_msg(ch, epoch, seqs[:k]))
                seqs = seqs[k:]
            sent = max(sent, end)
        self.cursor[ch] = (epoch, sent)
        return out

    def skip(self, ch: str, n: int) -> None:
        """A server bug: advance without sending."""
        s = self.stream(ch)
        epoch, sent = self.cursor[ch]
        if epoch == s.epoch and sent >= 0:
            self.cursor[ch] = (epoch, min(s.last, sent + n))

    def heartbeat(self) -> dict[str, Any]:
        last = {ch: seq for ch, (epoch, seq) in self.cursor.items() if seq > 0}
        return {"type": "heartbeat", "ts": 0, "last": last}


server_op_st = st.one_of(
    st.tuples(st.just("append"), channel_st, st.integers(1, 8)),
    st.tuples(st.just("deliver"), channel_st, st.integers(1, 10), st.integers(0, 4), st.booleans()),
    st.tuples(st.just("trim"), channel_st, st.integers(0, 5)),
    st.tuples(st.just("delete"), channel_st),
    st.tuples(st.just("skip"), channel_st, st.integers(1, 3)),
    st.tuples(st.just("heartbeat")),
    st.tuples(st.just("drop")),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(server_op_st, max_size=50), seed=st.integers(0, 2**32 - 1))
def test_resume_delivers_everything_exactly_once_against_a_faithful_server(
    ops: list[tuple[Any, ...]], seed: int
) -> None:
    rng = random.Random(seed)
    server = ServerModel(rng)
    # Holes the server leaves are always filled by resuming here: never give up on them.
    session = ClientSession(max_resume_attempts=10**6)
    session.connection_made()
    session.subscribe(["trades:*"])
    checker = InvariantChecker()

    def send(messages: list[dict[str, Any]]) -> bool:
        """Deliver messages in random frames; True when the session asked for a resume."""
        while messages:
            k = rng.randint(1, len(messages))
            data = orjson.dumps(messages[:k] if k > 1 or rng.random() < 0.5 else messages[0])
            messages = messages[k:]
            out = session.receive(data, now_ns=0)
            checker.feed(out)
            if any(isinstance(m, ResumeNeeded) for m in out):
                return True
        return False

    def reconnect() -> None:
        session.connection_lost()
        server.connect(session.connection_made())

    for op in ops:
        kind = op[0]
        if kind == "append":
            server.stream(op[1]).append(op[2])
        elif kind == "trim":
            server.stream(op[1]).trim(op[2])
        elif kind == "delete":
            server.delete(op[1])
        elif kind == "skip":
            server.skip(op[1], op[2])
        elif kind == "heartbeat":
            if send([server.heartbeat()]):
                reconnect()
        elif kind == "drop":
            reconnect()
        else:
            _, ch, n, resend, cut = op
            messages = server.produce(ch, n, resend)
            if cut and messages:
                # The connection dies with the last frames in flight.
                messages = messages[: rng.randint(0, len(messages) - 1)]
                send(messages)
                reconnect()
            elif send(messages):
                reconnect()

    # Drain: reconnect and deliver everything, as the wrapper would keep doing.
    reconnect()
    for _ in range(10):
        resume = False
        for ch in list(server.streams):
            resume = send(server.produce(ch, 10**6, 0)) or resume
        resume = resume or send([server.heartbeat()])
        if not resume:
            break
        reconnect()
    else:
        raise AssertionError("the session kept asking for resumes")

    assert not any(g.reason == "unrecovered" for g in checker.gaps)
    for ch, stream in server.streams.items():
        delivered = checker.delivered.get(ch, [])
        assert len(delivered) == len(set(delivered)), "an event was delivered twice"
        assert set(delivered) <= stream.log, "an event the server never had"
        epoch: str | None = None
        for item in checker.timeline.get(ch, []):
            if isinstance(item, Reset):
                epoch = item.epoch
            elif isinstance(item, tuple):
                epoch = item[0]
            elif item.reason == "trimmed" and epoch is not None:
                # A trimmed gap covers only events Redis no longer held.
                missing = {(epoch, q) for q in range(item.from_seq, item.to_seq + 1)}
                assert missing <= stream.trimmed, f"{item} covers events still in Redis"
        # From where the session entered the current epoch, nothing of it is missing.
        segment = checker.current_segment(ch, stream.epoch)
        if segment is None:
            continue
        covered: set[int] = set()
        for x in segment:
            if isinstance(x, Gap):
                covered.update(range(x.from_seq, x.to_seq + 1))
            else:
                covered.add(x[1])
        first = min(covered, default=stream.last + 1)
        assert covered == set(range(first, stream.last + 1)), f"{ch}: hole in {stream.epoch}"
        assert session.positions[ch] == Position(stream.epoch, stream.last)
