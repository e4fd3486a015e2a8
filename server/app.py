"""The server: one port for `/ws` and the HTTP routes, its connections, the reader and shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from websockets.extensions.base import ServerExtensionFactory
from websockets.extensions.permessage_deflate import enable_server_permessage_deflate

from tickwire import __version__
from tickwire.core.collector import FreezePolicy, PauseTimer
from tickwire.core.config import ServerConfig, check_exposure
from tickwire.core.errors import ConfigError
from tickwire.core.runtime import raise_open_files_limit, tune_gc
from tickwire.core.tls import server_context
from tickwire.core.waits import report_end, wait_set, within
from tickwire.server.admission import Admission
from tickwire.server.auth import Authenticator
from tickwire.server.connection import FRAME_LIMIT_FACTOR, WRITE_HIGH, WRITE_LOW, Connection
from tickwire.server.demand import BarDemand
from tickwire.server.history import History
from tickwire.server.http import HttpRoutes
from tickwire.server.hub import Hub
from tickwire.server.messages import (
    status_message,
)
from tickwire.server.metrics import Metrics
from tickwire.server.reader import StreamReader
from tickwire.server.rounds import Rounds
from tickwire.server.wire import Endpoint, Wire

log = logging.getLogger("tickwire.server")
#: Connections the kernel queues before the server accepts them (it caps this at
#: net.core.somaxconn). asyncio's default of 100 overflows in a reconnect storm: tens of
#: thousands of clients come back at once, and each dropped SYN costs its client a 1, 3, 7 s
#: retransmission wait.
LISTEN_BACKLOG = 4096
#: Heartbeat and keepalive checks visit a slice of the connections about this often (s).
VISIT_S = 0.05


class _NoWireDebug(logging.LoggerAdapter):  # type: ignore[type-arg]
    """websockets' logger without its DEBUG dumps of requests and frames: with auth on they
    would hold `Authorization` headers, `?token=` URLs and `auth` messages."""

    def isEnabledFor(self, level: int) -> bool:
        return level > logging.DEBUG and self.logger.isEnabledFor(level)


class TickwireServer:
    """`async with TickwireServer(config) as srv:` serves until the block ends (or `close()`)."""

    def __init__(
        self,
        config: ServerConfig,
        *,
        reuse_port: bool = False,
        demand_clock: Callable[[], float] = time.time,
    ) -> None:
        """`demand_clock`: the wall clock of on-demand bar leases (`BarDemand`), for tests."""
        self.config = config
        self.reuse_port = reuse_port
        self.metrics = Metrics()
        # Refuses a non-loopback address without auth unless `public` (the CLI checks it too,
        # this catches a config built in code).
        check_exposure(config)
        #: None when auth is off; raises ConfigError for unreadable keys or a missing secret.
        self.authenticator = Authenticator(config.auth) if config.auth.enabled else None
        self.admission = Admission(config, self.authenticator)
        self.http = HttpRoutes(
            self.admission, self.metrics, health=lambda: (self.reader.up, self.health())
        )
        self.hub = Hub()
        self.hub.on_wake = self._wake_throttles
        self._throttle_timer: asyncio.TimerHandle | None = None
        self.history = History(config.redis_url, config.redis_reply_timeout_s)
        self.reader = StreamReader(
            config, self.hub, self.metrics, self.history, on_status=self._on_status
        )
        self.demand = BarDemand(
            config.redis_url, self.hub, retention_s=config.bar_retention_s, clock=demand_clock
        )
        self.connections: set[Connection] = set()
        # Each connection is looked at for a heartbeat once within half the heartbeat interval
        # of its due time, and for keepalive four times per ping interval or timeout.
        period = max(
            0.01,
            min(config.heartbeat_ms / 2000, min(config.ping_interval_s, config.ping_timeout_s) / 4),
        )
        slices = max(1, round(period / VISIT_S))
        self.rounds: Rounds[Connection] = Rounds(slices)
        self._visit_every = period / slices
        self._server: asyncio.Server | None = None
        self._serving = False
        #: TCP connections open, in their handshake or an HTTP exchange included.
        self.sockets = 0
        self._tasks: list[asyncio.Task[None]] = []
        self.port = config.port
        #: The TLS context handshakes take, if TLS is served here: the one listening, or the
        #: one the last reload made (`reload_tls`).
        self._tls: ssl.SSLContext | None = None

    @property
    def url(self) -> str:
        scheme = "wss" if self.config.tls_cert_file else "ws"
        return f"{scheme}://{self.config.host}:{self.port}/ws"

    @property
    def http_url(self) -> str:
        scheme = "https" if self.config.tls_cert_file else "http"
        return f"{scheme}://{self.config.host}:{self.port}/"

    async def __aenter__(self) -> TickwireServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        cfg = self.config
        extensions: Sequence[ServerExtensionFactory] = ()
        if cfg.compression:
            extensions = enable_server_permessage_deflate(None)
        endpoint = Endpoint(
            route=self.http.route,
            made=self._made,
            opened=self._opened,
            lost=self._lost,
            serving=lambda: self._serving,
            max_size=cfg.limits.max_message_bytes * FRAME_LIMIT_FACTOR,
            extensions=tuple(extensions),
            logger=_NoWireDebug(logging.getLogger("websockets.server"))
            if self.authenticator is not None
            else logging.getLogger("websockets.server"),
            open_timeout_s=cfg.open_timeout_s,
            close_timeout_s=cfg.close_timeout_s,
            # Past the outbox and the socket's high-water mark, only pongs can pile up.
            read_pause_bytes=cfg.limits.outbox_bytes + WRITE_HIGH,
            # The transport pauses writing above WRITE_HIGH and resumes below WRITE_LOW: the
            # drain task waits on that instead of polling each full socket.
            write_high=WRITE_HIGH,
            write_low=WRITE_LOW,
            server_header=f"tickwire/{__version__}",
        )

        tls = self._tls = self._tls_context() if cfg.tls_cert_file else None
        if tls is not None:
            tls.sni_callback = self._latest_tls
        self._server = await asyncio.get_running_loop().create_server(
            endpoint,
            cfg.host,
            cfg.port,
            reuse_port=self.reuse_port,
            backlog=LISTEN_BACKLOG,
            ssl=tls,
            # A client that connects and never finishes its TLS handshake is dropped as one
            # that never finishes its WebSocket handshake.
            ssl_handshake_timeout=cfg.open_timeout_s if tls is not None else None,
        )
        self._serving = True
        sock = next(iter(self._server.sockets))
        self.port = sock.getsockname()[1]
        self._tasks = [
            asyncio.create_task(self.reader.run(), name="tickwire-reader"),
            asyncio.create_task(self._tend(), name="tickwire-heartbeat-keepalive"),
            asyncio.create_task(self.demand.run(), name="tickwire-bar-demand"),
        ]
        for task in self._tasks:
            task.add_done_callback(report_end)
        # Serve at once, but give the reader a moment so that the first clients find Redis read.
        await wait_set(self.reader.ready, 2.0)
        log.info("serving on %s (HTTP %s)", self.url, self.http_url)

    def stop_serving(self) -> None:
        """Accept no more connections, and refuse upgrades (503) on those accepted already."""
        self._serving = False
        if self._server is not None:
            self._server.close()

    async def close(self) -> None:
        """Stop accepting, close every connection with 1001, stop reading."""
        if self._server is None:
            return
        self.stop_serving()
        closing = []
        for conn in list(self.connections):
            if not conn.closing:
                conn.stop_receiving()
                conn.wire.close(1001, "server shutting down")
            closing.append(conn.wire.wait_lost())
        await within(
            asyncio.gather(*closing, return_exceptions=True), self.config.shutdown_timeout_s
        )
        if self._throttle_timer is not None:
            self._throttle_timer.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await within(self._server.wait_closed(), 1.0)
        self.history.close()
        self._server = None

    def _wake_throttles(self, deadline: float) -> None:
        """The hub's throttles hold batches due at `deadline` (its clock): release them then.
        One timer for every throttle of the process; an earlier deadline replaces it."""
        if self._throttle_timer is not None:
            self._throttle_timer.cancel()
        delay = max(0.0, deadline - self.hub.clock())
        self._throttle_timer = asyncio.get_running_loop().call_later(delay, self._release_throttled)

    def _release_throttled(self) -> None:
        self._throttle_timer = None
        self.metrics.deliveries += self.hub.release_due()

    def _on_status(self, up: bool) -> None:
        if up and self.metrics.redis_reconnects == 0:
            return  # the first connection is not news
        if up:
            self.demand.renew()  # a Redis that restarted empty has lost the demand
        self.hub.broadcast_control(status_message(up))

    async def _tend(self) -> None:
        """Heartbeats and keepalive pings (`Connection.tend`): every connection is looked at
        once per `period`, a slice (`Rounds`) every `VISIT_S` or so."""
        while True:
            await asyncio.sleep(self._visit_every)
            self._visit(time.monotonic())

    def _visit(self, now: float) -> None:
        # In a function of its own: a loop variable in a sleeping coroutine's frame would keep
        # the last connection (and all it holds) alive until the next visit.
        for conn in self.rounds.turn():
            try:
                conn.tend(now)
            except Exception as exc:
                # One connection's failure never stops every other's heartbeats and pings.
                conn.failed("tending", exc)

    def reload(self) -> bool:
        """SIGHUP: the credentials and the TLS certificate read again; False if either failed
        (that one's previous state kept)."""
        credentials = self.reload_credentials()
        return self.reload_tls() and credentials

    def reload_tls(self) -> bool:
        """Read the TLS certificate and key again (a renewal): connections opened from now on
        get the new one, open ones keep theirs. False (and the old one kept) when the files
        cannot be loaded."""
        cfg = self.config
        if self._tls is None:
            return True
        try:
            # A context of its own, swapped in whole: loading into the live one could leave it
            # with a new certificate and the old key if the files changed between the reads.
            fresh = self._tls_context()
        except ConfigError as exc:
            log.error("reload failed, keeping the previous TLS certificate: %s", exc)
            return False
        self._tls = fresh
        log.info("reload: TLS certificate %s loaded", cfg.tls_cert_file)
        return True

    def _tls_context(self) -> ssl.SSLContext:
        cfg = self.config
        return server_context(cfg.tls_cert_file, cfg.tls_key_file, cfg.auth.tls_client_ca_file)

    def _latest_tls(self, conn: ssl.SSLObject, _name: str | None, ctx: ssl.SSLContext) -> None:
        """The listening context's `sni_callback`, which OpenSSL calls at every ClientHello,
        with a server name or without: the handshake takes the last context loaded."""
        if self._tls is not None and ctx is not self._tls:
            conn.context = self._tls

    def reload_credentials(self) -> bool:
        """Re-read the API key file and JWT key files (SIGHUP), then check every connection's
        grant again: a removed key closes with 4001, narrowed entitlements that no longer cover
        a connection's subscriptions close it with 4003. False (and the old keys kept) when the
        files cannot be read or are malformed."""
        if self.authenticator is None:
            log.info("reload: authentication is off, nothing to reload")
            return True
        try:
            self.authenticator.reload()
        except ConfigError as exc:
            log.error("reload failed, keeping the previous credentials: %s", exc)
            return False
        for conn in list(self.connections):
            if conn.closing:
                continue
            close = conn.session.revalidate()
            if close is not None:
                conn.close_soon(close.code, close.reason)
        return True

    def _opened(self, wire: Wire) -> Connection:
        conn = Connection(self, wire, wire.admitted)
        self.connections.add(conn)
        self.rounds.add(conn)
        self.metrics.connections += 1
        self.metrics.connections_total += 1
        conn.start()
        return conn

    def _made(self, _wire: Wire) -> None:
        # Here, not in the protocol factory: a connection whose TLS handshake fails is made by
        # the factory and never reported lost (counted there, each stayed counted for ever).
        self.sockets += 1

    def _lost(self, wire: Wire) -> None:
        self.sockets -= 1
        if wire.admitted is not None:
            self.admission.release(wire.admitted.slot)
        conn = wire.handler
        if not isinstance(conn, Connection):
            return  # gone during its handshake, or an HTTP exchange
        conn.stop_receiving()
        conn.cleanup()
        self.connections.discard(conn)
        self.rounds.remove(conn)
        self.metrics.connections -= 1

    def health(self) -> dict[str, Any]:
        m = self.metrics
        return {
            # Degraded too with a cluster master down: its channels wait (still 200: another
            # server node on the same cluster would not do better).
            "status": "ok" if self.reader.up and not m.redis_masters_down else "degraded",
            "redis": self.reader.up,
            "redis_masters_down": m.redis_masters_down,
            "read_lag_ms": round(m.read_lag_seconds * 1000, 3),
            "connections": m.connections,
            "channels_read": len(self.reader.positions),
            "version": __version__,
        }


async def serve_forever(
    config: ServerConfig,
    *,
    reuse_port: bool = False,
    ready: Callable[[TickwireServer], Awaitable[None] | None] | None = None,
) -> int:
    """Run until SIGTERM/SIGINT, then shut down gracefully; SIGHUP reloads credentials and
    the TLS certificate."""
    # Every connection is a file descriptor: each process (each worker) takes what it may.
    soft, hard = raise_open_files_limit()
    log.info(
        "process %d: open files limit %d (hard %d), about that many connections",
        os.getpid(),
        soft,
        hard,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    srv = TickwireServer(config, reuse_port=reuse_port)
    loop.add_signal_handler(signal.SIGHUP, srv.reload)
    async with srv:
        tune_gc()
        with PauseTimer(
            lambda seconds, _generation: srv.metrics.gc_pause.observe(seconds)
        ) as pauses:
            freezing = None
            if config.gc_freeze_s:
                policy = FreezePolicy(full_every_s=config.gc_full_every_s)
                freezing = asyncio.create_task(policy.run(config.gc_freeze_s))
            try:
                if ready is not None:
                    result = ready(srv)
                    if result is not None:
                        await result
                await stop.wait()
                log.info("shutting down")
            finally:
                if freezing is not None:
                    freezing.cancel()
                log.info("process %d: %s", os.getpid(), pauses.summary())
    return 0
