"""TLS contexts: as a client (to Redis with `rediss://` and its options, to a broker) and for
the server's own `wss://`.

The `rediss://` option names are redis-py's, so a URL that works there works here:
`ssl_ca_certs` (a PEM file of the CAs to trust; default: the system's), `ssl_certfile` and
`ssl_keyfile` (a client certificate, for Redis's `tls-auth-clients yes`), `ssl_cert_reqs`
(`required`, the default, or `none`: encrypted but any certificate taken, for tests only) and
`ssl_check_hostname` (`true` by default: the certificate must name the host connected to).
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import Mapping
from dataclasses import dataclass

from tickwire.core.errors import ConfigError

#: The query options a `rediss://` URL takes.
TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname")

_TRUTH = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


@dataclass(frozen=True, slots=True)
class ClientTls:
    """TLS as a client (to Redis, to a broker): whom to trust (None: the system's CAs), the
    certificate to present if the server asks for one (its key in `key_file` or in the same
    file), and whether to check the certificate and the name it carries."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify: bool = True
    check_hostname: bool = True

    @classmethod
    def from_redis_options(cls, options: Mapping[str, str], shown: str) -> ClientTls:
        """From a `rediss://` URL's `ssl_*` options (`shown`: the URL as errors name it)."""
        reqs = options.get("ssl_cert_reqs", "required").lower()
        if reqs not in ("required", "none"):
            raise ConfigError(f"ssl_cert_reqs must be required or none, not {reqs!r}, in {shown}")
        check = options.get("ssl_check_hostname", "true").lower()
        if check not in _TRUTH:
            raise ConfigError(
                f"ssl_check_hostname must be true or false, not {check!r}, in {shown}"
            )
        tls = cls(
            ca_file=options.get("ssl_ca_certs") or None,
            cert_file=options.get("ssl_certfile") or None,
            key_file=options.get("ssl_keyfile") or None,
            verify=reqs == "required",
            check_hostname=_TRUTH[check] and reqs == "required",
        )
        return tls.checked(shown, "ssl_keyfile without ssl_certfile")

    def checked(self, where: str, key_alone: str) -> ClientTls:
        """Itself, once its context could be made: a missing or unreadable file is a
        ConfigError at start (`key_alone`: what to say of a key without a certificate), not a
        connect that fails and is retried for ever."""
        if self.key_file and not self.cert_file:
            raise ConfigError(f"{key_alone} in {where}")
        try:
            self.context()
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise ConfigError(f"cannot set up TLS for {where}: {exc}") from None
        return self

    def context(self) -> ssl.SSLContext:
        return _context(self)


@functools.cache
def _context(tls: ClientTls) -> ssl.SSLContext:
    """One context per set of options: loading the trust store costs milliseconds, and every
    connection of a cluster, each reconnect, shares it."""
    return client_context(tls.ca_file, tls.cert_file, tls.key_file, tls.verify, tls.check_hostname)


def client_context(
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    verify: bool = True,
    check_hostname: bool = True,
) -> ssl.SSLContext:
    """A new client context (`ClientTls.context` shares them). Raises OSError or ValueError
    (ssl.SSLError) when a file cannot be loaded."""
    ctx = ssl.create_default_context(cafile=ca_file)
    ctx.check_hostname = check_hostname and verify
    if not verify:
        ctx.verify_mode = ssl.CERT_NONE
    if cert_file:
        ctx.load_cert_chain(cert_file, key_file or None)
    return ctx


def server_context(cert_file: str, key_file: str = "", client_ca_file: str = "") -> ssl.SSLContext:
    """The context `tickwire serve` listens with for `wss://` and `https://`: the certificate
    chain in `cert_file` (PEM), its key in `key_file` or, if empty, in the same file. With
    `client_ca_file`, a client may present a certificate, which must come from that CA (one
    from elsewhere fails the handshake); without one it authenticates as it would otherwise.
    A file that cannot be read or a key that does not match is a ConfigError."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # WebSocket upgrades are HTTP/1.1: say so to clients that offer h2 first.
    ctx.set_alpn_protocols(["http/1.1"])
    try:
        ctx.load_cert_chain(cert_file, key_file or None)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise ConfigError(f"cannot load the TLS certificate {cert_file!r}: {exc}") from None
    if client_ca_file:
        try:
            ctx.load_verify_locations(cafile=client_ca_file)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load the client CA {client_ca_file!r}: {exc}") from None
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx
