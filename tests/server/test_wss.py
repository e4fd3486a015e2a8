"""The server's own TLS (`--tls-cert`): clients on `wss://`, the HTTP routes on `https://`, and
what a certificate mistake or a client that does not speak TLS does (a clear error; the server
goes on serving the others)."""

from __future__ import annotations

import asyncio
import signal
import ssl
import subprocess
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.conftest import eventually
from tickwire.bench.harness import ServerProcess, start_group
from tickwire.clients import CertificateRefused, Received, connect
from tickwire.clients.watch import main as watch_main
from tickwire.core.channels import Channel
from tickwire.core.config import PublisherConfig, ServerConfig, load_server_config
from tickwire.core.errors import ConfigError
from tickwire.core.events import encode_body
from tickwire.core.redis_process import RedisProcess, TlsFiles
from tickwire.core.redis_wire import RedisConnection
from tickwire.feeds.publisher import Publisher
from tickwire.server.app import TickwireServer

from .conftest import server_config

AAA = Channel("trades", "AAA")


def tls_config(redis: RedisProcess, files: TlsFiles, **more: Any) -> ServerConfig:
    return replace(server_config(redis), tls_cert_file=str(files.cert), **more)


def trusting(files: TlsFiles) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(files.ca))


async def publish(redis: RedisProcess, ids: range) -> None:
    async with Publisher(PublisherConfig(redis_url=redis.url)) as pub:
        fields = {"price": 1.5, "size": 1, "side": "buy"}
        await pub.publish(
            {AAA: [encode_body("trade", "AAA", i, 0, {**fields, "trade_id": i}) for i in ids]}
        )
        await pub.flush()


async def test_clients_get_events_over_wss_and_the_http_routes_answer_on_https(
    redis_server: RedisProcess, redis: RedisConnection, tls_files: TlsFiles
) -> None:
    async with TickwireServer(tls_config(redis_server, tls_files)) as srv:
        assert srv.url.startswith("wss://") and srv.http_url.startswith("https://")
        await publish(redis_server, range(1))
        async with connect(srv.url, ssl=trusting(tls_files)) as feed:
            await feed.subscribe(AAA.name, snapshot=True)  # the latest first, then live
            await publish(redis_server, range(1, 3))
            seqs: list[int] = []
            async with asyncio.timeout(10):
                async for msg in feed:
                    if isinstance(msg, Received):
                        seqs.append(msg.seq)
                        if msg.seq == 3:
                            break
        assert seqs == [1, 2, 3]

        def healthz() -> int:
            url = f"{srv.http_url}healthz"
            with urllib.request.urlopen(url, context=trusting(tls_files), timeout=5) as r:
                return int(r.status)

        assert await asyncio.to_thread(healthz) == 200


async def test_a_certificate_the_client_does_not_trust_fails_at_once(
    redis_server: RedisProcess, redis: RedisConnection, tls_files: TlsFiles
) -> None:
    async with TickwireServer(tls_config(redis_server, tls_files)) as srv:
        # The system's CAs do not know the test's: a typed error, not retrying for ever as
        # for a server that is down.
        with pytest.raises(CertificateRefused, match="certificate"):
            async with asyncio.timeout(10):
                await connect(srv.url, wait_for_server=True, max_attempts=None)


async def test_clients_that_do_not_speak_tls_are_dropped_and_the_others_served(
    redis_server: RedisProcess, redis: RedisConnection, tls_files: TlsFiles
) -> None:
    cfg = tls_config(redis_server, tls_files, open_timeout_s=0.5)
    async with TickwireServer(cfg) as srv:
        # Plain HTTP on the TLS port: the handshake fails, the connection is closed.
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n")
        async with asyncio.timeout(5):
            assert b"101" not in await reader.read()
        writer.close()
        # A client that connects and says nothing is dropped at the open timeout.
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        async with asyncio.timeout(5):
            assert await reader.read() == b""
        writer.close()
        async with connect(srv.url, ssl=trusting(tls_files)) as feed:
            assert await feed.ping() > 0
            assert srv.sockets == 1
        # The failed handshakes were never counted as connections (they stayed counted).
        await eventually(lambda: srv.sockets == 0, "the last connection to be counted out")


