"""URLs as messages and logs show them: never with their password."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit


def redact_url(url: str) -> str:
    """`url` with its passwords shown as `***`: the one in `user:password@` and any query
    option whose name ends in `password` (a Sentinel's), for Redis, Sentinel, AMQP, NATS and
    MQTT URLs alike, several hosts included; a string that is no URL comes back as it is."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return url
    if password is not None:
        user, _, hosts = parts.netloc.rpartition("@")
        parts = parts._replace(netloc=f"{user.partition(':')[0]}:***@{hosts}")
    options = parse_qsl(parts.query, keep_blank_values=True)
    if any(name.endswith("password") for name, _ in options):
        starred = [(n, "***" if n.endswith("password") else v) for n, v in options]
        parts = parts._replace(query=urlencode(starred, safe="*"))
    elif password is None:
        return url
    return urlunsplit(parts)
