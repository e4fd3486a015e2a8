"""Redis over TLS (`rediss://`): a feed and a server through a redis-server's TLS port, and each
way a TLS set-up goes wrong refused with a clear error (an unknown CA, another host's
certificate, a client certificate required, the plain port)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.cluster.conftest import check_feed_and_server
from tickwire.core.errors import RedisUnavailable
from tickwire.core.redis_process import RedisProcess, TlsFiles, redis_cli
from tickwire.core.redis_target import open_redis


@pytest.fixture(scope="module")
def tls_redis_process(tls_files: TlsFiles) -> Iterator[RedisProcess]:
    proc = RedisProcess(tls=tls_files).start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def tls_redis(tls_redis_process: RedisProcess) -> RedisProcess:
    """The module's TLS redis-server, emptied first (each test runs on both loops)."""
    redis_cli(tls_redis_process.port, "FLUSHALL")
    return tls_redis_process


def trusted(proc: RedisProcess, files: TlsFiles, host: str = "localhost", more: str = "") -> str:
    return proc.tls_url(host, f"ssl_ca_certs={files.ca}{more}")


async def ping(url: str, timeout: float = 5.0) -> bytes:
    conn = await open_redis(url, timeout)
    try:
        return bytes(await conn.execute("PING"))
    finally:
        conn.close()


def local_ports(proc: RedisProcess) -> set[int]:
    """The server ports of the clients connected to `proc`, but redis-cli's own."""
    ports = set()
    for line in redis_cli(proc.port, "CLIENT", "LIST").splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if fields.get("cmd") != "client|list":
            ports.add(int(fields["laddr"].rpartition(":")[2]))
    return ports


async def test_a_feed_and_a_server_run_over_tls(
    tls_redis: RedisProcess, tls_files: TlsFiles
) -> None:
    def on_the_tls_port_only() -> None:
        # Every connection of the feed and of the server came in on the TLS port.
        assert local_ports(tls_redis) == {tls_redis.tls_port}

    await check_feed_and_server(
        trusted(tls_redis, tls_files), ["TLS"], while_connected=on_the_tls_port_only
    )


async def test_a_certificate_from_an_unknown_ca_is_refused(
    tls_redis: RedisProcess, tls_files: TlsFiles
) -> None:
    with pytest.raises(RedisUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
        await ping(tls_redis.tls_url())  # the system's CAs only
    # Told to trust anyone (tests only), it connects, encrypted.
    assert await ping(tls_redis.tls_url(query="ssl_cert_reqs=none")) == b"PONG"


async def test_a_certificate_for_another_host_is_refused_unless_told(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    ca.issue_cert("cache.example").private_key_and_cert_chain_pem.write_to_path(tmp_path / "s.pem")
    files = TlsFiles(tmp_path / "ca.pem", tmp_path / "s.pem", tmp_path / "s.pem")
    with RedisProcess(tls=files) as other:
        with pytest.raises(RedisUnavailable, match="Hostname mismatch"):
            await ping(trusted(other, files))
        assert await ping(trusted(other, files, more="&ssl_check_hostname=false")) == b"PONG"


async def test_a_client_certificate_is_given_when_redis_requires_one(
    tls_redis: RedisProcess, tls_files: TlsFiles
) -> None:
    redis_cli(tls_redis.port, "CONFIG", "SET", "tls-auth-clients", "yes")
    try:
        with pytest.raises(RedisUnavailable):
            await ping(trusted(tls_redis, tls_files))
        mine = f"&ssl_certfile={tls_files.cert}&ssl_keyfile={tls_files.key}"
        assert await ping(trusted(tls_redis, tls_files, more=mine)) == b"PONG"
    finally:
        redis_cli(tls_redis.port, "CONFIG", "SET", "tls-auth-clients", "optional")


async def test_the_wrong_port_either_way_is_an_error_not_a_hang(
    tls_redis: RedisProcess, tls_files: TlsFiles
) -> None:
    plain_as_tls = f"rediss://localhost:{tls_redis.port}/0?ssl_ca_certs={tls_files.ca}"
    with pytest.raises(RedisUnavailable, match=r"timeout \(not a TLS port\?"):
        await ping(plain_as_tls, timeout=0.5)
    with pytest.raises(RedisUnavailable):
        await ping(f"redis://127.0.0.1:{tls_redis.tls_port}/0", timeout=0.5)
