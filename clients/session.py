"""Sans-I/O client session of protocol v1: request frames out, typed messages in, exactly once.

No sockets, no event loop, no clock: the caller hands in each server frame with the time it was
received and sends the request frames the session builds. The session remembers, per channel, the
`(epoch, seq)` it has delivered, drops what it already delivered, and on a new connection builds
the subscribe request that resumes every channel from there. The application therefore sees every
event once and in order, or an explicit `Gap` / `Reset` saying what it will not see.

    session = ClientSession()
    for request in session.connection_made():        # nothing yet on the first connection
        send(request.frame)
    send(session.subscribe(["trades:BTC-USD", "quotes:*"], snapshot=True).frame)
    for message in session.receive(frame, now_ns=time.time_ns()):
        match message:
            case EventBatch():
                for item in message:                    # Received(channel, event, latency_ns)
                    print(item.channel, item.event.seq, item.latency_ns)
            case Gap(channel=ch, from_seq=a, to_seq=b, reason=why):
                print(f"{ch}: {a}..{b} lost ({why})")
            case ResumeNeeded():
                reconnect()                              # connection_lost(), then connection_made()

What the session does when the stream it is given is not what protocol v1 promises:
- an event or gap starting after a hole nobody announced: the channel stops delivering on this
  connection and `ResumeNeeded` asks the caller to reconnect, which resumes from the last delivered
  seq. If the same hole is still there after `max_resume_attempts` reconnects, the session announces
  it itself with a `Gap` of reason `unrecovered` and goes on;
- a `heartbeat` whose `last` is above what was delivered: events were lost in between;
  `ResumeNeeded` again;
- events of another epoch without a `reset` first: the session reports a `Reset` itself;
- a gap before any event of its channel: held, and delivered just before the first event if it
  leads up to it (before the first event, nothing was promised, so nothing else needs saying).

A throttled subscription (`subscribe(..., max_hz=4)`) gets quotes and bars whose `events` frame
says how many seqs before it were superseded (`skipped`): that hole is accounted for, not a gap.
It is counted in `stats.skipped` and said by the `EventBatch` (`skipped`); a hole larger than
what the frame skipped is a hole as above.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from tickwire.clients.errors import InvalidFrame, ServerError
from tickwire.clients.messages import (
    ChannelList,
    EventBatch,
    Gap,
    Heartbeat,
    Message,
    Pong,
    Position,
    Reset,
    ResumeNeeded,
    Status,
    Subscribed,
    Unsubscribed,
    Welcome,
)
from tickwire.core.channels import ChannelPattern
from tickwire.core.errors import ChannelError, CodecError
from tickwire.core.events import Event, event_from_dict

log = logging.getLogger("tickwire.clients")

PROTOCOL_VERSION = 1

#: Error codes for which a failed resubscription is retried (by reconnecting) rather than dropped.
RETRYABLE_CODES = frozenset({"rate_limited", "internal"})

#: Reason of a gap the client announces itself (the server left a hole it could not explain).
UNRECOVERED = "unrecovered"

RequestId = int | str


# --- Requests ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    """A request frame to send; `frame` is the JSON text, `id` what the reply echoes."""

    id: int
    op: str
    frame: str
    channels: tuple[str, ...] = ()
    snapshot: bool = False
    resume: Mapping[str, Position] = field(default_factory=dict)
    #: The event fields asked for (`subscribe(fields=…)`); None: whole events.
    fields: tuple[str, ...] | None = None
    #: At most this many frames per second per channel (`subscribe(max_hz=…)`); None: live.
    max_hz: float | None = None
    #: Built by `connection_made()` to restore the subscriptions on a new connection.
    resync: bool = False


# --- The session -------------------------------------------------------------------------------


@dataclass
class SessionStats:
    delivered: int = 0
    duplicates: int = 0
    #: Events dropped because their channel is no longer subscribed or is waiting for a resume.
    discarded: int = 0
    #: Seqs a throttled subscription's frames said they superseded (`skipped`).
    skipped: int = 0


class ClientSession:
    """Client side of protocol v1 for one logical feed, across any number of connections."""

    def __init__(
        self,
        *,
        keep_raw: bool = False,
        max_resume_attempts: int = 3,
        max_request_bytes: int = 16 * 1024,
    ) -> None:
        self.keep_raw = keep_raw
        #: Resume requests are split to stay under the server's `max_message_bytes` (the
        #: welcome's figure once one arrived).
        self.max_request_bytes = max_request_bytes
        self.max_resume_attempts = max_resume_attempts
        self.stats = SessionStats()
        self.welcome: Welcome | None = None
        self._ids = itertools.count(1)
        # Subscriptions the application wants: pattern name → snapshot asked.
        self._subs: dict[str, bool] = {}
        # The fields asked for each projected subscription (pattern name → field names).
        self._fields: dict[str, tuple[str, ...]] = {}
        # The rate asked for each throttled subscription (pattern name → max_hz).
        self._rates: dict[str, float] = {}
        # Delivered position per concrete channel.
        self._positions: dict[str, Position] = {}
        # Channels whose next event may start at any seq (their epoch just changed).
        self._loose: set[str] = set()
        # Consecutive resumes that did not fill a channel's hole.
        self._attempts: dict[str, int] = {}
        # Per connection:
        self._open = False
        self._pending: dict[int, Request] = {}
        self._added: dict[int, tuple[str, ...]] = {}
        self._stalled: set[str] = set()
        # Gaps that came before any event of their channel, held until the first event shows
        # whether they lead up to it (then they are delivered with it) or not (then they say
        # nothing about what the application sees).
        self._floors: dict[str, list[Gap]] = {}

    # -- state ---------------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        """A connection is up (between `connection_made()` and `connection_lost()`)."""
        return self._open

    @property
    def subscriptions(self) -> tuple[str, ...]:
        return tuple(self._subs)

    @property
    def positions(self) -> dict[str, Position]:
        """Last delivered position per channel (a copy)."""
        return dict(self._positions)

    @property
    def resume_needed(self) -> bool:
        """Events were lost on this connection; it should be replaced."""
        return bool(self._stalled)

    def covers(self, channel: str) -> bool:
        """Some current subscription includes the concrete `channel`."""
        if channel in self._subs:
            return True
        kind, _, _ = channel.partition(":")
        return f"{kind}:*" in self._subs

    # -- requests ------------------------------------------------------------------------------

    def subscribe(
        self,
        channels: Iterable[str],
        *,
        snapshot: bool = False,
        fields: Iterable[str] | None = None,
        max_hz: float | None = None,
    ) -> Request:
        """Add subscriptions (ChannelError for a malformed name); send the request's frame.

        With `fields`, their events carry only those type fields (plus `v`, `type`, `sym`,
        `ts`, `pt`, `epoch`, `seq`, and a bar's `interval`); the others decode as None. With
        `max_hz`, each channel sends at most that many frames a second: quotes and bars only
        their latest event (what it superseded is `EventBatch.skipped`, not a gap), trades all
        of them, together. A pattern keeps the fields and rate it was first subscribed with:
        the server refuses other ones.
        The wish is kept even while no connection is up: the next `connection_made()` includes it.
        """
        names = _pattern_names(channels)
        kept = tuple(fields) if fields is not None else None
        added = tuple(n for n in names if n not in self._subs)
        for n in names:
            self._subs[n] = self._subs.get(n, False) or snapshot
        for n in added:
            if kept is not None:
                self._fields[n] = kept
            if max_hz is not None:
                self._rates[n] = max_hz
        req = self._request(
            "subscribe", channels=names, snapshot=snapshot, fields=kept, max_hz=max_hz
        )
        if self._open:
            self._added[req.id] = added
        return req

    def unsubscribe(self, channels: Iterable[str]) -> Request:
        """Remove exactly these subscriptions; their channels' events stop being delivered now."""
        names = _pattern_names(channels)
        for n in names:
            self._subs.pop(n, None)
            self._fields.pop(n, None)
            self._rates.pop(n, None)
        self._forget_uncovered()
        return self._request("unsubscribe", channels=names)

    def ping(self) -> Request:
        return self._request("ping")

    def list_channels(self) -> Request:
        return self._request("list")

    def connection_made(self) -> list[Request]:
        """A new connection is up: the requests that restore every subscription, resuming.

        Every channel delivered so far is resumed from its last seq. A pattern asked with
        `snapshot` gets a snapshot again only if none of its channels was delivered yet (a snapshot
        of a channel being resumed would arrive out of order).
        """
        self._open = True
        if self.welcome is not None:
            limit = self.welcome.limits.get("max_message_bytes")
            if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
                self.max_request_bytes = limit
        self.welcome = None
        self._stalled.clear()
        seen = {ch: p for ch, p in self._positions.items() if self.covers(ch)}
        with_snapshot = [
            n
            for n, snap in self._subs.items()
            if snap and not any(_pattern_covers(n, ch) for ch in seen)
        ]
        plain = [n for n in self._subs if n not in with_snapshot]
        requests: list[Request] = []
        # One request (or run of pages) per distinct set of fields and rate: they go per request.
        for (kept, rate), names in _by_options(plain, self._fields, self._rates).items():
            covered = {
                ch: p for ch, p in seen.items() if any(_pattern_covers(n, ch) for n in names)
            }
            for ch in covered:
                del seen[ch]
            requests += self._resume_requests(names, covered, kept, rate)
        for (kept, rate), names in _by_options(with_snapshot, self._fields, self._rates).items():
            requests.append(
                self._request(
                    "subscribe",
                    channels=tuple(names),
                    snapshot=True,
                    resync=True,
                    fields=kept,
                    max_hz=rate,
                )
            )
        return requests

    def _resume_requests(
        self,
        plain: list[str],
        seen: dict[str, Position],
        fields: tuple[str, ...] | None,
        max_hz: float | None = None,
    ) -> list[Request]:
        """Subscribe requests for `plain` resuming every channel of `seen`, each one under
        `max_request_bytes`: further pages name one pattern covering their channels again
        (already subscribed by then, so they only resume)."""
        budget = self.max_request_bytes - 64
        pages: list[tuple[tuple[str, ...], dict[str, Position]]] = []
        channels: tuple[str, ...] = tuple(plain)
        resume: dict[str, Position] = {}
        size = len(orjson.dumps({"op": "subscribe", "id": 2**53, "channels": list(channels)}))
        for ch, pos in seen.items():
            entry = len(orjson.dumps({ch: {"epoch": pos.epoch, "seq": pos.seq}}))
            if resume and size + entry > budget:
                pages.append((channels, resume))
                cover = next(n for n in plain if _pattern_covers(n, ch))
                channels, resume = (cover,), {}
                size = len(orjson.dumps({"op": "subscribe", "id": 2**53, "channels": [cover]}))
                size += len(b',"resume":{}')
            resume[ch] = pos
            size += entry
        pages.append((channels, resume))
        return [
            self._request(
                "subscribe",
                channels=names,
                resume=page,
                resync=True,
                fields=fields,
                max_hz=max_hz,
            )
            for names, page in pages
        ]

    def connection_lost(self) -> list[Request]:
        """The connection is gone: returns the requests that got no reply on it.

        Subscription changes among them need no resending: the next `connection_made()` carries
        the whole wish. Pings and lists are simply lost.
        """
        lost = list(self._pending.values())
        self._open = False
        self._floors.clear()
        self._pending.clear()
        self._added.clear()
        self._stalled.clear()
        return lost

    def _request(
        self,
        op: str,
        *,
        channels: tuple[str, ...] = (),
        snapshot: bool = False,
        resume: Mapping[str, Position] | None = None,
        resync: bool = False,
        fields: tuple[str, ...] | None = None,
        max_hz: float | None = None,
    ) -> Request:
        rid = next(self._ids)
        doc: dict[str, Any] = {"op": op, "id": rid}
        if channels:
            doc["channels"] = list(channels)
        if snapshot:
            doc["snapshot"] = True
        if resume:
            doc["resume"] = {ch: {"epoch": p.epoch, "seq": p.seq} for ch, p in resume.items()}
        if fields is not None:
            doc["fields"] = list(fields)
        if max_hz is not None:
            doc["max_hz"] = max_hz
        req = Request(
            id=rid,
            op=op,
            frame=orjson.dumps(doc).decode(),
            channels=channels,
            snapshot=snapshot,
            resume=dict(resume or {}),
            fields=fields,
            max_hz=max_hz,
            resync=resync,
        )
        if self._open:
            self._pending[rid] = req
        return req

    def _forget_uncovered(self) -> None:
        for ch in [ch for ch in self._positions if not self.covers(ch)]:
            del self._positions[ch]
            self._loose.discard(ch)
            self._attempts.pop(ch, None)
            self._stalled.discard(ch)
        for ch in [ch for ch in self._floors if not self.covers(ch)]:
            del self._floors[ch]

    # -- server frames -------------------------------------------------------------------------

    def receive(self, data: bytes | str, now_ns: int) -> list[Message]:
        """Consume one server frame received at `now_ns`; return what it means, in order.

        Raises InvalidFrame when the frame is not protocol v1 (the connection should be dropped).
        """
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise InvalidFrame(f"server frame is not JSON: {exc}") from None
        out: list[Message] = []
        for item in doc if isinstance(doc, list) else (doc,):
            if not isinstance(item, dict):
                raise InvalidFrame(f"server message must be an object, got {type(item).__name__}")
            self._handle(item, now_ns, out)
        return out

    def _handle(self, d: dict[str, Any], now_ns: int, out: list[Message]) -> None:
        kind = d.get("type")
        if kind == "events":
            self._on_events(d, now_ns, out)
        elif kind == "gap":
            self._on_gap(d, out)
        elif kind == "reset":
            self._on_reset(d, out)
        elif kind == "heartbeat":
            self._on_heartbeat(d, out)
        elif kind == "status":
            out.append(Status(_str(d, "redis")))
        elif kind == "welcome":
            protocol = _int(d, "protocol")
            if protocol != PROTOCOL_VERSION:
                raise InvalidFrame(
                    f"server speaks protocol {protocol}, this client {PROTOCOL_VERSION}"
                )
            limits = d.get("limits")
            self.welcome = Welcome(
                protocol,
                str(d.get("server", "")),
                _int(d, "heartbeat_ms"),
                limits if isinstance(limits, dict) else {},
            )
            out.append(self.welcome)
        elif kind == "subscribed":
            rid = d.get("id")
            self._reply_to(rid)
            positions = _positions(d)
            for ch, pos in positions.items():
                # A channel with no event delivered yet resumes from here; one with events
                # delivered stands where they left it.
                if ch not in self._positions and self.covers(ch) and ch not in self._floors:
                    self._positions[ch] = pos
            out.append(Subscribed(rid, _str_tuple(d, "channels"), positions))
        elif kind == "unsubscribed":
            rid = d.get("id")
            self._reply_to(rid)
            out.append(Unsubscribed(rid, _str_tuple(d, "channels")))
        elif kind == "pong":
            rid = d.get("id")
            self._reply_to(rid)
            out.append(Pong(rid, _int(d, "ts")))
        elif kind == "channels":
            rid = d.get("id")
            self._reply_to(rid)
            out.append(ChannelList(rid, _str_tuple(d, "channels")))
        elif kind == "error":
            self._on_error(d, out)
        else:
            # Newer servers may send more; a v1 client ignores what it does not know.
            log.debug("ignoring server message of unknown type %r", kind)

    def _reply_to(self, rid: object) -> Request | None:
        if isinstance(rid, int):
            self._added.pop(rid, None)
            return self._pending.pop(rid, None)
        return None

    def _on_error(self, d: dict[str, Any], out: list[Message]) -> None:
        rid = d.get("id")
        code = _str(d, "code")
        message = str(d.get("message", ""))
        added = self._added.get(rid, ()) if isinstance(rid, int) else ()
        req = self._reply_to(rid)
        if req is not None and req.op == "subscribe":
            if req.resync and code in RETRYABLE_CODES:
                # The wish still holds: reconnecting (with backoff) tries again.
                self._stalled.update(req.resume)
                out.append(ResumeNeeded(req.channels, f"resubscribe failed: {code}: {message}"))
                return
            # The server refused the whole request: none of what it asked for is subscribed.
            for n in req.channels if req.resync else added:
                self._subs.pop(n, None)
                self._fields.pop(n, None)
                self._rates.pop(n, None)
            self._forget_uncovered()
        out.append(ServerError(code, message, rid if isinstance(rid, int | str) else None))

    def _on_events(self, d: dict[str, Any], now_ns: int, out: list[Message]) -> None:
        ch = _str(d, "ch")
        docs = d.get("events")
        if not isinstance(docs, list):
            raise InvalidFrame("events message without an events list")
        if ch in self._stalled or not self.covers(ch):
            self.stats.discarded += len(docs)
            return
        conflated = d.get("conflated") is True
        skipped = d.get("skipped", 0)
        if not isinstance(skipped, int) or isinstance(skipped, bool) or skipped < 0:
            raise InvalidFrame(f"{ch}: 'skipped' must be a non-negative integer")
        pos = self._positions.get(ch)
        # A position without an epoch (a `subscribed` ack's for a channel with nothing stored)
        # takes the channel's first events, whatever their epoch and seq.
        loose = ch in self._loose or (pos is not None and not pos.epoch)
        keep_raw = self.keep_raw
        run: list[Event] = []
        delivered = 0
        raws: list[dict[str, Any]] = []
        #: What the next EventBatch says it superseded (the frame's first one only).
        lead = 0

        def flush() -> None:
            nonlocal lead
            if run:
                out.append(
                    EventBatch(
                        ch,
                        run[0].epoch,
                        tuple(run),
                        now_ns,
                        conflated,
                        tuple(raws) if keep_raw else None,
                        lead,
                    )
                )
                lead = 0
                self.stats.delivered += len(run)
                run.clear()
                raws.clear()

        for i, doc in enumerate(docs):
            if not isinstance(doc, dict):
                raise InvalidFrame(f"{ch}: event must be an object")
            seq, epoch = doc.get("seq"), doc.get("epoch")
            if not isinstance(seq, int) or not isinstance(epoch, str):
                raise InvalidFrame(f"{ch}: event without a valid epoch and seq")
            if pos is None and ch in self._floors:
                floor = self._floors.pop(ch)
                if floor[-1].to_seq + 1 == seq:
                    out.extend(floor)
            if pos is not None and pos.epoch and epoch != pos.epoch:
                # Another epoch without a `reset` first: say so ourselves, then take it.
                flush()
                out.append(Reset(ch, epoch))
                loose = True
            elif pos is not None and not loose:
                if i == 0 and skipped and seq > pos.seq + 1:
                    # A throttled channel: the seqs just before the frame's first event were
                    # superseded by it, no more (a larger hole is still one).
                    covered = min(skipped, seq - 1 - pos.seq)
                    if seq - 1 - covered > pos.seq and not self._hole(
                        ch, pos.seq + 1, seq - 1 - covered, out
                    ):
                        self.stats.discarded += len(docs)
                        break
                    lead = covered
                    pos = Position(pos.epoch, seq - 1)
                    self.stats.skipped += lead
                if seq <= pos.seq:
                    self.stats.duplicates += 1
                    continue
                if seq > pos.seq + 1:
                    flush()
                    if not self._hole(ch, pos.seq + 1, seq - 1, out):
                        self.stats.discarded += len(docs) - i
                        break
            try:
                event = event_from_dict(doc)
            except CodecError as exc:
                raise InvalidFrame(f"{ch}: {exc}") from None
            run.append(event)
            delivered += 1
            if keep_raw:
                raws.append(doc)
            pos = Position(epoch, seq)
            loose = False
        flush()
        if pos is not None:
            self._positions[ch] = pos
            if not loose:
                self._loose.discard(ch)
        if delivered and ch not in self._stalled:
            self._attempts.pop(ch, None)

    def _hole(self, ch: str, first: int, last: int, out: list[Message]) -> bool:
        """Seqs first..last are missing with no gap: stall the channel (False) or announce (True)."""
        attempts = self._attempts.get(ch, 0) + 1
        if attempts > self.max_resume_attempts:
            log.warning(
                "%s: seqs %d..%d still missing after %d resumes", ch, first, last, attempts - 1
            )
            self._attempts.pop(ch, None)
            out.append(Gap(ch, first, last, UNRECOVERED))
            return True
        self._attempts[ch] = attempts
        self._stalled.add(ch)
        out.append(ResumeNeeded((ch,), f"{ch}: seqs {first}..{last} missing"))
        return False

    def _on_gap(self, d: dict[str, Any], out: list[Message]) -> None:
        ch = _str(d, "ch")
        a, b = _int(d, "from_seq"), _int(d, "to_seq")
        reason = _str(d, "reason")
        if a > b:
            raise InvalidFrame(f"{ch}: gap {a}..{b} is empty")
        if ch in self._stalled or not self.covers(ch):
            return
        pos = self._positions.get(ch)
        if pos is None:
            floor = self._floors.setdefault(ch, [])
            if floor and floor[-1].to_seq + 1 != a:
                floor.clear()
            floor.append(Gap(ch, a, b, reason))
            return
        if ch not in self._loose:
            if b <= pos.seq:
                return  # announced already
            if a > pos.seq + 1 and not self._hole(ch, pos.seq + 1, a - 1, out):
                return
            a = max(a, pos.seq + 1)
        out.append(Gap(ch, a, b, reason))
        self._positions[ch] = Position(pos.epoch, b)
        self._loose.discard(ch)
        self._attempts.pop(ch, None)

    def _on_reset(self, d: dict[str, Any], out: list[Message]) -> None:
        ch, epoch = _str(d, "ch"), _str(d, "epoch")
        if ch in self._stalled or not self.covers(ch):
            return
        pos = self._positions.get(ch)
        if pos is not None and pos.epoch == epoch:
            return
        out.append(Reset(ch, epoch))
        self._floors.pop(ch, None)
        # Seq 0 of the new epoch: a resume from here asks for all of the epoch's events.
        self._positions[ch] = Position(epoch, 0)
        self._loose.add(ch)
        self._attempts.pop(ch, None)

    def _on_heartbeat(self, d: dict[str, Any], out: list[Message]) -> None:
        last = d.get("last")
        if not isinstance(last, dict):
            last = {}
        out.append(Heartbeat(_int(d, "ts"), last))
        behind = []
        for ch, seq in last.items():
            pos = self._positions.get(ch)
            if (
                pos is not None
                and isinstance(seq, int)
                and seq > pos.seq
                and ch not in self._stalled
                and ch not in self._loose  # after a reset a server may still count the old epoch
                and self.covers(ch)
            ):
                behind.append(ch)
        if behind:
            self._stalled.update(behind)
            out.append(ResumeNeeded(tuple(behind), "heartbeat shows events sent but not delivered"))


def _positions(d: dict[str, Any]) -> dict[str, Position]:
    value = d.get("positions", {})
    if not isinstance(value, dict):
        raise InvalidFrame("subscribed message: 'positions' must be an object")
    out = {}
    for ch, pos in value.items():
        if not isinstance(pos, dict):
            raise InvalidFrame(f"subscribed message: positions[{ch}] must be an object")
        epoch, seq = pos.get("epoch"), pos.get("seq")
        if not isinstance(epoch, str) or not isinstance(seq, int) or isinstance(seq, bool):
            raise InvalidFrame(f"subscribed message: positions[{ch}] needs an epoch and a seq")
        out[ch] = Position(epoch, seq)
    return out


def _pattern_covers(pattern: str, channel: str) -> bool:
    kind, _, symbol = pattern.partition(":")
    ch_kind, _, ch_symbol = channel.partition(":")
    return kind == ch_kind and symbol in ("*", ch_symbol)


def _pattern_names(channels: Iterable[str]) -> tuple[str, ...]:
    if isinstance(channels, str):
        channels = (channels,)
    names = tuple(dict.fromkeys(ChannelPattern.parse(c).name for c in channels))
    if not names:
        raise ChannelError("name at least one channel")
    return names


def _str(d: dict[str, Any], key: str) -> str:
    value = d.get(key)
    if not isinstance(value, str):
        raise InvalidFrame(f"{d.get('type')} message: {key!r} must be a string")
    return value


def _int(d: dict[str, Any], key: str) -> int:
    value = d.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidFrame(f"{d.get('type')} message: {key!r} must be an integer")
    return value


def _str_tuple(d: dict[str, Any], key: str) -> tuple[str, ...]:
    value = d.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidFrame(f"{d.get('type')} message: {key!r} must be a list of strings")
    return tuple(value)


def _by_options(
    names: list[str], fields: Mapping[str, tuple[str, ...]], rates: Mapping[str, float]
) -> dict[tuple[tuple[str, ...] | None, float | None], list[str]]:
    """`names` grouped by the fields (None: whole events) and rate (None: live) they were
    subscribed with."""
    out: dict[tuple[tuple[str, ...] | None, float | None], list[str]] = {}
    for n in names:
        out.setdefault((fields.get(n), rates.get(n)), []).append(n)
    return out
