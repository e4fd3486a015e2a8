"""Protocol v1 request handling for one connection, sans-I/O: frames in, requests or replies out.

`ClientSession.receive(data, now)` validates one client frame and returns what to do: a typed
request for the connection layer (`Subscribe`, `Unsubscribe`, `ListChannels`, `Authenticated`),
a reply to send (`Reply`), a refusal (`Rejected`, an `error` message), or `Close`. It never raises
for anything a client sends. The messages themselves are built in `tickwire.server.messages`.

With an authenticator and no grant yet, the session is waiting for `{"op":"auth"}`: anything else
closes with 4001. Once it has a grant, subscriptions must lie inside the grant's entitlements.
An `auth` grant is taken only if `claim` agrees (the per-credential connection cap): else the
first `auth` closes with 1013 and a refresh gets `forbidden`.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from tickwire.core.channels import Channel, ChannelPattern
from tickwire.core.config import Limits
from tickwire.core.errors import AuthError, ChannelError, ProtocolError, UnknownChannelType
from tickwire.core.stream import StreamPosition
from tickwire.server.auth import Authenticator, Grant
from tickwire.server.messages import RequestId, error_message, reply
from tickwire.server.projection import Fields, parse_fields
from tickwire.server.throttle import Rate, parse_max_hz

log = logging.getLogger("tickwire.server.session")


@dataclass(frozen=True, slots=True)
class Subscribe:
    id: RequestId
    added: tuple[ChannelPattern, ...]
    snapshot: bool
    resume: Mapping[Channel, StreamPosition]
    all_channels: tuple[str, ...]
    #: The keys the events of `added` keep (`tickwire.server.projection`); None: all.
    fields: Fields = None
    #: At most this many frames per second per channel of `added` (`tickwire.server.throttle`);
    #: None: live.
    max_hz: Rate = None


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    id: RequestId
    removed: tuple[ChannelPattern, ...]
    all_channels: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ListChannels:
    id: RequestId


@dataclass(frozen=True, slots=True)
class Authenticated:
    """An `auth` request succeeded (the first one, or a refresh): `reply` goes to the client."""

    id: RequestId
    grant: Grant
    reply: bytes


@dataclass(frozen=True, slots=True)
class Close:
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class Reply:
    """A reply to send as it is (`pong`)."""

    message: bytes


@dataclass(frozen=True, slots=True)
class Rejected:
    """The request was refused: `message` is the `error` to send, `code` its code."""

    code: str
    message: bytes


def rejected(code: str, message: str, request_id: RequestId = None) -> Rejected:
    return Rejected(code, error_message(code, message, request_id))


Action = Subscribe | Unsubscribe | ListChannels | Authenticated | Close | Reply | Rejected


class FromNow:
    """A catch-up target that wants no snapshot and no resume: the events published from now
    on. It matters for a channel the follower does not follow yet: the follower starts it where
    Redis stands when it gets round to it, and what was published in between is replayed."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "FROM_NOW"


FROM_NOW = FromNow()
#: Where a channel's catch-up starts: after a resume position, at the latest event (None: a
#: snapshot), or `FROM_NOW`.
Target = StreamPosition | None | FromNow


@dataclass(slots=True)
class SubscribePlan:
    """What a `Subscribe` takes: channels to catch up from history (`targets`), channels live at
    once from the follower's position (`placed`, which the ack reports), and snapshot wildcards to
    expand once the registry is read."""

    targets: dict[Channel, Target]
    placed: dict[Channel, StreamPosition]
    wildcards: list[ChannelPattern]


