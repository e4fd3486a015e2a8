"""Client certificates as credentials (`[auth] tls_client_ca_file`): a certificate from the client
CA whose common name the key file grants is let in with that grant; one it does not name is
refused (401), one from another CA fails the handshake, a token is taken before a certificate,
and a reload that drops the name closes the connection as a revoked key does; so do a client CRL
(`tls_client_crl_file`) and a reload that revokes a certificate."""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

import pytest
import trustme
import websockets
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from tests.conftest import eventually
from tickwire.clients import AuthenticationFailed, ConnectFailed, connect
from tickwire.clients.watch import main as watch_main
from tickwire.core.config import AuthConfig, ServerConfig, load_server_config
from tickwire.core.errors import ConfigError
from tickwire.core.redis_process import RedisProcess, TlsFiles
from tickwire.core.redis_wire import RedisConnection
from tickwire.server.app import TickwireServer
from tickwire.server.auth import ApiKeys, Authenticator

from .conftest import recorder
from .test_security import KEY_QUOTES, key_line, wait_closed


class Identities:
    """A client CA (written to `clients-ca.pem`), client contexts with certificates from it, and
    its revocation lists."""

    def __init__(self, directory: Path, server_ca: Path) -> None:
        self.ca = trustme.CA()
        self.ca.cert_pem.write_to_path(directory / "clients-ca.pem")
        self._server_ca = server_ca

    def __call__(self, common_name: str, other: trustme.CA | None = None) -> ssl.SSLContext:
        """A context trusting the server that presents a certificate for `common_name` from
        the client CA (or from `other`)."""
        return self.issue(common_name, other)[0]

    def issue(
        self, common_name: str, other: trustme.CA | None = None
    ) -> tuple[ssl.SSLContext, int]:
        """As calling it, with the certificate's serial number."""
        host = re.sub(r"[^a-z0-9-]+", "-", common_name.lower())
        cert = (other or self.ca).issue_cert(f"{host}.clients.example", common_name=common_name)
        ctx = ssl.create_default_context(cafile=str(self._server_ca))
        cert.configure_cert(ctx)
        serial = x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes()).serial_number
        return ctx, serial

    def write(self, common_name: str, directory: Path) -> tuple[Path, Path]:
        """A certificate for `common_name` from the client CA and its key, as files."""
        cert = self.ca.issue_cert("watch.clients.example", common_name=common_name)
        cert_file, key_file = directory / f"{common_name}.pem", directory / f"{common_name}.key"
        cert.cert_chain_pems[0].write_to_path(cert_file)
        cert.private_key_pem.write_to_path(key_file)
        return cert_file, key_file

    def write_crl(
        self,
        path: Path,
        revoked: Sequence[int] = (),
        *,
        ca: trustme.CA | None = None,
        valid_for: timedelta = timedelta(days=1),
    ) -> Path:
        """A CRL of the client CA (or `ca`) revoking the serials `revoked`, at `path`."""
        ca = ca or self.ca
        key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
        issuer = x509.load_pem_x509_certificate(ca.cert_pem.bytes()).subject
        now = datetime.now(UTC)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(issuer)
            .last_update(now - timedelta(days=2))
            .next_update(now + valid_for)
        )
        for serial in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(now - timedelta(minutes=1))
                .build()
            )
        crl = builder.sign(key, hashes.SHA256())  # type: ignore[arg-type]
        path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        return path


@pytest.fixture
def identities(tmp_path: Path, tls_files: TlsFiles) -> Identities:
    return Identities(tmp_path, tls_files.ca)


class MakeConfig(Protocol):
    def __call__(self, keys: str, crl: Path | None = None) -> ServerConfig: ...


