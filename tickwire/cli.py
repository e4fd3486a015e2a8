"""The `tickwire` command line: feeds, recording, the server, the demo, the bench and the watcher."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Coroutine
from typing import Any

from tickwire import __version__
from tickwire.core.acl import ROLES as ACL_ROLES
from tickwire.core.acl import acl_rules
from tickwire.core.argtypes import (
    count,
    milliseconds,
    milliseconds_or_none,
    port,
    rate,
    seconds,
    tick_ms,
)
from tickwire.core.config import (
    DEFAULT_REDIS_URL,
    PublisherConfig,
    RetentionConfig,
    redis_url_from_env,
)
from tickwire.core.errors import TickwireError
from tickwire.core.urls import redact_url

log = logging.getLogger("tickwire.cli")


def _redis_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--redis",
        default=None,
        metavar="URL",
        help=f"Redis URL: redis://host:port/db or unix:///path/redis.sock?db=N; any node of a "
        "Redis Cluster (found by itself), several seeds as redis://h1:7000,h2:7001/0; or "
        "redis+sentinel://s1:26379,s2:26379/SERVICE/db for a Sentinel-managed primary "
        "(?sentinel_password=… for Sentinels with their own); over TLS rediss://… and "
        "rediss+sentinel://… (?ssl_ca_certs=ca.pem, see docs/operations.md) "
        f"(default: $REDIS_URL or {DEFAULT_REDIS_URL})",
    )


def _symbols(value: str) -> int | list[str]:
    from tickwire.core.channels import validate_symbol
    from tickwire.core.errors import ChannelError

    if value.isdigit():
        return count(value)
    names = [s.strip() for s in value.split(",") if s.strip()]
    if not names:
        raise argparse.ArgumentTypeError("no symbols: give a count or a comma-separated list")
    try:
        return [validate_symbol(n) for n in names]
    except ChannelError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _speed(value: str) -> float | None:
    """`--speed`: a positive factor, or `max` (None: as fast as possible)."""
    if value == "max":
        return None
    try:
        factor = float(value)
    except ValueError:
        factor = float("nan")
    if not 0 < factor < float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r}: a positive factor (10, 0.5, …) or max")
    return factor


def _bar_intervals(value: str) -> tuple[str, ...]:
    from tickwire.core.channels import BAR_INTERVALS

    if value in ("off", "none", ""):
        return ()
    intervals = tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    bad = [v for v in intervals if v not in BAR_INTERVALS]
    if bad:
        raise argparse.ArgumentTypeError(
            f"no bar channel for {', '.join(bad)}: use {', '.join(BAR_INTERVALS)} "
            "(comma-separated) or off"
        )
    return intervals


#: The bridges: broker, what it consumes (help), URLs, the description's words.
BRIDGES = (
    (
        "nats",
        "NATS JetStream",
        "nats://127.0.0.1:4222 (tls://… over TLS)",
        "a NATS JetStream stream (durable pull consumer)",
    ),
    (
        "rabbitmq",
        "RabbitMQ queues",
        "amqp://guest:guest@127.0.0.1:5672/ (amqps://… over TLS)",
        "RabbitMQ queues",
    ),
    (
        "mqtt",
        "MQTT topics",
        "mqtt://127.0.0.1:1883 (mqtts://… over TLS)",
        "MQTT topics (MQTT 5, QoS 1, persistent session)",
    ),
)
#: Test hook: the bridge kills itself (SIGKILL) after this many rounds are in Redis and before
#: their acknowledgement, as a crash at the worst moment would.
CRASH_AFTER_ROUND_ENV = "TICKWIRE_BRIDGE_CRASH_AFTER_ROUND"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tickwire",
        description="Real-time market data streaming: feeds into Redis Streams, WebSocket fan-out out.",
    )
    p.add_argument("--version", action="version", version=f"tickwire {__version__}")
    p.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)"
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    feed = sub.add_parser("feed", help="run a feed adapter that publishes into Redis")
    feed_sub = feed.add_subparsers(dest="feed", required=True, metavar="FEED")
    sim = feed_sub.add_parser(
        "sim",
        help="simulated market (GBM prices, quotes, trades and their bars)",
        description="Publish a simulated market: numpy GBM price paths, quotes and trades at random "
        "times, deterministic under --seed, and OHLCV bars of the trades.",
    )
    _redis_arg(sim)
    sim.add_argument(
        "--rate", type=rate, default=1000.0, help="total events per second (default 1000)"
    )
    sim.add_argument(
        "--max", action="store_true", help="ignore --rate pacing: publish as fast as possible"
    )
    sim.add_argument(
        "--symbols",
        type=_symbols,
        default=10,
        help="a count, or a comma-separated list (default 10)",
    )
    sim.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    sim.add_argument(
        "--tick-ms",
        type=tick_ms,
        default=1.0,
        metavar="MS",
        help="release the events come due at most once per this many milliseconds, a tick after "
        "the last release (default 1): a longer tick puts more events in each append call, "
        "for less CPU (2 ms: about 0.7x at 10 000 events/s), and makes each event wait up to "
        "that much longer before it is published",
    )
    sim.add_argument("--duration", type=seconds, help="stop after this many seconds")
    sim.add_argument("--count", type=count, help="stop after this many events")
    sim.add_argument(
        "--bars",
        type=_bar_intervals,
        default=("1s",),
        metavar="INTERVALS",
        help="publish OHLCV bars of the trades on bars.<interval>:<symbol>: 1s, 1m, 1s,1m or off "
        "(default 1s)",
    )
    sim.add_argument(
        "--trade-maxlen",
        type=count,
        default=RetentionConfig().trades,
        help="trades kept per stream (MAXLEN ~)",
    )
    sim.add_argument(
        "--quote-maxlen",
        type=count,
        default=RetentionConfig().quotes,
        help="quotes kept per stream (MAXLEN ~)",
    )
    sim.add_argument(
        "--bar-maxlen",
        type=count,
        default=RetentionConfig().bars,
        help="bars kept per stream (MAXLEN ~)",
    )

    rep = feed_sub.add_parser(
        "replay",
        help="republish recorded NDJSON events",
        description="Republish recorded NDJSON events with their original spacing scaled by --speed.",
    )
    _redis_arg(rep)
    rep.add_argument(
        "file", help="NDJSON file, one event per line (as written by `tickwire record`)"
    )
    rep.add_argument("--speed", type=_speed, default=1.0, help="1, 10, 0.5, ... or max (default 1)")
    rep.add_argument(
        "--skip-bad", action="store_true", help="skip malformed lines (counted) instead of stopping"
    )

    for broker, title, url_example, what in BRIDGES:
        br = feed_sub.add_parser(
            broker,
            help=f"bridge: consume {title} and publish into tickwire's streams",
            description=f"Consume {what} and publish each message as an event: the map (TOML) "
            "says which messages feed which channel type, where the symbol is and which "
            "message field holds each event field (JSON messages). A message is acknowledged "
            "to the broker only once Redis holds its event, and stored once even when the "
            "broker redelivers it; while Redis is slow or down the bridge stops consuming. A "
            "message that does not map is counted, logged and dead-lettered or skipped, as "
            "the map says. Needs `pip install 'tickwire[bridges]'`; see docs/feeds.md.",
        )
        _redis_arg(br)
        br.add_argument("--url", required=True, help=f"the broker, e.g. {url_example}")
        br.add_argument(
            "--config",
            required=True,
            metavar="MAP.toml",
            help="the bridge map: [bridge], [" + broker + "] and [[route]] tables "
            "(docs/feeds.md has a worked example; a private CA: tls_ca_file in [" + broker + "])",
        )

    bars = sub.add_parser(
        "bars",
        help="make on-demand bar channels (bars.250ms, bars.5s:*, …) from the trades in Redis",
        description="Make the bar channels servers have subscribers for (any interval from 100ms "
        "to 1d besides a feed's own 1s/1m), from the trades stored in Redis, with numpy; run one "
        "or more (one writer per channel, by a lease in Redis). docs/protocol.md, On-demand bars.",
    )
    _redis_arg(bars)
    bars.add_argument(
        "--close-delay-ms",
        type=milliseconds_or_none,
        default=100.0,
        help="a bar closes this long after its end, for trades still on their way (default 100)",
    )
    bars.add_argument(
        "--poll-ms", type=milliseconds, default=50.0, help="most time between reads (default 50)"
    )
    bars.add_argument(
        "--lease-s",
        type=seconds,
        default=5.0,
        help="a channel's writer lease; another maker takes over this long after one dies "
        "(default 5)",
    )
    bars.add_argument(
        "--bar-maxlen",
        type=count,
        default=RetentionConfig().bars,
        help="bars kept per channel (MAXLEN ~)",
    )

    rec = sub.add_parser(
        "record",
        help="write stored events of channels to an NDJSON file",
        description="Write every event Redis holds for CHANNELS (patterns like trades:* allowed) as NDJSON.",
    )
    _redis_arg(rec)
    rec.add_argument("channels", nargs="+", metavar="CHANNEL")
    rec.add_argument("-o", "--output", required=True, help="output file ('-' for stdout)")

    srv = sub.add_parser(
        "serve",
        help="run the WebSocket fan-out server",
        description="Serve Redis Streams to WebSocket clients: ws://HOST:PORT/ws (wss:// with "
        "--tls-cert), the web page on /, /healthz and /metrics.",
    )
    _redis_arg(srv)
    srv.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    srv.add_argument("--port", type=port, default=None, help="port (default 8765)")
    srv.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes sharing the port with SO_REUSEPORT (default: one per core)",
    )
    srv.add_argument(
        "--config", help="TOML file with server settings and [limits] and [auth] tables"
    )
    sec = srv.add_argument_group(
        "security (see docs/operations.md, Security, for an internet-facing checklist)",
        "Secrets are read from an environment variable or a file, never from a flag. "
        "Without credentials, a --host other than loopback needs --public.",
    )
    sec.add_argument(
        "--tls-cert",
        metavar="FILE",
        default=None,
        help="serve wss:// and https:// with this PEM certificate chain (config: tls_cert_file); "
        "without it, ws:// (put a TLS proxy in front)",
    )
    sec.add_argument(
        "--tls-key",
        metavar="FILE",
        default=None,
        help="the certificate's private key, PEM (config: tls_key_file; default: in --tls-cert)",
    )
    sec.add_argument(
        "--tls-client-ca",
        metavar="FILE",
        default=None,
        help="with --tls-cert and --api-keys: client certificates signed by this CA (PEM) are "
        "credentials, granted channels by the key file's cn:<common name> lines "
        "(config: [auth] tls_client_ca_file)",
    )
    sec.add_argument(
        "--tls-client-crl",
        metavar="FILE",
        default=None,
        help="with --tls-client-ca: its CAs' revocation lists (PEM); a revoked certificate is "
        "refused (401), and SIGHUP re-reads the file and closes the connections of certificates "
        "revoked since (config: [auth] tls_client_crl_file)",
    )
    sec.add_argument(
        "--public",
        action="store_true",
        default=None,
        help="serve every channel to anyone without authentication on a non-loopback --host "
        "(config: public = true); without it such a server refuses to start",
    )
    sec.add_argument(
        "--api-keys",
        metavar="FILE",
        default=None,
        help="require credentials; API keys, one `sha256:<hex> <name> <patterns>` per line "
        "(re-read on SIGHUP)",
    )
    sec.add_argument(
        "--jwt-secret-env",
        metavar="VAR",
        default=None,
        help="require credentials; accept HS256 JWTs signed with the secret in this "
        "environment variable",
    )
    sec.add_argument(
        "--jwt-secret-file",
        metavar="FILE",
        default=None,
        help="like --jwt-secret-env, with the secret in a file",
    )
    sec.add_argument(
        "--jwt-public-key",
        metavar="FILE",
        default=None,
        help="require credentials; accept RS256 JWTs verified with this PEM public key",
    )
    sec.add_argument(
        "--jwt-audience",
        metavar="AUD",
        default=None,
        help="accept only JWTs whose `aud` names this audience (config: [auth] jwt_audience)",
    )
    sec.add_argument(
        "--jwt-issuer",
        metavar="ISS",
        default=None,
        help="accept only JWTs whose `iss` is this issuer (config: [auth] jwt_issuer)",
    )
    sec.add_argument(
        "--allow-origin",
        metavar="ORIGIN",
        action="append",
        default=None,
        help="browser Origin allowed to open /ws, e.g. https://app.example.com (repeatable); "
        "'*' allows any page (default: only pages of the server's own origin, as the request's "
        "Host names it; clients that send no Origin are let in)",
    )
    sec.add_argument(
        "--max-connections",
        type=int,
        default=None,
        metavar="N",
        help="open connections per worker process; more get HTTP 503 (default: no cap)",
    )
    sec.add_argument(
        "--max-connections-per-ip",
        type=int,
        default=None,
        metavar="N",
        help="open connections per client IP (IPv6: per /64) and worker process; more get "
        "HTTP 429; loopback clients are not counted (default 1000, 0: no cap)",
    )
    sec.add_argument(
        "--max-connections-per-credential",
        type=int,
        default=None,
        metavar="N",
        help="open connections per API key or JWT subject and worker process; more get HTTP "
        "429, or close 1013 after an auth message (default 100, 0: no cap)",
    )

    demo = sub.add_parser(
        "demo",
        help="Redis + simulator + server in one command (what `make demo` runs)",
        description="Start a private Redis (or use $REDIS_URL), the simulator feed and the server.",
    )
    demo.add_argument("--port", type=port, default=8765, help="port (default 8765)")
    demo.add_argument("--rate", type=rate, default=2000.0, help="simulated events/s (default 2000)")
    demo.add_argument("--symbols", type=count, default=20, help="simulated symbols (default 20)")

    acl = sub.add_parser(
        "acl",
        help="the Redis ACL rules a feed, bridge, bar maker or server needs (docs/operations.md)",
        description="Print the Redis command that gives a Redis user the least a tickwire "
        "process needs: keys and channels under tw:, and its commands. Add the user's password "
        'and hand it to redis-cli: echo "$(tickwire acl feed) >s3cret" | redis-cli -h HOST; '
        "then use --redis redis://feed:s3cret@HOST:6379/0.",
    )
    acl.add_argument("role", choices=list(ACL_ROLES), help="what the user runs")
    acl.add_argument("--user", help="the user's name (default: the role's)")
    sub.add_parser(
        "watch", help="live terminal table of channels (--json: one event per line)", add_help=False
    )
    bench = sub.add_parser(
        "bench",
        help="measure end-to-end latency/throughput against a baseline (`bench publish`: publish "
        "rate; `bench faults`: fault scenarios; `bench conns`: connections per box; `bench failover`: a Redis Cluster master killed under load)",
        add_help=False,
    )
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    return p


def run(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop

        return int(uvloop.run(coro))
    except ImportError:  # pragma: no cover - uvloop is a dependency; stay usable without it
        return asyncio.run(coro)


async def cmd_feed_sim(args: argparse.Namespace) -> int:
    from tickwire.core.runtime import tune_gc
    from tickwire.feeds.publisher import Publisher
    from tickwire.feeds.runner import run_simulator
    from tickwire.feeds.simulator import MarketSimulator, make_instruments

    url = args.redis or redis_url_from_env()
    retention = RetentionConfig(
        trades=args.trade_maxlen, quotes=args.quote_maxlen, bars=args.bar_maxlen
    )
    sim = MarketSimulator(
        make_instruments(args.symbols, args.seed),
        rate=args.rate,
        seed=args.seed,
        start_ns=time.time_ns(),
    )
    bars = f", bars {','.join(args.bars)}" if args.bars else ""
    print(
        f"simulating {len(sim.instruments)} symbols at {'max' if args.max else f'{args.rate:,.0f}'} events/s{bars} into {redact_url(url)}",
        file=sys.stderr,
    )

    async with Publisher(PublisherConfig(redis_url=url, retention=retention)) as pub:

        def progress(sent: int, seconds: float) -> None:
            # Stored, not only sent: a Redis that refuses every append (an ACL without
            # EVALSHA, OOM) must not look like a feed at full rate.
            print(
                f"\r{sent:,} events ({pub.stats.published:,} stored), {sent / seconds:,.0f}/s",
                end="",
                file=sys.stderr,
                flush=True,
            )

        tune_gc()
        report = await run_simulator(
            pub,
            sim,
            bar_intervals=args.bars,
            count=args.count,
            duration=args.duration,
            throttle=not args.max,
            tick_s=args.tick_ms / 1000,
            progress=progress,
            # The simulator's venue time began at its `start_ns`: the set-up since counts.
            venue_clock_ns=time.time_ns,
            # A bounded run ends even if Redis is down or refusing at its end (close tries
            # once more, as long again, and says what it left).
            flush_timeout_s=pub.config.close_timeout_s,
        )
        stats = pub.stats
    unwritten = pub.pending_events
    print(
        f"\npublished {report.events:,} events in {report.seconds:.2f} s: {report.rate:,.0f} events/s"
        + (f", and {report.bars:,} bars" if args.bars else "")
        + (f", {stats.dropped:,} dropped while Redis was down" if stats.dropped else "")
        + (f", {stats.refused:,} refused by Redis" if stats.refused else "")
        + (f", {unwritten:,} not written ({stats.last_error})" if unwritten else ""),
        file=sys.stderr,
    )
    return 1 if unwritten else 0


async def cmd_bars(args: argparse.Namespace) -> int:
    from tickwire.feeds.bar_maker import BarMaker, BarMakerConfig
    from tickwire.feeds.publisher import Publisher

    url = args.redis or redis_url_from_env()
    config = BarMakerConfig(
        redis_url=url,
        poll_s=args.poll_ms / 1000,
        close_delay_s=args.close_delay_ms / 1000,
        lease_s=args.lease_s,
    )
    retention = RetentionConfig(bars=args.bar_maxlen)
    print(f"making on-demand bars from the trades in {redact_url(url)}", file=sys.stderr)
    async with Publisher(PublisherConfig(redis_url=url, retention=retention)) as pub:
        maker = BarMaker(config, pub)
        task = asyncio.ensure_future(maker.run())
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task
        stats = maker.stats
    print(
        f"made {stats.bars:,} bars from {stats.trades:,} trades ({stats.late_trades:,} late)",
        file=sys.stderr,
    )
    return 0


async def cmd_feed_replay(args: argparse.Namespace) -> int:
    from tickwire.feeds.publisher import Publisher
    from tickwire.feeds.replay import replay

    try:
        # Here, before connecting: a wrong path is the likeliest mistake.
        with open(args.file, "rb"):
            pass
    except OSError as exc:
        raise TickwireError(f"cannot read {args.file}: {exc.strerror}") from None
    async with Publisher(PublisherConfig(redis_url=args.redis or redis_url_from_env())) as pub:
        sent = await replay(pub, args.file, speed=args.speed, skip_bad=args.skip_bad)
    print(f"replayed {sent:,} events from {args.file}", file=sys.stderr)
    return 0


async def cmd_feed_bridge(args: argparse.Namespace) -> int:
    import os
    import signal

    from tickwire.feeds.bridges.core import (
        BridgeStats,
        BridgeStore,
        open_source,
        run_bridge,
    )
    from tickwire.feeds.bridges.mapping import BridgeMapper, load_bridge_map

    bridge_map = load_bridge_map(args.config, args.feed)
    url = args.redis or redis_url_from_env()
    store = BridgeStore(PublisherConfig(redis_url=url), bridge_map.options)
    source = open_source(args.feed, args.url, bridge_map)
    await store.start()
    try:
        await source.start()
    except TickwireError:
        raise
    except Exception as exc:
        # The client libraries' own errors (refused, timed out, no such stream or queue),
        # said once here rather than as a traceback.
        raise TickwireError(
            f"cannot start the {args.feed} bridge on {redact_url(args.url)}: "
            f"{str(exc) or type(exc).__name__}"
        ) from None
    stats = BridgeStats()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    crash_after = int(os.environ.get(CRASH_AFTER_ROUND_ENV, "0"))

    def after_store(rounds: int) -> None:
        if crash_after and rounds >= crash_after:
            os.kill(os.getpid(), signal.SIGKILL)

    print(
        f"bridge {bridge_map.options.name}: {args.feed} {redact_url(args.url)} → {redact_url(url)}, "
        f"{len(bridge_map.routes)} routes",
        file=sys.stderr,
        flush=True,
    )

    async def report() -> None:
        while True:
            await asyncio.sleep(5)
            log.info(
                "%d received, %d stored, %d duplicates dropped, %d unmapped, %d refused by Redis",
                stats.received,
                stats.stored,
                stats.duplicates,
                stats.unmapped,
                stats.refused,
            )

    reporter = asyncio.create_task(report())
    try:
        await run_bridge(
            source, BridgeMapper(bridge_map), store, stats=stats, stop=stop, after_store=after_store
        )
    finally:
        reporter.cancel()
        await source.close()
        store.close()
    print(
        f"bridge stopped: {stats.received:,} received, {stats.stored:,} stored, "
        f"{stats.duplicates:,} duplicates dropped, {stats.unmapped:,} unmapped, "
        f"{stats.refused:,} refused by Redis ({stats.dead_lettered:,} dead-lettered)",
        file=sys.stderr,
    )
    return 0


async def cmd_record(args: argparse.Namespace) -> int:
    from tickwire.core.redis_target import open_redis
    from tickwire.feeds.replay import record, resolve_channels

    conn = await open_redis(args.redis or redis_url_from_env())
    try:
        channels = await resolve_channels(conn, args.channels)
        if args.output == "-":
            n = await record(conn, channels, sys.stdout.buffer)
        else:
            with open(args.output, "wb") as fh:
                n = await record(conn, channels, fh)
    finally:
        conn.close()
    print(f"recorded {n:,} events from {len(channels)} channels", file=sys.stderr)
    return 0


#: `tickwire bench <name>`: the module whose `main(argv)` runs it (the e2e bench otherwise).
BENCHES = {
    name: f"tickwire.bench.{module}"
    for name, module in (
        ("publish", "publish"),
        ("feed", "feed_cpu"),
        ("bridge", "bridge"),
        ("failover", "failover"),
        ("conns", "conns"),
        ("throttle", "throttle"),
        ("faults", "faults"),
    )
}


def cmd_bench(rest: list[str]) -> int:
    import importlib

    if rest and rest[0] in BENCHES:
        bench_main = importlib.import_module(BENCHES[rest[0]]).main
        return int(bench_main(rest[1:]))
    from tickwire.bench.e2e import main as e2e_main

    return e2e_main(rest)


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from tickwire.core.config import is_loopback, load_server_config
    from tickwire.server.app import serve_forever
    from tickwire.server.auth import Authenticator
    from tickwire.server.workers import run_workers

    cfg = load_server_config(
        args.config,
        redis_url=args.redis or redis_url_from_env()
        if args.redis or os.environ.get("REDIS_URL")
        else None,
        host=args.host,
        port=args.port,
        workers=args.workers if args.workers is not None else (os.cpu_count() or 1),
        allowed_origins=tuple(args.allow_origin) if args.allow_origin else None,
        max_connections=args.max_connections,
        max_connections_per_ip=args.max_connections_per_ip,
        max_connections_per_credential=args.max_connections_per_credential,
        public=args.public,
        tls_cert_file=args.tls_cert,
        tls_key_file=args.tls_key,
        auth={
            "api_keys_file": args.api_keys,
            "jwt_secret_env": args.jwt_secret_env,
            "jwt_secret_file": args.jwt_secret_file,
            "jwt_public_key_file": args.jwt_public_key,
            "jwt_audience": args.jwt_audience,
            "jwt_issuer": args.jwt_issuer,
            "tls_client_ca_file": args.tls_client_ca,
            "tls_client_crl_file": args.tls_client_crl,
        },
    )
    if cfg.auth.enabled:
        # Fail here, once, on a missing secret or a malformed key file: not in every worker.
        Authenticator(cfg.auth)
    elif not is_loopback(cfg.host):
        # Only with --public (load_server_config refuses otherwise): say it once more.
        log.warning("authentication is off on %s: any client may read every channel", cfg.host)
    if cfg.workers > 1:
        return run_workers(cfg)
    return run(serve_forever(cfg))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "watch":
        from tickwire.clients.watch import main as watch_main

        logging.basicConfig(level=logging.WARNING)
        return watch_main(argv[1:])
    if argv and argv[0] == "bench":
        # The bench parses its own options (argparse cannot hand `--flags` to a sub-command).
        logging.basicConfig(level=logging.WARNING)
        return cmd_bench(argv[1:])
    args = build_parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "feed" and args.feed == "sim":
            return run(cmd_feed_sim(args))
        if args.command == "feed" and args.feed == "replay":
            return run(cmd_feed_replay(args))
        if args.command == "feed" and args.feed in ("nats", "rabbitmq", "mqtt"):
            return run(cmd_feed_bridge(args))
        if args.command == "bars":
            return run(cmd_bars(args))
        if args.command == "record":
            return run(cmd_record(args))
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "acl":
            print(f"ACL SETUSER {args.user or args.role} {' '.join(acl_rules(args.role))} on")
            return 0
        if args.command == "demo":
            from tickwire.demo import run_demo

            return run(run_demo(args.port, args.rate, args.symbols))
    except TickwireError as exc:
        print(f"tickwire: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
