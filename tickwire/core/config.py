"""Typed configuration objects, built once at start-up and passed down (no global state)."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from tickwire.core.channels import CHANNEL_TYPES
from tickwire.core.errors import ConfigError

_T = TypeVar("_T")

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def redis_url_from_env(default: str = DEFAULT_REDIS_URL) -> str:
    return os.environ.get("REDIS_URL") or default


@dataclass(frozen=True, slots=True)
class RetentionConfig:
    """Approximate stream length kept per channel type (`XADD MAXLEN ~`)."""

    quotes: int = 100_000
    trades: int = 100_000
    bars: int = 10_000

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
    backoff_initial_s: float = 0.05
    backoff_max_s: float = 2.0
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
    rate_violations_before_close: int = 20
    # Outbound bytes queued for one client before the slow-consumer policy applies.
    outbox_bytes: int = 1024 * 1024
    # How long a client may stay over the limit before it is closed with 4008.
    slow_grace_s: float = 5.0
    max_resume_events: int = 100_000


@dataclass(frozen=True, slots=True)
class ServerConfig:
    redis_url: str = DEFAULT_REDIS_URL
    host: str = "127.0.0.1"
    port: int = 8765
    workers: int = 1
    limits: Limits = field(default_factory=Limits)
    heartbeat_ms: int = 5000
    # Stream reading: one XREAD per turn over all live channels.
    read_count: int = 1000
    read_block_ms: int = 100
    registry_poll_s: float = 0.25
    # Timeouts
    open_timeout_s: float = 10.0
    ping_interval_s: float = 20.0
    ping_timeout_s: float = 20.0
    close_timeout_s: float = 2.0
    shutdown_timeout_s: float = 4.0
    compression: bool = False


def load_server_config(path: str | None, **overrides: Any) -> ServerConfig:
    """ServerConfig from an optional TOML file, then non-None overrides (command-line flags)."""
    cfg = ServerConfig()
    if path:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from None
        limits = data.pop("limits", {})
        cfg = _apply(cfg, data, path)
        cfg = replace(cfg, limits=_apply(cfg.limits, limits, f"{path} [limits]"))
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    if cfg.workers < 1:
        raise ConfigError("workers must be at least 1")
    return cfg


def _apply(obj: _T, data: dict[str, Any], where: str) -> _T:
    known = {f.name: f for f in fields(obj)}  # type: ignore[arg-type]
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"{where}: unknown key {key!r}; known: {', '.join(sorted(known))}")
        default = getattr(obj, key)
        if not isinstance(value, type(default)) and not (
            isinstance(default, float) and isinstance(value, int)
        ):
            raise ConfigError(f"{where}: {key} must be {type(default).__name__}")
    return replace(obj, **data)  # type: ignore[type-var]


__all__ = [
    "CHANNEL_TYPES",
    "DEFAULT_REDIS_URL",
    "Limits",
    "PublisherConfig",
    "RetentionConfig",
    "ServerConfig",
    "load_server_config",
    "redis_url_from_env",
]