def plan_subscribe(
    req: Subscribe,
    matching: Callable[[ChannelPattern], list[Channel]],
    started: Container[Channel],
    following: Callable[[Channel], StreamPosition | None],
    redis_up: bool,
) -> SubscribePlan:
    """Decide where each channel of `req` starts for this connection.

    `matching`: the channels of a pattern known now; `started`: channels the connection already
    has a position on (they go on as they are); `following`: the follower's position of a channel.
    """
    targets: dict[Channel, Target] = dict(req.resume)
    placed: dict[Channel, StreamPosition] = {}
    for pattern in req.added:
        for channel in matching(pattern):
            if channel in targets or channel in started:
                continue
            if req.snapshot:
                targets[channel] = None
            elif (position := following(channel)) is not None:
                # Live from the follower's next dispatch on: the client stands where it does.
                placed[channel] = position
            elif redis_up:
                # What is published after the ack and before the follower gets to the channel
                # comes from history.
                targets[channel] = FROM_NOW
    # Snapshot wildcards: the registry may know channels the last poll has not brought in.
    wildcards = [p for p in req.added if p.is_wildcard] if req.snapshot else []
    return SubscribePlan(targets, placed, wildcards)


#: The server failed (RFC 6455); used when that happens before the client is authenticated.
INTERNAL_ERROR = 1011
#: Close codes of the auth layer (4000-4999 are the application's).
UNAUTHORIZED = 4001
FORBIDDEN = 4003
#: RFC 6455 "Try Again Later": the credential of a first `auth` is at its connection cap.
TRY_AGAIN_LATER = 1013


