"""Credentials and entitlements: API keys (a file of hashes), JWTs (HS256/RS256), channel grants.

`Authenticator.authenticate(token, now)` turns a bearer token into a `Grant` (who, which channel
patterns, until when) or raises `AuthError`. It does no I/O per call: the key file and the keys
are read at start and by `reload()` (SIGHUP). Tokens are never logged, nor put in an error.

Entitlement patterns (in the key file and in a JWT's channels claim):

    *                   every channel
    trades:*            every symbol of one type
    quotes:BTC-*        the symbols of one type that start with a prefix
    trades:BTC-USD      one channel

A subscription is allowed only when one entitlement covers all of it: `quotes:*` needs `*` or
`quotes:*`; `quotes:BTC-*` does not cover it. So the hub never has to filter per subscriber.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import jwt
import orjson
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from tickwire.core.channels import WILDCARD, Channel, ChannelPattern, validate_symbol, validate_type
from tickwire.core.config import AuthConfig
from tickwire.core.crl import CertificateId, Revocations, certificate_id, load_revocations
from tickwire.core.errors import AuthError, ChannelError, ConfigError

log = logging.getLogger("tickwire.server.auth")

#: Longest token looked at; anything longer is refused unread.
MAX_TOKEN_CHARS = 8192
#: RFC 7518 §3.2: an HS256 key must have at least 256 bits.
MIN_HMAC_SECRET_BYTES = 32
_PREFIX_RE = re.compile(r"^[A-Z0-9][A-Z0-9._/-]{0,30}$")
_HASH_RE = re.compile(r"^sha256:([0-9a-f]{64})$")
#: How the key file names a client certificate: by its subject's common name.
CERT_PREFIX = "cn:"


# -- entitlements --------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Entitlement:
    """One channel pattern a credential may read (see the module docstring for the forms)."""

    kind: str | None  # None: every type
    symbol: str  # the symbol, or its prefix when `prefix` ("" with prefix: every symbol)
    prefix: bool

    @classmethod
    def parse(cls, text: str) -> Entitlement:
        if text == WILDCARD:
            return cls(None, "", True)
        kind, sep, symbol = text.partition(":")
        if not sep or not symbol:
            raise ChannelError(
                f"invalid entitlement {text!r}: use *, <type>:*, <type>:<PREFIX>* or <type>:<SYMBOL>"
            )
        validate_type(kind)
        if symbol == WILDCARD:
            return cls(kind, "", True)
        if symbol.endswith(WILDCARD):
            head = symbol[:-1]
            if not _PREFIX_RE.match(head):
                raise ChannelError(f"invalid entitlement {text!r}: bad symbol prefix {head!r}")
            return cls(kind, head, True)
        return cls(kind, validate_symbol(symbol), False)

    @property
    def name(self) -> str:
        if self.kind is None:
            return WILDCARD
        return f"{self.kind}:{self.symbol}{WILDCARD if self.prefix else ''}"

    def allows_channel(self, channel: Channel) -> bool:
        if self.kind is not None and channel.kind != self.kind:
            return False
        if self.prefix:
            return channel.symbol.startswith(self.symbol)
        return channel.symbol == self.symbol

    def covers(self, pattern: ChannelPattern) -> bool:
        """Whether every channel `pattern` matches, now or later, is allowed."""
        if self.kind is not None and pattern.kind != self.kind:
            return False
        if pattern.is_wildcard:
            return self.prefix and not self.symbol
        if self.prefix:
            return pattern.symbol.startswith(self.symbol)
        return pattern.symbol == self.symbol


def parse_entitlements(items: Iterable[str]) -> tuple[Entitlement, ...]:
    return tuple(dict.fromkeys(Entitlement.parse(item) for item in items))


@dataclass(frozen=True, slots=True)
class ClientCertificate:
    """A certificate a client presented over TLS, verified against the client CA: its
    subject's common name, and itself (DER)."""

    common_name: str
    der: bytes


