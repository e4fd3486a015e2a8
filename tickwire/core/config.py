"""Typed configuration objects, built once at start-up and passed down (no global state)."""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from tickwire.core.channels import CHANNEL_TYPES
from tickwire.core.errors import ConfigError
from tickwire.core.tls import server_context

_T = TypeVar("_T")

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
#: `allowed_origins` entry that lets any web page open /ws.
ANY_ORIGIN = "*"


def redis_url_from_env(default: str = DEFAULT_REDIS_URL) -> str:
    return os.environ.get("REDIS_URL") or default


@dataclass(frozen=True, slots=True)
class RetentionConfig:
    """Approximate stream length kept per channel type (`XADD MAXLEN ~`)."""

    quotes: int = 100_000
    trades: int = 100_000
    bars: int = 10_000

    def __post_init__(self) -> None:
        # MAXLEN 0 empties a stream at every append, and the next append's seq then fails
        # against the stream's last ID for ever.
        for kind in ("quotes", "trades", "bars"):
            n = getattr(self, kind)
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ConfigError(f"retention of {kind}: {n!r} events; keep at least 1")

    def maxlen(self, kind: str) -> int:
        if kind.startswith("bars."):
            return self.bars
        return int(getattr(self, kind))


@dataclass(frozen=True, slots=True)
class PublisherConfig:
    redis_url: str = DEFAULT_REDIS_URL
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    # Events held while Redis is unreachable; past this the oldest are dropped and counted.
    max_pending_events: int = 1_000_000
    # Redis round trip per pipeline: channel batches beyond this go in the next one.
    max_events_per_flush: int = 20_000
    # Flushes written before the oldest is answered, so Redis has the next one while the
    # publisher reads a reply and packs more (feeds/store.py keeps them in order).
    max_in_flight: int = 2
    # One append call per flush needs every key in one place; Redis Cluster refuses a call whose
    # keys span slots, so there make one call per symbol (its streams share a hash tag).
    one_call_per_symbol: bool = False
    backoff_initial_s: float = 0.05
    backoff_max_s: float = 2.0
    # A flush unanswered this long is written again on a new connection (appended once: see
    # feeds/store.py).
    reply_timeout_s: float = 10.0
    # On close, how long to keep trying to write what is still pending.
    close_timeout_s: float = 5.0


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-connection limits the server enforces; sent to clients in `welcome`."""

    max_message_bytes: int = 16 * 1024
    max_subscriptions: int = 1024
    # Inbound requests: token bucket of `rate_burst`, refilled at `rate_per_s`.
    rate_per_s: float = 50.0
    rate_burst: int = 100
    # Refused requests only count for a while: `rate_violations_before_close` of them within
    # `rate_violation_window_s` close the connection (1008); a client that bursts now and then
    # starts afresh each time instead of adding up to a close over hours.
    rate_violations_before_close: int = 20
    rate_violation_window_s: float = 60.0
    # Outbound bytes queued for one client before the slow-consumer policy applies.
    outbox_bytes: int = 1024 * 1024
    # How long a client may stay over the limit before it is closed with 4008.
    slow_grace_s: float = 5.0
    max_resume_events: int = 100_000
    # Live events held back while a connection's channels catch up from history, in bytes for
    # all of them together; past it they are dropped and read again from Redis.
    max_held_bytes: int = 8 * 1024 * 1024
    # Connection lifetime (0 = unlimited): a `notice` goes `lifetime_notice_s` before the
    # close (1001 "max lifetime"), so that clients reconnect and resume at a time they choose.
    max_lifetime_s: float = 0.0
    lifetime_notice_s: float = 10.0


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """Where credentials come from. Authentication is on when any source is set; secrets are
    named here (an environment variable, a file), never written into the configuration."""

    # API keys: one line per key, `sha256:<hex> <name> <pattern>[,<pattern>...]`; re-read on SIGHUP.
    api_keys_file: str = ""
    # JWT HS256: the shared secret from this environment variable or file (at least 32 bytes).
    jwt_secret_env: str = ""
    jwt_secret_file: str = ""
    # JWT RS256: the issuer's public key (PEM); re-read on SIGHUP.
    jwt_public_key_file: str = ""
    # When set, tokens must carry this `aud` / `iss`.
    jwt_audience: str = ""
    jwt_issuer: str = ""
    jwt_leeway_s: float = 0.0
    # The claim holding the token's channel patterns (a list, or one space-separated string).
    jwt_channels_claim: str = "channels"
    # A connection without a token in the handshake must send `{"op":"auth"}` within this time.
    timeout_s: float = 5.0
    # Client certificates as credentials (with `tls_cert_file`): the CA that signs them (PEM).
    # A client may present one; the key file's `cn:<common name>` lines grant it its channels.
    tls_client_ca_file: str = ""
    # Their CAs' revocation lists (PEM): a revoked certificate is refused (401); re-read on
    # SIGHUP, when the connections of certificates revoked since close with 4001.
    tls_client_crl_file: str = ""

    @property
    def enabled(self) -> bool:
        return bool(
            self.api_keys_file
            or self.jwt_secret_env
            or self.jwt_secret_file
            or self.jwt_public_key_file
        )


@dataclass(frozen=True, slots=True)
class ServerConfig:
    redis_url: str = DEFAULT_REDIS_URL
    host: str = "127.0.0.1"
    port: int = 8765
    workers: int = 1
    limits: Limits = field(default_factory=Limits)
    heartbeat_ms: int = 5000
    # Following Redis: live pushes, XREAD COUNT for catching up, PING after this long idle.
    read_count: int = 1000
    read_block_ms: int = 100
    # The server's Redis reads (live catch-up, metas, history, the registry) and the live
    # link's PING: no answer this long means Redis or the link stopped answering (clients are
    # told, and the server reconnects). On a Redis Cluster, a master silent while the others
    # answer is found down sooner (`tickwire.core.redis_cluster.STRAGGLER_S`).
    redis_reply_timeout_s: float = 5.0
    registry_poll_s: float = 0.25
    # Every followed channel's stored seq and epoch compared with what was read once this often,
    # a share at each poll: finds appends nobody pushed (another writer, a hand repair). Pushes
    # and reconnects find everything else at once; a check costs a meta read per channel.
    meta_recheck_s: float = 5.0
    # On-demand bars (`bars.5s:*`): this server records the patterns it has subscribers for in
    # Redis, for `tickwire bars`, and keeps each one wanted this long after its last subscriber
    # here left (then its bar maker stops, if no other server wants it).
    bar_retention_s: float = 60.0
    # After a fan-out that cost more than `fanout_pause_after_ms` of CPU and at least
    # `fanout_pause_busy` of the time since the previous one, the reader waits
    # `fanout_pause_ratio` times as long (at most `fanout_pause_max_ms`) before the next: frames
    # then carry more events each, and a write costs the same whatever it carries. 0: no pause.
    fanout_pause_ratio: float = 1.0
    fanout_pause_after_ms: float = 2.0
    fanout_pause_max_ms: float = 100.0
    fanout_pause_busy: float = 0.5
    # Timeouts
    open_timeout_s: float = 10.0
    ping_interval_s: float = 20.0
    ping_timeout_s: float = 20.0
    close_timeout_s: float = 2.0
    shutdown_timeout_s: float = 4.0
    compression: bool = False
    # The cyclic GC (`tickwire.core.collector`): objects that survived into its oldest generation
    # are frozen out of its walks every `gc_freeze_s` (0: never, CPython's collections as they
    # are), and everything is collected, frozen objects included, every `gc_full_every_s`.
    gc_freeze_s: float = 1.0
    gc_full_every_s: float = 900.0
    # Security. Authentication is off unless a credential source is set; then `public` must say
    # that serving every channel to anyone on a non-loopback address is meant.
    auth: AuthConfig = field(default_factory=AuthConfig)
    public: bool = False
    # Browser `Origin`s allowed to open /ws, exact match. Empty: only pages of the server's own
    # origin (the Origin's host and port are the request's Host); ("*",): any page. Clients that
    # send no Origin (not browsers) are let in unless `allow_missing_origin` is false.
    allowed_origins: tuple[str, ...] = ()
    allow_missing_origin: bool = True
    # Open WebSocket connections in this process (0 = no cap): in total; per client IP (IPv6
    # counted per /64, the block one subscriber usually gets; loopback clients not counted:
    # they are this machine, or a proxy on it whose clients only `client_ip_header` tells
    # apart); per credential (an API key, or a JWT's issuer and subject).
    max_connections: int = 0
    max_connections_per_ip: int = 1000
    max_connections_per_credential: int = 100
    # Behind a proxy: the header carrying the client IP (`X-Forwarded-For`: its last entry,
    # `X-Real-IP`). Set it only when the proxy overwrites that header, or clients can forge it.
    client_ip_header: str = ""
    # TLS served here (`wss://`, `https://`): the PEM certificate chain and its key (empty: in
    # the chain's file). Empty: plain `ws://`, for loopback or behind a TLS-terminating proxy.
    tls_cert_file: str = ""
    tls_key_file: str = ""


def is_loopback(host: str) -> bool:
    """Whether listening on `host` serves this machine only ("" and 0.0.0.0 are every address;
    a name other than localhost may resolve anywhere)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_server_config(
    path: str | None, *, auth: dict[str, Any] | None = None, **overrides: Any
) -> ServerConfig:
    """ServerConfig from an optional TOML file, then non-None overrides (command-line flags);
    `auth` holds overrides of the `[auth]` table."""
    cfg = ServerConfig()
    if path:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from None
        limits = data.pop("limits", {})
        auth_table = data.pop("auth", {})
        for name, table in (("limits", limits), ("auth", auth_table)):
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: {name} must be a table ([{name}])")
        cfg = _apply(cfg, data, path)
        cfg = replace(
            cfg,
            limits=_apply(cfg.limits, limits, f"{path} [limits]"),
            auth=_apply(cfg.auth, auth_table, f"{path} [auth]"),
        )
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    if auth:
        cfg = replace(
            cfg, auth=replace(cfg.auth, **{k: v for k, v in auth.items() if v is not None})
        )
    _check(cfg)
    return cfg