@dataclass
class ClientSession:
    limits: Limits
    #: Set when the server requires credentials; `grant` then says what this client may read.
    authenticator: Authenticator | None = None
    grant: Grant | None = None
    #: Asked before a grant from an `auth` message is taken: None to go ahead, else why not
    #: (the connection layer's per-credential cap).
    claim: Callable[[Grant], str | None] | None = None
    subscriptions: dict[str, ChannelPattern] = field(default_factory=dict)
    #: The kept keys of each projected subscription (by name).
    projections: dict[str, frozenset[str]] = field(default_factory=dict)
    #: The `max_hz` of each throttled subscription (by name).
    rates: dict[str, float] = field(default_factory=dict)
    _tokens: float = field(init=False)
    _refilled_at: float | None = field(default=None, init=False)
    #: When the latest refused requests came (at most `rate_violations_before_close`; made at
    #: the first refusal, as most clients never get one).
    _violations: deque[float] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self._tokens = float(self.limits.rate_burst)

    @property
    def awaiting_auth(self) -> bool:
        return self.authenticator is not None and self.grant is None

    def receive(self, data: bytes | str, now: float, now_ns: int = 0) -> Action:
        """Handle one client frame received at monotonic time `now`."""
        if not self._take_token(now):
            if self._persistent_violation(now):
                return Close(1008, "rate limit exceeded")
            return rejected("rate_limited", "too many requests; slow down")
        size = len(data.encode() if isinstance(data, str) else data)
        if size > self.limits.max_message_bytes:
            return rejected(
                "too_large", f"request of {size} bytes exceeds {self.limits.max_message_bytes}"
            )
        request_id: RequestId = None
        try:
            try:
                doc = orjson.loads(data)
            except orjson.JSONDecodeError as exc:
                raise ProtocolError("bad_request", f"not valid JSON: {exc}") from None
            if not isinstance(doc, dict):
                raise ProtocolError("bad_request", "a request must be a JSON object")
            request_id = _request_id(doc.get("id"))
            op = doc.get("op")
            if not isinstance(op, str):
                raise ProtocolError("bad_request", "missing 'op'")
            if op == "auth":
                return self._auth(request_id, doc, now_ns)
            if self.awaiting_auth:
                return Close(UNAUTHORIZED, "unauthorized")
            if op == "subscribe":
                return self._subscribe(request_id, doc)
            if op == "unsubscribe":
                return self._unsubscribe(request_id, doc)
            if op == "ping":
                return Reply(reply("pong", request_id, ts=now_ns))
            if op == "list":
                return ListChannels(request_id)
            raise ProtocolError(
                "unknown_op",
                f"unknown op {op[:40]!r}: use subscribe, unsubscribe, ping, list or auth",
            )
        except ProtocolError as exc:
            if self.awaiting_auth:
                return Close(UNAUTHORIZED, "unauthorized")
            return rejected(exc.code, exc.message, request_id)
        except Exception:
            # A bug of ours, not the client's: this request fails (`internal`, retrying may
            # work) rather than the whole connection with 1011. Before authentication there is
            # no one to answer, and 4001 would wrongly send the client for new credentials.
            log.exception("request failed")
            if self.awaiting_auth:
                return Close(INTERNAL_ERROR, "internal error")
            return rejected("internal", "the server failed on this request", request_id)

    def _auth(self, request_id: RequestId, doc: dict[str, Any], now_ns: int) -> Action:
        if self.authenticator is None:
            raise ProtocolError("bad_request", "this server does not require authentication")
        token = doc.get("token")
        if not isinstance(token, str):
            raise ProtocolError("bad_request", "'token' must be a string")
        try:
            grant = self.authenticator.authenticate(token, now_ns / 1e9)
        except AuthError as exc:
            # While waiting for the first auth this closes the connection (see receive).
            raise ProtocolError("unauthorized", str(exc)) from None
        denied = [n for n, p in self.subscriptions.items() if not grant.allows(p)]
        if denied:
            raise ProtocolError(
                "forbidden", f"the new token does not cover {', '.join(denied[:5])}"
            )
        if self.claim is not None:
            refusal = self.claim(grant)
            if refusal is not None:
                if self.grant is None:
                    return Close(TRY_AGAIN_LATER, refusal)
                raise ProtocolError("forbidden", refusal)
        self.grant = grant
        return Authenticated(
            request_id, grant, reply("authenticated", request_id, entitlements=grant.names)
        )

    def revalidate(self) -> Close | None:
        """Check the grant again after the credentials were reloaded; Close if it no longer
        holds (key removed: 4001, subscriptions no longer covered: 4003)."""
        if self.authenticator is None or self.grant is None:
            return None
        current = self.authenticator.current(self.grant)
        if current is None:
            return Close(UNAUTHORIZED, "credentials revoked")
        if not all(current.allows(p) for p in self.subscriptions.values()):
            return Close(FORBIDDEN, "forbidden")
        self.grant = current
        return None

    def _persistent_violation(self, now: float) -> bool:
        """Count a refused request at `now`; True when `rate_violations_before_close` of them
        came within `rate_violation_window_s` (older ones are forgotten)."""
        limit = self.limits.rate_violations_before_close
        if self._violations is None:
            self._violations = deque(maxlen=max(1, limit))
        self._violations.append(now)
        return (
            len(self._violations) >= limit
            and now - self._violations[0] < self.limits.rate_violation_window_s
        )

    def _take_token(self, now: float) -> bool:
        if self._refilled_at is not None:
            elapsed = max(0.0, now - self._refilled_at)
            self._tokens = min(
                float(self.limits.rate_burst), self._tokens + elapsed * self.limits.rate_per_s
            )
        self._refilled_at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def _subscribe(self, request_id: RequestId, doc: dict[str, Any]) -> Subscribe:
        patterns = _patterns(doc.get("channels"), self.limits.max_subscriptions)
        if self.grant is not None:
            # All of a pattern must be entitled: `quotes:*` with only `quotes:BTC-*` is refused,
            # so no event of a channel outside the grant can ever be queued for this client.
            denied = [p.name for p in patterns if not self.grant.allows(p)]
            if denied:
                raise ProtocolError(
                    "forbidden", f"not entitled to {', '.join(dict.fromkeys(denied[:5]))}"
                )
        snapshot = doc.get("snapshot", False)
        if not isinstance(snapshot, bool):
            raise ProtocolError("bad_request", "'snapshot' must be true or false")
        fields = parse_fields(doc.get("fields"), patterns)
        max_hz = parse_max_hz(doc.get("max_hz"))
        # A pattern's fields and rate are fixed while it is subscribed: one pattern, one set of
        # bytes, one pace.
        for what, kept, asked in (
            ("fields", self.projections, fields),
            ("max_hz", self.rates, max_hz),
        ):
            changed = [
                p.name
                for p in patterns
                if p.name in self.subscriptions and kept.get(p.name) != asked
            ]
            if changed:
                raise ProtocolError(
                    "bad_request",
                    f"{', '.join(dict.fromkeys(changed[:5]))} already subscribed with other"
                    f" {what}: unsubscribe first",
                )
        added = tuple(p for p in dict.fromkeys(patterns) if p.name not in self.subscriptions)
        if len(self.subscriptions) + len(added) > self.limits.max_subscriptions:
            raise ProtocolError(
                "too_many_subscriptions",
                f"at most {self.limits.max_subscriptions} subscriptions per connection",
            )
        covering = [*self.subscriptions.values(), *patterns]
        resume = _resume(doc.get("resume"), covering)
        for p in added:
            self.subscriptions[p.name] = p
            if fields is not None:
                self.projections[p.name] = fields
            if max_hz is not None:
                self.rates[p.name] = max_hz
        return Subscribe(
            request_id, added, snapshot, resume, tuple(self.subscriptions), fields, max_hz
        )

    def _unsubscribe(self, request_id: RequestId, doc: dict[str, Any]) -> Unsubscribe:
        patterns = _patterns(doc.get("channels"), self.limits.max_subscriptions)
        removed = tuple(p for p in dict.fromkeys(patterns) if self.subscriptions.pop(p.name, None))
        for p in removed:
            self.projections.pop(p.name, None)
            self.rates.pop(p.name, None)
        return Unsubscribe(request_id, removed, tuple(self.subscriptions))

    def covers(self, channel: Channel) -> bool:
        return any(p.matches(channel) for p in self.subscriptions.values())