@dataclass(frozen=True, slots=True)
class Grant:
    """What an authenticated connection is: who (for logs), what it may read, until when."""

    subject: str
    entitlements: tuple[Entitlement, ...]
    #: Unix time (seconds) at which the credential expires (a JWT's `exp`), or None.
    expires_at: float | None = None
    #: The SHA-256 of an API key (not secret), to check the key again after a reload.
    key_id: str | None = None
    #: Who connections are counted under for `max_connections_per_credential`: the API key,
    #: or the JWT's issuer and subject (the token itself when it names no subject).
    credential: str = ""
    #: The client certificate it was given to, with client CRLs configured: checked against
    #: them again at each reload.
    certificate: CertificateId | None = None

    def allows(self, pattern: ChannelPattern) -> bool:
        return any(e.covers(pattern) for e in self.entitlements)

    def allows_channel(self, channel: Channel) -> bool:
        return any(e.allows_channel(channel) for e in self.entitlements)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entitlements]


# -- API keys ------------------------------------------------------------------------------------
def key_id(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class ApiKeys:
    """The key file's contents: SHA-256 of each key (or a client certificate's name) → its grant.

    One key per line, `sha256:<64 hex> <name> <pattern>[,<pattern>...]`; `#` starts a comment.
    Keys must be random (128 bits or more), which is why a plain SHA-256 is enough. A line
    `cn:<common name> <name> <patterns>` grants a client certificate whose subject has that
    common name (`[auth] tls_client_ca_file`: one the server's client CA signed), percent-encoded
    where it holds what the file's syntax takes: a space as %20, `#` as %23, `%` as %25.
    """

    grants: Mapping[str, Grant]

    @classmethod
    def parse(cls, text: str, source: str) -> ApiKeys:
        grants: dict[str, Grant] = {}
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            where = f"{source}:{number}"
            if len(parts) != 3:
                raise ConfigError(
                    f"{where}: expected `sha256:<hex> <name> <pattern>[,<pattern>...]`"
                )
            digest, name, patterns = parts
            if digest.startswith(CERT_PREFIX) and len(digest) > len(CERT_PREFIX):
                try:
                    common_name = unquote(digest[len(CERT_PREFIX) :], errors="strict")
                except UnicodeDecodeError:
                    raise ConfigError(
                        f"{where}: the common name's %-escapes are not UTF-8"
                    ) from None
                ident, credential = CERT_PREFIX + common_name, "cert:" + common_name
            else:
                m = _HASH_RE.match(digest.lower())
                if m is None:
                    raise ConfigError(
                        f"{where}: the key must be written as sha256:<64 hex digits> (or a "
                        "client certificate as cn:<common name>)"
                    )
                ident, credential = m.group(1), "key:" + m.group(1)
            if ident in grants:
                raise ConfigError(f"{where}: the same key appears twice")
            try:
                entitlements = parse_entitlements(p for p in patterns.split(",") if p)
            except ChannelError as exc:
                raise ConfigError(f"{where}: {exc}") from None
            if not entitlements:
                raise ConfigError(f"{where}: a key needs at least one channel pattern")
            grants[ident] = Grant(name, entitlements, key_id=ident, credential=credential)
        return cls(grants)

    @classmethod
    def load(cls, path: str) -> ApiKeys:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read API key file {path}: {exc.strerror}") from None
        return cls.parse(text, path)


# -- JWT -----------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class JwtKeys:
    """Verification keys: an HS256 secret, an RS256 public key, or both (picked by `alg`)."""

    secret: bytes | None
    public_key: RSAPublicKey | None

    @classmethod
    def load(cls, config: AuthConfig, environ: Mapping[str, str]) -> JwtKeys:
        secret: bytes | None = None
        if config.jwt_secret_env:
            value = environ.get(config.jwt_secret_env, "")
            if not value:
                raise ConfigError(f"environment variable {config.jwt_secret_env} is not set")
            secret = value.encode()
        elif config.jwt_secret_file:
            secret = _read(config.jwt_secret_file, "JWT secret file").strip()
        if secret is not None and len(secret) < MIN_HMAC_SECRET_BYTES:
            raise ConfigError(
                f"the JWT secret has {len(secret)} bytes; HS256 needs at least "
                f"{MIN_HMAC_SECRET_BYTES} (e.g. `openssl rand -base64 48`)"
            )
        public_key: RSAPublicKey | None = None
        if config.jwt_public_key_file:
            pem = _read(config.jwt_public_key_file, "JWT public key file")
            try:
                loaded = load_pem_public_key(pem)
            except ValueError:
                raise ConfigError(f"{config.jwt_public_key_file}: not a PEM public key") from None
            if not isinstance(loaded, RSAPublicKey):
                raise ConfigError(f"{config.jwt_public_key_file}: RS256 needs an RSA public key")
            public_key = loaded
        return cls(secret, public_key)

    @property
    def configured(self) -> bool:
        return self.secret is not None or self.public_key is not None


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None


# -- the authenticator ---------------------------------------------------------------------------
class Authenticator:
    """Bearer token → Grant, from the configured API keys and JWT keys."""

    def __init__(
        self,
        config: AuthConfig,
        *,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        if not config.enabled:
            raise ConfigError("no credential source is configured")
        self.config = config
        self._environ = os.environ if environ is None else environ
        self.api_keys, self.jwt_keys, self.revocations = self._load()

    def _load(self) -> tuple[ApiKeys | None, JwtKeys, Revocations | None]:
        cfg = self.config
        api_keys = ApiKeys.load(cfg.api_keys_file) if cfg.api_keys_file else None
        revocations = None
        if cfg.tls_client_crl_file:
            revocations = load_revocations(cfg.tls_client_crl_file, cfg.tls_client_ca_file)
        return api_keys, JwtKeys.load(cfg, self._environ), revocations

    def reload(self) -> None:
        """Read the key file, key files and CRLs again; on any error keep what was loaded
        before."""
        self.api_keys, self.jwt_keys, self.revocations = self._load()
        log.info(
            "credentials reloaded: %d API keys%s",
            len(self.api_keys.grants) if self.api_keys else 0,
            ""
            if self.revocations is None
            else f", {len(self.revocations.revoked)} client certificates revoked",
        )

    def authenticate(self, token: str, now: float) -> Grant:
        """The grant of `token` at Unix time `now`, or AuthError saying why (never the token)."""
        if not token or len(token) > MAX_TOKEN_CHARS:
            raise AuthError("invalid credentials")
        if self.api_keys is not None:
            grant = self.api_keys.grants.get(key_id(token))
            if grant is not None:
                return grant
        if self.jwt_keys.configured and token.count(".") == 2:
            return self._jwt(token, now)
        raise AuthError("invalid credentials")

    def authenticate_certificate(self, certificate: ClientCertificate) -> Grant:
        """The grant of a client certificate (verified by the TLS layer against the client CA),
        or AuthError: revoked by a client CRL, or no `cn:` line of the key file names it.

        Revocation is checked here, not by OpenSSL in the handshake: a handshake that fails
        ends the connection without a word (asyncio's TLS sends no alert), and a client would
        retry for ever; a 401 tells it to stop."""
        revocations, ident = self.revocations, None
        if revocations is not None:
            ident = certificate_id(certificate.der)
            if revocations.revokes(ident):
                raise AuthError("client certificate revoked")
        grant = None
        if self.api_keys is not None:
            grant = self.api_keys.grants.get(CERT_PREFIX + certificate.common_name)
        if grant is None:
            raise AuthError("client certificate not granted any channel")
        return grant if ident is None else replace(grant, certificate=ident)

    def current(self, grant: Grant) -> Grant | None:
        """The grant an API key (or a client certificate) has now, after a reload: None if the
        key or the certificate's line is gone, or the certificate revoked.

        A JWT grant stays as it is: it carries its own entitlements and expiry.
        """
        if grant.key_id is None:
            return grant
        if self.api_keys is None:
            return None
        now = self.api_keys.grants.get(grant.key_id)
        if now is None or grant.certificate is None:
            return now
        if self.revocations is not None and self.revocations.revokes(grant.certificate):
            return None
        return replace(now, certificate=grant.certificate)

    def _jwt(self, token: str, now: float) -> Grant:
        cfg = self.config
        try:
            alg = str(jwt.get_unverified_header(token).get("alg"))
        except jwt.InvalidTokenError:
            raise AuthError("invalid token") from None
        # The key follows from the algorithm, never the other way round (no alg confusion).
        key: bytes | RSAPublicKey | None
        if alg == "HS256":
            key = self.jwt_keys.secret
        elif alg == "RS256":
            key = self.jwt_keys.public_key
        else:
            key = None
        if key is None:
            raise AuthError("invalid token: algorithm not accepted")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=cfg.jwt_audience or None,
                issuer=cfg.jwt_issuer or None,
                # Time claims are checked below against the injected clock.
                options={
                    "require": ["exp"],
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": bool(cfg.jwt_audience),
                    "verify_iss": bool(cfg.jwt_issuer),
                },
            )
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"invalid token: no {exc.claim!r} claim") from None
        except (jwt.InvalidAudienceError, jwt.InvalidIssuerError):
            raise AuthError("invalid token: wrong audience or issuer") from None
        except jwt.InvalidTokenError:
            raise AuthError("invalid token") from None
        leeway = cfg.jwt_leeway_s
        exp = _numeric_date(claims.get("exp"), "exp")
        if now >= exp + leeway:
            raise AuthError("token expired")
        if "nbf" in claims and now + leeway < _numeric_date(claims["nbf"], "nbf"):
            raise AuthError("token not yet valid")
        if "iat" in claims and now + leeway < _numeric_date(claims["iat"], "iat"):
            raise AuthError("token issued in the future")
        raw = claims.get(cfg.jwt_channels_claim, [])
        if isinstance(raw, str):
            raw = raw.replace(",", " ").split()
        if not isinstance(raw, list) or not all(isinstance(p, str) for p in raw):
            raise AuthError(f"invalid token: {cfg.jwt_channels_claim!r} must be a list of patterns")
        try:
            entitlements = parse_entitlements(raw)
        except ChannelError:
            raise AuthError(f"invalid token: bad pattern in {cfg.jwt_channels_claim!r}") from None
        subject = claims.get("sub")
        issuer = claims.get("iss")
        if isinstance(subject, str) and subject:
            # JSON keeps ("a:b", "c") and ("a", "b:c") apart.
            pair = [issuer if isinstance(issuer, str) else "", subject]
            credential = "jwt:" + orjson.dumps(pair).decode()
        else:
            credential = "jwt-token:" + key_id(token)
        return Grant(
            subject if isinstance(subject, str) else "jwt",
            entitlements,
            expires_at=exp + leeway,
            credential=credential,
        )


#: The latest time claim accepted: 9999-12-31T23:59:59Z. Past it a date is no date (and a
#: huge integer would not even convert to a float).
MAX_NUMERIC_DATE = 253_402_300_799


def _numeric_date(value: Any, claim: str) -> float:
    """A JWT time claim as Unix seconds. RFC 7519 NumericDate: a JSON number, fractions allowed;
    refused: anything else (strings, booleans), NaN and the infinities (which would make `exp`
    never come), and numbers before 1970 or after 9999."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AuthError(f"invalid token: {claim!r} must be a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise AuthError(f"invalid token: {claim!r} must be a finite number")
    if not 0 <= value <= MAX_NUMERIC_DATE:
        raise AuthError(f"invalid token: {claim!r} is out of range")
    return float(value)


__all__ = [
    "ApiKeys",
    "Authenticator",
    "Entitlement",
    "Grant",
    "JwtKeys",
    "key_id",
    "parse_entitlements",
]