def test_a_certificate_that_cannot_be_loaded_stops_the_server_at_start(
    tmp_path: Path, tls_files: TlsFiles
) -> None:
    with pytest.raises(ConfigError, match="tls_key_file without tls_cert_file"):
        load_server_config(None, tls_key_file=str(tls_files.key))
    with pytest.raises(ConfigError, match="cannot load the TLS certificate"):
        load_server_config(None, tls_cert_file=str(tmp_path / "missing.pem"))
    # A certificate whose key is elsewhere, and not given.
    cert_only = tmp_path / "cert.pem"
    pem = tls_files.cert.read_text()
    cert_only.write_text(pem[pem.index("-----BEGIN CERTIFICATE-----") :])
    with pytest.raises(ConfigError, match="cannot load the TLS certificate"):
        load_server_config(None, tls_cert_file=str(cert_only))
    assert load_server_config(None, tls_cert_file=str(tls_files.cert)).tls_cert_file


def test_watch_says_when_its_cafile_cannot_be_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "ca.pem"
    assert watch_main(["trades:AAA", "--url", "wss://x/ws", "--cafile", str(missing)]) == 2
    assert f"cannot read --cafile {missing}" in capsys.readouterr().err


def issue(path: Path) -> ssl.SSLContext:
    """A certificate for localhost from a new CA, written to `path`; a context trusting it."""
    ca = trustme.CA()
    ca.issue_cert("localhost", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(path)
    return ssl.create_default_context(cadata=ca.cert_pem.bytes().decode())


async def test_a_reload_serves_a_renewed_certificate_to_new_connections_only(
    redis_server: RedisProcess, redis: RedisConnection, tmp_path: Path
) -> None:
    chain = tmp_path / "chain.pem"
    trust_old = issue(chain)
    async with (
        TickwireServer(replace(server_config(redis_server), tls_cert_file=str(chain))) as srv,
        connect(srv.url, ssl=trust_old) as kept,
    ):
        trust_new = issue(chain)  # renewed, here by another CA so that it shows
        assert srv.reload()
        async with connect(srv.url, ssl=trust_new) as fresh:
            assert await fresh.ping() > 0
        with pytest.raises(CertificateRefused):
            await connect(srv.url, ssl=trust_old)
        assert await kept.ping() > 0  # an open connection keeps its session
        chain.write_text("a renewal gone wrong")
        assert not srv.reload()
        async with connect(srv.url, ssl=trust_new) as again:  # the last good one kept
            assert await again.ping() > 0


async def test_tickwire_serve_with_tls_cert_serves_wss_from_every_worker_and_reloads_on_sighup(
    redis_server: RedisProcess, redis: RedisConnection, tmp_path: Path
) -> None:
    chain = tmp_path / "chain.pem"
    trust = issue(chain)
    server = ServerProcess(redis_server.url, workers=2, extra_args=["--tls-cert", str(chain)])
    proc = server.proc = start_group(server.command(), subprocess.DEVNULL)
    url = f"wss://localhost:{server.port}/ws"

    async def workers_serving(ctx: ssl.SSLContext) -> None:
        """Until each worker has served a connection that trusts only `ctx` (a worker that has
        not loaded that certificate yet refuses it; connections land on either worker)."""
        served: set[int] = set()
        async with asyncio.timeout(30):
            while len(served) < 2:
                assert proc.poll() is None, "tickwire serve exited"
                try:
                    async with connect(url, ssl=ctx, wait_for_server=True) as feed:
                        assert await feed.ping() > 0
                        served |= {w for w, n in server.connections_by_worker().items() if n}
                except CertificateRefused:
                    await asyncio.sleep(0.05)  # a worker still on the old one: ask again

    try:
        await workers_serving(trust)
        trust = issue(chain)
        proc.send_signal(signal.SIGHUP)  # the supervisor passes it on to each worker
        await workers_serving(trust)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 10) == 0
