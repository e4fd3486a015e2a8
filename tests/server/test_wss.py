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

from tickwire.bench.harness import TICKWIRE, children, start_group
from tickwire.clients import CertificateRefused, Received, connect
from tickwire.clients.watch import main as watch_main
from tickwire.core.channels import Channel
from tickwire.core.config import PublisherConfig, ServerConfig, load_server_config
from tickwire.core.errors import ConfigError
from tickwire.core.events import encode_body
from tickwire.core.redis_process import RedisProcess, TlsFiles, free_port
from tickwire.core.redis_wire import RedisConnection
from tickwire.feeds.publisher import Publisher
from tickwire.server.app import TickwireServer

from .conftest import server_config

pytestmark = pytest.mark.uvloop_only

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


async def test_tickwire_serve_with_tls_cert_serves_wss_from_every_worker(
    redis_server: RedisProcess, redis: RedisConnection, tls_files: TlsFiles
) -> None:
    port = free_port()
    cmd = [TICKWIRE, "serve", "--redis", redis_server.url, "--port", str(port)]
    proc = start_group(
        [*cmd, "--workers", "2", "--tls-cert", str(tls_files.cert)], subprocess.DEVNULL
    )
    try:

        def serving() -> bool:
            url = f"https://localhost:{port}/healthz"
            try:
                with urllib.request.urlopen(url, context=trusting(tls_files), timeout=1) as r:
                    return r.status == 200 and len(children(proc.pid)) == 2
            except OSError:
                return False

        async with asyncio.timeout(30):
            while not await asyncio.to_thread(serving):
                assert proc.poll() is None, "tickwire serve exited at start"
                await asyncio.sleep(0.05)  # polling a child process: nothing to wait on
        # Each connection lands on either worker: several, so that both are likely asked.
        for _ in range(4):
            async with connect(f"wss://localhost:{port}/ws", ssl=trusting(tls_files)) as feed:
                assert await feed.ping() > 0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 10) == 0
