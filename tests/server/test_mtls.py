"""Client certificates as credentials (`[auth] tls_client_ca_file`): a certificate from the client
CA whose common name the key file grants is let in with that grant; one it does not name is
refused (401), one from another CA fails the handshake, a token is taken before a certificate,
and a reload that drops the name closes the connection as a revoked key does."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme
import websockets

from tickwire.core.config import AuthConfig, ServerConfig, load_server_config
from tickwire.core.errors import ConfigError
from tickwire.core.redis_process import RedisProcess, TlsFiles
from tickwire.core.redis_wire import RedisConnection
from tickwire.server.app import TickwireServer

from .conftest import recorder
from .test_security import KEY_QUOTES, key_line, wait_closed


@pytest.fixture
def identities(
    tmp_path: Path, tls_files: TlsFiles
) -> Callable[[str, trustme.CA | None], ssl.SSLContext]:
    """A client CA (written to `clients-ca.pem`), and a maker of client contexts: trusting the
    server, presenting a certificate for a common name from that CA (or from `other`)."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(tmp_path / "clients-ca.pem")

    def make(common_name: str, other: trustme.CA | None = None) -> ssl.SSLContext:
        cert = (other or ca).issue_cert(f"{common_name}.clients.example", common_name=common_name)
        ctx = ssl.create_default_context(cafile=str(tls_files.ca))
        cert.configure_cert(ctx)
        return ctx

    return make


@pytest.fixture
def mtls_config(
    redis_server: RedisProcess, redis: RedisConnection, tls_files: TlsFiles, tmp_path: Path
) -> Callable[[str], ServerConfig]:
    """A maker of the config of a server on the session's Redis (emptied) that serves TLS and
    takes certificates from the client CA, its key file (`tmp_path/keys`) holding `keys`."""

    def make(keys: str) -> ServerConfig:
        (tmp_path / "keys").write_text(keys)
        auth = AuthConfig(
            api_keys_file=str(tmp_path / "keys"),
            tls_client_ca_file=str(tmp_path / "clients-ca.pem"),
        )
        return ServerConfig(
            redis_url=redis_server.url,
            port=0,
            heartbeat_ms=60_000,
            tls_cert_file=str(tls_files.cert),
            auth=auth,
        )

    return make


async def test_a_client_certificate_named_in_the_key_file_is_a_credential(
    mtls_config: Callable[[str], ServerConfig],
    identities: Callable[[str, trustme.CA | None], ssl.SSLContext],
) -> None:
    keys = "cn:desk-a desk-a trades:*\n" + key_line(KEY_QUOTES, "quotes", "quotes:*")
    async with TickwireServer(mtls_config(keys)) as srv:
        desk_a = identities("desk-a", None)
        async with recorder(srv.url, ssl=desk_a) as rec:
            assert rec.of_type("welcome")[0]["entitlements"] == ["trades:*"]
            assert (await rec.request("subscribe", channels=["trades:AAA"]))["type"] == "subscribed"
            refused = await rec.request("subscribe", channels=["quotes:*"])
            assert (refused["type"], refused["code"]) == ("error", "forbidden")
        # A token is taken before the certificate.
        bearer = {"Authorization": f"Bearer {KEY_QUOTES}"}
        async with recorder(srv.url, ssl=desk_a, additional_headers=bearer) as rec:
            assert rec.of_type("welcome")[0]["entitlements"] == ["quotes:*"]
        # From the client CA, but no line names it.
        with pytest.raises(websockets.InvalidStatus) as info:
            async with recorder(srv.url, ssl=identities("mallory", None)):
                pass
        assert info.value.response.status_code == 401
        # From another CA: the server's side of the TLS handshake fails (in TLS 1.3 the client
        # sees it as the connection ending before the HTTP answer).
        with pytest.raises((OSError, websockets.InvalidMessage)):
            async with recorder(srv.url, ssl=identities("desk-a", trustme.CA())):
                pass


async def test_a_reload_that_drops_a_certificates_line_closes_its_connections(
    mtls_config: Callable[[str], ServerConfig],
    identities: Callable[[str, trustme.CA | None], ssl.SSLContext],
    tmp_path: Path,
) -> None:
    keys = "cn:desk-a desk-a trades:*\ncn:desk-b desk-b trades:*\n"
    async with (
        TickwireServer(mtls_config(keys)) as srv,
        recorder(srv.url, ssl=identities("desk-a", None)) as revoked,
        recorder(srv.url, ssl=identities("desk-b", None)) as kept,
    ):
        (tmp_path / "keys").write_text("cn:desk-b desk-b trades:*\n")
        assert srv.reload()
        assert await wait_closed(revoked) == (4001, "credentials revoked")
        assert (await kept.request("ping"))["type"] == "pong"


def test_client_certificates_need_tls_served_here_and_a_key_file(tls_files: TlsFiles) -> None:
    ca = str(tls_files.ca)
    with pytest.raises(ConfigError, match="tls_client_ca_file needs tls_cert_file"):
        load_server_config(None, auth={"tls_client_ca_file": ca, "api_keys_file": "/k"})
    with pytest.raises(ConfigError, match="tls_client_ca_file needs"):
        load_server_config(None, tls_cert_file=str(tls_files.cert), auth={"tls_client_ca_file": ca})