def _request_id(value: Any) -> RequestId:
    if value is None or (
        isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**53
    ):
        return value
    if isinstance(value, str) and len(value) <= 64:
        return value
    raise ProtocolError(
        "bad_request", "'id' must be an integer or a string of at most 64 characters"
    )


def _patterns(value: Any, limit: int) -> list[ChannelPattern]:
    if not isinstance(value, list) or not value:
        raise ProtocolError("bad_request", "'channels' must be a non-empty list of channel names")
    if len(value) > limit:
        raise ProtocolError("too_many_subscriptions", f"at most {limit} channels per request")
    out = []
    for name in value:
        try:
            out.append(ChannelPattern.parse(name))
        except UnknownChannelType as exc:
            raise ProtocolError("unknown_channel", str(exc)) from None
        except ChannelError as exc:
            raise ProtocolError("bad_request", str(exc)) from None
    return out


def _resume(value: Any, covering: list[ChannelPattern]) -> dict[Channel, StreamPosition]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError("bad_request", "'resume' must be an object of channel → {epoch, seq}")
    out: dict[Channel, StreamPosition] = {}
    for name, pos in value.items():
        try:
            channel = Channel.parse(name)
        except UnknownChannelType as exc:
            # The same code as in `channels` (see `_patterns`).
            raise ProtocolError("unknown_channel", f"resume: {exc}") from None
        except ChannelError as exc:
            raise ProtocolError("bad_request", f"resume: {exc}") from None
        if not any(p.matches(channel) for p in covering):
            raise ProtocolError(
                "bad_request", f"resume: {name} is not among the subscribed channels"
            )
        if not isinstance(pos, dict):
            raise ProtocolError(
                "bad_request", f'resume[{name}] must be {{"epoch": str, "seq": int}}'
            )
        epoch, seq = pos.get("epoch"), pos.get("seq")
        if not isinstance(epoch, str) or len(epoch) > 64:
            raise ProtocolError("bad_request", f"resume[{name}].epoch must be a string")
        if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq < 2**63:
            raise ProtocolError("bad_request", f"resume[{name}].seq must be a non-negative integer")
        out[channel] = StreamPosition(epoch, seq)
    return out