def _check(cfg: ServerConfig) -> None:
    if cfg.tls_key_file and not cfg.tls_cert_file:
        raise ConfigError("tls_key_file without tls_cert_file (the certificate to serve)")
    if cfg.auth.tls_client_ca_file and not (cfg.tls_cert_file and cfg.auth.api_keys_file):
        raise ConfigError(
            "tls_client_ca_file needs tls_cert_file (TLS served here) and api_keys_file (whose "
            "cn:<common name> lines grant client certificates their channels)"
        )
    if cfg.auth.tls_client_crl_file and not cfg.auth.tls_client_ca_file:
        raise ConfigError(
            "tls_client_crl_file needs tls_client_ca_file (the CA whose certificates it revokes)"
        )
    if cfg.tls_cert_file:
        # Here, not in every worker.
        server_context(cfg.tls_cert_file, cfg.tls_key_file, cfg.auth.tls_client_ca_file)
    if cfg.workers < 1:
        raise ConfigError("workers must be at least 1")
    for name in ("max_connections", "max_connections_per_ip", "max_connections_per_credential"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name} must be 0 (no cap) or positive")
    if cfg.gc_freeze_s < 0:
        raise ConfigError("gc_freeze_s must be 0 (no freezing) or positive")
    for name in (
        "registry_poll_s",
        "meta_recheck_s",
        "redis_reply_timeout_s",
        "ping_interval_s",
        "ping_timeout_s",
        "gc_full_every_s",
    ):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{name} must be positive")
    for name in ("fanout_pause_ratio", "fanout_pause_after_ms", "fanout_pause_max_ms"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name} must not be negative")
    if not 0 <= cfg.fanout_pause_busy <= 1:
        raise ConfigError("fanout_pause_busy must be between 0 and 1")
    if cfg.limits.rate_violation_window_s <= 0:
        raise ConfigError("rate_violation_window_s must be positive")
    if cfg.limits.max_lifetime_s < 0 or cfg.limits.lifetime_notice_s < 0:
        raise ConfigError("max_lifetime_s and lifetime_notice_s must not be negative")
    if cfg.auth.timeout_s <= 0:
        raise ConfigError("[auth] timeout_s must be positive")
    if cfg.auth.jwt_secret_env and cfg.auth.jwt_secret_file:
        raise ConfigError("set one of jwt_secret_env and jwt_secret_file, not both")
    if ANY_ORIGIN in cfg.allowed_origins and len(cfg.allowed_origins) > 1:
        raise ConfigError(f"allowed origins: {ANY_ORIGIN!r} allows every origin; list nothing else")
    check_exposure(cfg)
    for origin in cfg.allowed_origins:
        if origin == ANY_ORIGIN:
            continue
        if not origin or origin != origin.strip() or origin.endswith("/"):
            raise ConfigError(
                f"allowed origin {origin!r}: write it as the browser sends it, "
                "scheme://host[:port] without a trailing slash"
            )


