"""Who may open a WebSocket: origin allowlist, connection caps and handshake credentials.

Sans-I/O: `Admission.admit(headers, path, peer, now)` answers `Admitted` (a connection slot is
taken: give it back with `release(ip)` when the connection is gone) or `Refused` (the HTTP status
to answer with). Checks run cheapest first: origin (403), total cap (503), per-IP cap (429),
then the token in an `Authorization: Bearer` header or a `token` query parameter (401).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

from tickwire.core.config import ServerConfig
from tickwire.core.errors import AuthError
from tickwire.server.auth import Authenticator, Grant


@dataclass(frozen=True, slots=True)
class Admitted:
    ip: str
    #: The grant of a valid handshake token; None when auth is off or the token comes later.
    grant: Grant | None


@dataclass(frozen=True, slots=True)
class Refused:
    status: HTTPStatus
    #: Short, for the response body, logs and the `reason` label of the metric; never a secret.
    reason: str
    headers: tuple[tuple[str, str], ...] = ()


class Admission:
    def __init__(self, config: ServerConfig, authenticator: Authenticator | None) -> None:
        self.config = config
        self.authenticator = authenticator
        self._origins = frozenset(config.allowed_origins)
        #: Connection slots taken, in total and per client IP (handshakes in flight included).
        self.open = 0
        self.per_ip: dict[str, int] = {}

    def admit(
        self, headers: Mapping[str, str], path: str, peer: str, now: float
    ) -> Admitted | Refused:
        cfg = self.config
        origin = headers.get("Origin")
        if origin is None:
            if not cfg.allow_missing_origin:
                return Refused(HTTPStatus.FORBIDDEN, "origin required")
        elif self._origins and origin not in self._origins:
            return Refused(HTTPStatus.FORBIDDEN, "origin not allowed")
        if cfg.max_connections and self.open >= cfg.max_connections:
            return Refused(
                HTTPStatus.SERVICE_UNAVAILABLE, "server at connection capacity", _RETRY_AFTER
            )
        ip = client_ip(peer, headers, cfg.client_ip_header)
        if cfg.max_connections_per_ip and self.per_ip.get(ip, 0) >= cfg.max_connections_per_ip:
            return Refused(HTTPStatus.TOO_MANY_REQUESTS, "too many connections", _RETRY_AFTER)
        grant: Grant | None = None
        if self.authenticator is not None:
            token = handshake_token(headers, path)
            if token is not None:
                try:
                    grant = self.authenticator.authenticate(token, now)
                except AuthError as exc:
                    return Refused(
                        HTTPStatus.UNAUTHORIZED,
                        str(exc),
                        (("WWW-Authenticate", 'Bearer realm="tickwire", error="invalid_token"'),),
                    )
        self.open += 1
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        return Admitted(ip, grant)

    def release(self, ip: str) -> None:
        self.open -= 1
        left = self.per_ip.get(ip, 0) - 1
        if left > 0:
            self.per_ip[ip] = left
        else:
            self.per_ip.pop(ip, None)


_RETRY_AFTER = (("Retry-After", "5"),)


def handshake_token(headers: Mapping[str, str], path: str) -> str | None:
    """The bearer token of an upgrade request: the Authorization header, else `?token=`."""
    auth = headers.get("Authorization")
    if auth is not None:
        scheme, _, value = auth.strip().partition(" ")
        if scheme.lower() == "bearer":
            return value.strip()
    query = urlsplit(path).query
    if query:
        try:
            values = parse_qs(query, max_num_fields=16).get("token")
        except ValueError:  # more fields than anyone needs
            return None
        if values:
            return values[0]
    return None


def client_ip(peer: str, headers: Mapping[str, str], header: str) -> str:
    """The client's IP: the socket peer, or the header a trusted proxy sets (its last entry)."""
    if header:
        value = headers.get(header)
        if value:
            last = value.rsplit(",", 1)[-1].strip()
            if last:
                return last
    return peer