@pytest.fixture
def mtls_config(
    redis_server: RedisProcess, redis: RedisConnection, tls_files: TlsFiles, tmp_path: Path
) -> MakeConfig:
    """A maker of the config of a server on the session's Redis (emptied) that serves TLS and
    takes certificates from the client CA, its key file (`tmp_path/keys`) holding `keys`, and
    the CRL file `crl` if given."""

    def make(keys: str, crl: Path | None = None) -> ServerConfig:
        (tmp_path / "keys").write_text(keys)
        auth = AuthConfig(
            api_keys_file=str(tmp_path / "keys"),
            tls_client_ca_file=str(tmp_path / "clients-ca.pem"),
            tls_client_crl_file=str(crl or ""),
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
    mtls_config: MakeConfig,
    identities: Identities,
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
        # The client library cannot tell why (the server's TLS sends no alert) and retries,
        # but it says what may be the cause.
        with pytest.raises(ConnectFailed, match="may have refused it"):
            await connect(srv.url, ssl=identities("desk-a", trustme.CA()))


async def test_a_reload_that_drops_a_certificates_line_closes_its_connections(
    mtls_config: MakeConfig,
    identities: Identities,
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


async def test_a_common_name_with_spaces_is_written_percent_encoded(
    mtls_config: MakeConfig, identities: Identities
) -> None:
    keys = "cn:Desk%20A%20%231 desk-a trades:*  # Desk A #1\n"
    async with TickwireServer(mtls_config(keys)) as srv:
        async with recorder(srv.url, ssl=identities("Desk A #1")) as rec:
            assert rec.of_type("welcome")[0]["entitlements"] == ["trades:*"]
        with pytest.raises(websockets.InvalidStatus) as info:
            async with recorder(srv.url, ssl=identities("Desk A")):
                pass
        assert info.value.response.status_code == 401
    with pytest.raises(ConfigError, match="keys:1: the common name's %-escapes are not UTF-8"):
        ApiKeys.parse("cn:desk%ff desk trades:*\n", "keys")


def test_client_certificates_need_tls_served_here_and_a_key_file(tls_files: TlsFiles) -> None:
    ca = str(tls_files.ca)
    with pytest.raises(ConfigError, match="tls_client_ca_file needs tls_cert_file"):
        load_server_config(None, auth={"tls_client_ca_file": ca, "api_keys_file": "/k"})
    with pytest.raises(ConfigError, match="tls_client_ca_file needs"):
        load_server_config(None, tls_cert_file=str(tls_files.cert), auth={"tls_client_ca_file": ca})


async def test_a_revoked_client_certificate_is_refused_and_a_reload_closes_its_connections(
    mtls_config: MakeConfig, identities: Identities, tmp_path: Path
) -> None:
    keys = "cn:desk-a desk-a trades:*\n" + key_line(KEY_QUOTES, "quotes", "quotes:*")
    revoked_first, serial_first = identities.issue("desk-a")
    revoked_later, serial_later = identities.issue("desk-a")
    kept_until_last, serial_kept = identities.issue("desk-a")
    crl = identities.write_crl(tmp_path / "clients-crl.pem", [serial_first])
    async with TickwireServer(mtls_config(keys, crl)) as srv:
        # The name is granted; the CRL revokes this one certificate of it: 401, which the
        # client library takes as final, with the server's reason.
        with pytest.raises(AuthenticationFailed, match=r"HTTP 401: client certificate revoked"):
            await connect(srv.url, ssl=revoked_first)
        async with (
            recorder(srv.url, ssl=revoked_later) as closed,
            recorder(srv.url, ssl=kept_until_last) as kept,
        ):
            # A CRL that cannot be used is refused whole: the previous one stays.
            crl.write_text("not a CRL\n")
            assert not srv.reload()
            assert (await closed.request("ping"))["type"] == "pong"
            # Revoked since: its open connection closes, the other certificate of the same
            # name stays, and it can no longer connect.
            identities.write_crl(crl, [serial_first, serial_later])
            assert srv.reload()
            assert await wait_closed(closed) == (4001, "credentials revoked")
            assert (await kept.request("ping"))["type"] == "pong"
            with pytest.raises(websockets.InvalidStatus) as info:
                async with recorder(srv.url, ssl=revoked_later):
                    pass
            assert info.value.response.status_code == 401
            # A reload leaves the kept connection's certificate checked at the next one too.
            identities.write_crl(crl, [serial_first, serial_later, serial_kept])
            assert srv.reload()
            assert await wait_closed(kept) == (4001, "credentials revoked")
        # A token is taken before a certificate, revoked or not.
        async with recorder(
            srv.url, ssl=revoked_first, additional_headers={"Authorization": f"Bearer {KEY_QUOTES}"}
        ) as rec:
            assert rec.of_type("welcome")[0]["entitlements"] == ["quotes:*"]


def test_an_unusable_crl_is_a_config_error(identities: Identities, tmp_path: Path) -> None:
    ca_file = str(tmp_path / "clients-ca.pem")
    (tmp_path / "keys").write_text("cn:desk-a desk-a trades:*\n")

    def check(crl: Path, ca: str = ca_file) -> None:
        auth = AuthConfig(
            api_keys_file=str(tmp_path / "keys"),
            tls_client_ca_file=ca,
            tls_client_crl_file=str(crl),
        )
        Authenticator(auth)

    good = identities.write_crl(tmp_path / "good.pem", [12345])
    check(good)
    with pytest.raises(ConfigError, match="tls_client_crl_file needs tls_client_ca_file"):
        load_server_config(None, auth={"tls_client_crl_file": str(good)})
    with pytest.raises(ConfigError, match="cannot read the client CRL"):
        check(tmp_path / "missing.pem")
    (tmp_path / "empty.pem").write_bytes(identities.ca.cert_pem.bytes())
    with pytest.raises(ConfigError, match="holds no CRL"):
        check(tmp_path / "empty.pem")
    other = trustme.CA()
    with pytest.raises(ConfigError, match="is not signed by a client CA"):
        check(identities.write_crl(tmp_path / "other.pem", ca=other))
    with pytest.raises(ConfigError, match="expired at"):
        check(identities.write_crl(tmp_path / "old.pem", valid_for=timedelta(days=-1)))
    # Two client CAs, each with its CRL in one file.
    both = tmp_path / "two-cas.pem"
    both.write_bytes(identities.ca.cert_pem.bytes() + other.cert_pem.bytes())
    both_crls = tmp_path / "both-crls.pem"
    both_crls.write_bytes(good.read_bytes() + (tmp_path / "other.pem").read_bytes())
    check(both_crls, str(both))


async def test_tickwire_watch_presents_a_client_certificate(
    mtls_config: MakeConfig,
    identities: Identities,
    tls_files: TlsFiles,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    granted = identities.write("desk-a", tmp_path)
    ungranted = identities.write("mallory", tmp_path)
    async with TickwireServer(mtls_config("cn:desk-a desk-a trades:*\n")) as srv:

        def run(*args: str) -> int:
            return watch_main(
                ["trades:AAA", "--url", srv.url, "--cafile", str(tls_files.ca), *args]
            )

        # The watch runs until told to go: what it asks for is seen from the server's side.
        watching = asyncio.create_task(
            asyncio.to_thread(run, "--json", "--cert", str(granted[0]), "--key", str(granted[1]))
        )
        await eventually(
            lambda: any(c.session.subscriptions for c in srv.connections), "the watch's subscribe"
        )
        (conn,) = srv.connections
        assert conn.session.grant is not None and conn.session.grant.subject == "desk-a"
        conn.close_soon(4003, "done")
        assert await watching == 1
        assert "closed the connection: 4003 done" in capsys.readouterr().err
        # Refused by name: the certificate was presented (without one, the server would let the
        # connection in and wait for an auth message).
        assert (
            await asyncio.to_thread(run, "--cert", str(ungranted[0]), "--key", str(ungranted[1]))
            == 1
        )
        assert "refused the credentials (HTTP 401: client certificate not granted" in (
            capsys.readouterr().err
        )
    assert watch_main(["trades:AAA", "--key", str(granted[1])]) == 2
    assert "--key needs --cert" in capsys.readouterr().err
    assert watch_main(["trades:AAA", "--cert", str(granted[1])]) == 2
    assert f"cannot load --cert {granted[1]}" in capsys.readouterr().err