def check_exposure(cfg: ServerConfig) -> None:
    """ConfigError unless serving without authentication beyond this machine was asked for."""
    if not cfg.auth.enabled and not cfg.public and not is_loopback(cfg.host):
        raise ConfigError(
            f"refusing to serve every channel to anyone on {cfg.host or 'every address'} with "
            "authentication off: configure credentials (--api-keys, --jwt-secret-env, "
            "--jwt-public-key), or pass --public (`public = true` in the config file) if that "
            "is what you want"
        )


def _apply(obj: _T, data: dict[str, Any], where: str) -> _T:
    known = {f.name: f for f in fields(obj)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"{where}: unknown key {key!r}; known: {', '.join(sorted(known))}")
        default = getattr(obj, key)
        if isinstance(default, tuple):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{where}: {key} must be a list of strings")
            values[key] = tuple(value)
            continue
        if not isinstance(value, type(default)) and not (
            isinstance(default, float) and isinstance(value, int)
        ):
            raise ConfigError(f"{where}: {key} must be {type(default).__name__}")
        values[key] = value
    return replace(obj, **values)  # type: ignore[type-var]


__all__ = [
    "ANY_ORIGIN",
    "CHANNEL_TYPES",
    "DEFAULT_REDIS_URL",
    "AuthConfig",
    "Limits",
    "PublisherConfig",
    "RetentionConfig",
    "ServerConfig",
    "check_exposure",
    "is_loopback",
    "load_server_config",
    "redis_url_from_env",
]
