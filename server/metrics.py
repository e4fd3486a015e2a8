"""Server counters and a latency histogram, rendered in the Prometheus text format."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field, fields

from tickwire.server.outbox import OutboxStats

# Publish → server write latency buckets, in seconds (Prometheus convention); 50-100 µs apart
# below a millisecond, where the low-load latency goals are set.
LATENCY_BUCKETS = (
    0.0001, 0.00015, 0.0002, 0.00025, 0.0003, 0.0004, 0.0005, 0.0006, 0.00075, 0.001, 0.0015,
    0.002, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)  # fmt: skip
# Publish → read and read → write inside the server: finer still, 25-50 µs apart up to half a
# millisecond, as they are meant to be well under one.
SERVER_BUCKETS = (
    0.00001, 0.000025, 0.00005, 0.000075, 0.0001, 0.000125, 0.00015, 0.000175, 0.0002, 0.00025,
    0.0003, 0.00035, 0.0004, 0.00045, 0.0005, 0.0006, 0.0007, 0.0008, 0.0009, 0.001, 0.00125,
    0.0015, 0.002, 0.0025, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.025, 0.1,
)  # fmt: skip

#: Cyclic garbage collector pauses, in seconds.
GC_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip


@dataclass
class Histogram:
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    #: One count per bucket, and one above the last.
    counts: list[int] = field(init=False)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, seconds: float, weight: int = 1) -> None:
        self.counts[bisect.bisect_left(self.buckets, seconds)] += weight
        self.total += seconds * weight
        self.n += weight

    def quantile(self, q: float) -> float:
        """Upper bound of the bucket holding quantile `q` (coarse, for /healthz)."""
        if not self.n:
            return 0.0
        target = q * self.n
        run = 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts, strict=True):
            run += count
            if run >= target:
                return bound
        return float("inf")


@dataclass
class Metrics:
    connections: int = 0
    connections_total: int = 0
    subscriptions: int = 0
    events_read: int = 0
    deliveries: int = 0
    frames_sent: int = 0
    bytes_sent: int = 0
    slow_disconnects: int = 0
    rejected_requests: int = 0
    #: WebSocket upgrades answered with an HTTP error, by status (401, 403, 429, 503).
    handshakes_refused: dict[int, int] = field(default_factory=dict)
    #: Connections closed with 4001: a bad or missing `auth` message, or none in time.
    auth_failures: int = 0
    redis_up: int = 0
    redis_reconnects: int = 0
    #: Redis Cluster masters the stream reader cannot reach (their channels wait).
    redis_masters_down: int = 0
    #: Stream reads to catch up (a new channel, a hole in the pushes, stored past what was read).
    catchup_reads: int = 0
    #: Messages on the live channel that are not an append's push (ignored).
    bad_pushes: int = 0
    #: Channels found stored behind what was read in the same epoch (Redis lost their tail: a
    #: failover, an AOF crash), given a new epoch by this server.
    rollbacks_fenced: int = 0
    #: The reader's pauses after costly fan-outs (`ServerConfig.fanout_pause_ratio`).
    fanout_pauses: int = 0
    fanout_pause_seconds: float = 0.0
    read_lag_seconds: float = 0.0
    outbox: OutboxStats = field(default_factory=OutboxStats)
    latency: Histogram = field(default_factory=Histogram)
    #: From an event's publish time to the arrival of the push (or catch-up read) holding it.
    publish_to_read: Histogram = field(default_factory=lambda: Histogram(SERVER_BUCKETS))
    #: From that arrival to its events written to every subscriber's socket.
    read_to_write: Histogram = field(default_factory=lambda: Histogram(SERVER_BUCKETS))
    #: The cyclic garbage collector's pauses in this process (recorded by `serve_forever`).
    gc_pause: Histogram = field(default_factory=lambda: Histogram(GC_BUCKETS))

    def render(self) -> str:
        lines: list[str] = []

        def emit(name: str, kind: str, value: float, help_: str) -> None:
            lines.append(f"# HELP tickwire_{name} {help_}")
            lines.append(f"# TYPE tickwire_{name} {kind}")
            lines.append(f"tickwire_{name} {value}")

        emit("connections", "gauge", self.connections, "Open WebSocket connections.")
        emit(
            "connections_total",
            "counter",
            self.connections_total,
            "WebSocket connections accepted.",
        )
        emit("subscriptions", "gauge", self.subscriptions, "Active subscriptions (patterns).")
        emit("events_read_total", "counter", self.events_read, "Events read from Redis.")
        emit("deliveries_total", "counter", self.deliveries, "Events queued to subscribers.")
        emit("frames_sent_total", "counter", self.frames_sent, "WebSocket frames written.")
        emit("bytes_sent_total", "counter", self.bytes_sent, "Payload bytes written.")
        emit(
            "slow_disconnects_total",
            "counter",
            self.slow_disconnects,
            "Clients closed as slow consumers.",
        )
        emit(
            "rejected_requests_total",
            "counter",
            self.rejected_requests,
            "Requests answered with an error.",
        )
        lines.append(
            "# HELP tickwire_handshakes_refused_total WebSocket upgrades refused, by HTTP status."
        )
        lines.append("# TYPE tickwire_handshakes_refused_total counter")
        for status in sorted(self.handshakes_refused):
            lines.append(
                f'tickwire_handshakes_refused_total{{status="{status}"}} '
                f"{self.handshakes_refused[status]}"
            )
        emit(
            "auth_failures_total",
            "counter",
            self.auth_failures,
            "Connections closed with 4001 (bad, missing or late auth message).",
        )
        emit("redis_up", "gauge", self.redis_up, "1 when the stream reader is connected to Redis.")
        emit("redis_reconnects_total", "counter", self.redis_reconnects, "Reconnections to Redis.")
        emit(
            "redis_masters_down",
            "gauge",
            self.redis_masters_down,
            "Redis Cluster masters the stream reader cannot reach: their channels wait.",
        )
        emit(
            "catchup_reads_total",
            "counter",
            self.catchup_reads,
            "Stream reads to catch up (a new channel, a hole in the pushes, stored past what was read).",
        )
        emit(
            "bad_pushes_total",
            "counter",
            self.bad_pushes,
            "Messages on the live channel that are not an append's push (ignored).",
        )
        emit(
            "rollbacks_fenced_total",
            "counter",
            self.rollbacks_fenced,
            "Channels stored behind what was read in the same epoch (lost tail), given a new epoch.",
        )
        emit(
            "fanout_pauses_total",
            "counter",
            self.fanout_pauses,
            "Pauses of the reader after a fan-out that cost more than fanout_pause_after_ms.",
        )
        emit(
            "fanout_pause_seconds_total",
            "counter",
            self.fanout_pause_seconds,
            "Time the reader paused after costly fan-outs, so that frames carry more events.",
        )
        emit(
            "read_lag_seconds",
            "gauge",
            self.read_lag_seconds,
            "Publish time to read time of the last batch.",
        )
        for f in fields(OutboxStats):
            emit(
                f"outbox_{f.name}_total",
                "counter",
                getattr(self.outbox, f.name),
                f"Outbox {f.name.replace('_', ' ')}.",
            )
        _histogram(
            lines,
            "publish_to_write_seconds",
            "Publish to server write latency per event.",
            self.latency,
        )
        _histogram(
            lines,
            "publish_to_read_seconds",
            "Publish to the push (or catch-up read) arriving, per event delivery (feed, Redis).",
            self.publish_to_read,
        )
        _histogram(
            lines,
            "read_to_write_seconds",
            "Redis reply read to socket write, per event delivery (the server's own share).",
            self.read_to_write,
        )
        _histogram(
            lines,
            "gc_pause_seconds",
            "Pauses of the cyclic garbage collector, every generation (all of the loop stops).",
            self.gc_pause,
        )
        return "\n".join(lines) + "\n"


def _histogram(lines: list[str], name: str, help_: str, h: Histogram) -> None:
    lines.append(f"# HELP tickwire_{name} {help_}")
    lines.append(f"# TYPE tickwire_{name} histogram")
    run = 0
    for bound, count in zip(h.buckets, h.counts, strict=False):
        run += count
        lines.append(f'tickwire_{name}_bucket{{le="{bound}"}} {run}')
    lines.append(f'tickwire_{name}_bucket{{le="+Inf"}} {h.n}')
    lines.append(f"tickwire_{name}_sum {h.total}")
    lines.append(f"tickwire_{name}_count {h.n}")
