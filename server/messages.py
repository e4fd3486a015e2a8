"""Every message the server sends a client, built in one place (the protocol's `Server → client`).

Events are the exception that proves the rule: their frames are spliced from the stored bytes by
`tickwire.server.batch.Batch`, once per batch for every subscriber, from the head built here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from tickwire import __version__
from tickwire.core.channels import Channel
from tickwire.core.config import Limits
from tickwire.core.stream import StreamPosition
from tickwire.server.auth import Grant

PROTOCOL_VERSION = 1
RequestId = int | str | None


def events_head(
    channel: Channel, epoch: str, *, conflated: bool = False, skipped: int = 0
) -> bytes:
    """An `events` message up to its list of events: `{"type":"events","ch":…,"epoch":…,`,
    with `"conflated":true` and `"skipped":N` when they apply."""
    head = b'{"type":"events","ch":"%s","epoch":"%s",' % (channel.name.encode(), epoch.encode())
    if conflated:
        head += b'"conflated":true,'
    if skipped:
        head += b'"skipped":%d,' % skipped
    return head


def error_message(code: str, message: str, request_id: RequestId = None) -> bytes:
    return orjson.dumps({"type": "error", "id": request_id, "code": code, "message": message})


def reply(kind: str, request_id: RequestId, **fields: Any) -> bytes:
    return orjson.dumps({"type": kind, "id": request_id, **fields})


def subscribed_message(
    request_id: RequestId,
    channels: tuple[str, ...],
    positions: Mapping[Channel, StreamPosition],
) -> bytes:
    """The `subscribed` ack: every subscription, and where the client now stands on each
    channel it had no position on (epoch "" and seq 0: no event stored yet)."""
    return orjson.dumps(
        {
            "type": "subscribed",
            "id": request_id,
            "channels": list(channels),
            "positions": {c.name: {"epoch": e, "seq": n} for c, (e, n) in positions.items()},
        }
    )


def welcome_message(
    limits: Limits, heartbeat_ms: int, *, auth_required: bool = False, grant: Grant | None = None
) -> bytes:
    """The first message. With auth on it says `"auth":"required"` (send `auth` now) or
    `"auth":"ok"` plus the entitlements (the handshake carried a valid token)."""
    doc: dict[str, Any] = {
        "type": "welcome",
        "protocol": PROTOCOL_VERSION,
        "server": f"tickwire/{__version__}",
        "heartbeat_ms": heartbeat_ms,
        "limits": {
            "max_message_bytes": limits.max_message_bytes,
            "max_subscriptions": limits.max_subscriptions,
            "rate_per_s": limits.rate_per_s,
            "rate_burst": limits.rate_burst,
            "outbox_bytes": limits.outbox_bytes,
            "slow_grace_s": limits.slow_grace_s,
            "max_resume_events": limits.max_resume_events,
        },
    }
    if grant is not None:
        doc["auth"] = "ok"
        doc["entitlements"] = grant.names
    elif auth_required:
        doc["auth"] = "required"
    return orjson.dumps(doc)


def gap_message(channel: Channel, from_seq: int, to_seq: int, reason: str) -> bytes:
    return orjson.dumps(
        {
            "type": "gap",
            "ch": channel.name,
            "from_seq": from_seq,
            "to_seq": to_seq,
            "reason": reason,
        }
    )


def reset_message(channel: Channel, epoch: str) -> bytes:
    return orjson.dumps({"type": "reset", "ch": channel.name, "epoch": epoch})


def status_message(up: bool) -> bytes:
    return orjson.dumps({"type": "status", "redis": "up" if up else "down"})


def heartbeat_message(ts_ns: int, last: Mapping[Channel, int]) -> bytes:
    return orjson.dumps(
        {"type": "heartbeat", "ts": ts_ns, "last": {c.name: s for c, s in last.items()}}
    )


def notice_message(code: str, close_in_s: float) -> bytes:
    return orjson.dumps({"type": "notice", "code": code, "close_in_ms": round(close_in_s * 1000)})
