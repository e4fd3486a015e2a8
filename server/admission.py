"""Who may open a WebSocket: origin policy, connection caps and handshake credentials.

Sans-I/O: `Admission.admit(headers, path, peer, now, client_certificate)` answers `Admitted`
(connection slots are taken: give them back with `release(slot)` when the connection is gone) or
`Refused` (the HTTP status to answer with). Checks run cheapest first: repeated headers (400),
origin (403), total cap (503), per-IP cap (429), the token in an `Authorization: Bearer` header
or a `token` query parameter, else the client certificate (revoked, or its common name not
granted: 401), per-credential cap (429). A credential presented later (`{"op":"auth"}`) takes
its slot with `claim(slot, grant)`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

from websockets.datastructures import Headers

from tickwire.core.config import ANY_ORIGIN, ServerConfig
from tickwire.core.errors import AuthError
from tickwire.server.auth import Authenticator, ClientCertificate, Grant

#: The refusal of a credential over `max_connections_per_credential`.
CREDENTIAL_CAP_REASON = "too many connections for this credential"


@dataclass(slots=True)
class Slot:
    """What one connection counts against: its client IP's group and, once known, its
    credential. Mutable: a token refresh may move the connection to another credential."""

    ip: str
    #: The key counted per IP (the IPv6 /64), None for a loopback client (not counted).
    group: str | None
    credential: str | None = None
    released: bool = False


@dataclass(frozen=True, slots=True)
class Admitted:
    slot: Slot
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
        # Headers whose value decides admission: two of them would leave the choice of which
        # one counts to whoever reads them (and websockets raises on a lookup).
        self._single_headers = tuple(
            dict.fromkeys(
                name
                for name in ("Host", "Origin", "Authorization", config.client_ip_header)
                if name
            )
        )
        #: Connection slots taken, in total, per client IP group and per credential (handshakes
        #: in flight included).
        self.open = 0
        self.per_ip: dict[str, int] = {}
        self.per_credential: dict[str, int] = {}

    def admit(
        self,
        headers: Headers,
        path: str,
        peer: str,
        now: float,
        client_certificate: ClientCertificate | None = None,
    ) -> Admitted | Refused:
        """`client_certificate`: the one the TLS layer verified, if any; a token in the
        handshake is taken before it."""
        cfg = self.config
        for name in self._single_headers:
            if len(headers.get_all(name)) > 1:
                return Refused(HTTPStatus.BAD_REQUEST, f"more than one {name} header")
        origin = headers.get("Origin")
        if origin is None:
            if not cfg.allow_missing_origin:
                return Refused(HTTPStatus.FORBIDDEN, "origin required")
        elif not self._origin_allowed(origin, headers.get("Host")):
            return Refused(HTTPStatus.FORBIDDEN, "origin not allowed")
        if cfg.max_connections and self.open >= cfg.max_connections:
            return Refused(
                HTTPStatus.SERVICE_UNAVAILABLE, "server at connection capacity", _RETRY_AFTER
            )
        ip = client_ip(peer, headers, cfg.client_ip_header)
        group = ip_group(ip)
        cap = cfg.max_connections_per_ip
        if cap and group is not None and self.per_ip.get(group, 0) >= cap:
            return Refused(HTTPStatus.TOO_MANY_REQUESTS, "too many connections", _RETRY_AFTER)
        grant: Grant | None = None
        if self.authenticator is not None:
            token = handshake_token(headers, path)
            try:
                if token is not None:
                    grant = self.authenticator.authenticate(token, now)
                elif client_certificate is not None:
                    grant = self.authenticator.authenticate_certificate(client_certificate)
            except AuthError as exc:
                return Refused(
                    HTTPStatus.UNAUTHORIZED,
                    str(exc),
                    (("WWW-Authenticate", 'Bearer realm="tickwire", error="invalid_token"'),),
                )
            if grant is not None and self._credential_full(grant.credential):
                return Refused(HTTPStatus.TOO_MANY_REQUESTS, CREDENTIAL_CAP_REASON, _RETRY_AFTER)
        slot = Slot(ip, group)
        self.open += 1
        if group is not None:
            self.per_ip[group] = self.per_ip.get(group, 0) + 1
        if grant is not None:
            self._take_credential(slot, grant.credential)
        return Admitted(slot, grant)

    def claim(self, slot: Slot, grant: Grant) -> str | None:
        """Count `slot`'s connection against `grant`'s credential (an `auth` message, first or a
        refresh); the reason when that credential is at its cap (the slot stays as it was)."""
        if slot.released or grant.credential == slot.credential:
            return None
        if self._credential_full(grant.credential):
            return CREDENTIAL_CAP_REASON
        self._drop_credential(slot)
        self._take_credential(slot, grant.credential)
        return None

    def release(self, slot: Slot) -> None:
        if slot.released:
            return
        slot.released = True
        self.open -= 1
        if slot.group is not None:
            _decrement(self.per_ip, slot.group)
        self._drop_credential(slot)

    def _origin_allowed(self, origin: str, host: str | None) -> bool:
        if not self._origins:
            return same_origin(origin, host)
        return ANY_ORIGIN in self._origins or origin in self._origins

    def _credential_full(self, credential: str) -> bool:
        cap = self.config.max_connections_per_credential
        return bool(cap) and self.per_credential.get(credential, 0) >= cap

    def _take_credential(self, slot: Slot, credential: str) -> None:
        slot.credential = credential
        self.per_credential[credential] = self.per_credential.get(credential, 0) + 1

    def _drop_credential(self, slot: Slot) -> None:
        if slot.credential is not None:
            _decrement(self.per_credential, slot.credential)
            slot.credential = None


def _decrement(counts: dict[str, int], key: str) -> None:
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


_RETRY_AFTER = (("Retry-After", "5"),)
_DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}


def same_origin(origin: str, host: str | None) -> bool:
    """Whether the page `origin` (`scheme://host[:port]`) is the server's own, as the request's
    `Host` names it (its port omitted: the origin scheme's default port). An opaque origin
    (`null`: sandboxed frames, local files) is nobody's."""
    if not host:
        return False
    try:
        page = urlsplit(origin)
        server = urlsplit("//" + host)
        default = _DEFAULT_PORTS.get(page.scheme)
        if default is None or not page.hostname or not server.hostname:
            return False
        if page.path or page.query or page.fragment or page.username or server.username:
            return False
        page_port = page.port or default
        server_port = server.port or default
    except ValueError:  # a port that is not a number, or out of range
        return False
    return page.hostname == server.hostname and page_port == server_port


def ip_group(ip: str) -> str | None:
    """The key a client IP is counted under for `max_connections_per_ip`: an IPv4 address
    itself, an IPv6 address's /64 (one subscriber's block: counting single addresses would let
    one client have 2**64 of them), None for loopback (not counted). A value that is not an
    address (a UNIX socket peer, a malformed proxy header) counts as itself."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr.is_loopback:
        return None
    if isinstance(addr, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


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
