"""TLS contexts: to Redis (`rediss://` and its options) and for the server's own `wss://`.

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
class RedisTls:
    ca_certs: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    verify: bool = True
    check_hostname: bool = True

    @classmethod
    def from_options(cls, options: Mapping[str, str], shown: str) -> RedisTls:
        """From a URL's `ssl_*` options (`shown`: the URL as errors name it). The context is
        made here once, so a missing or unreadable file is a ConfigError at start, not a
        connect that fails and is retried for ever."""
        reqs = options.get("ssl_cert_reqs", "required").lower()
        if reqs not in ("required", "none"):
            raise ConfigError(f"ssl_cert_reqs must be required or none, not {reqs!r}, in {shown}")
        check = options.get("ssl_check_hostname", "true").lower()
        if check not in _TRUTH:
            raise ConfigError(
                f"ssl_check_hostname must be true or false, not {check!r}, in {shown}"
            )
        certfile, keyfile = options.get("ssl_certfile"), options.get("ssl_keyfile")
        if keyfile and not certfile:
            raise ConfigError(f"ssl_keyfile without ssl_certfile in {shown}")
        tls = cls(
            ca_certs=options.get("ssl_ca_certs") or None,
            certfile=certfile or None,
            keyfile=keyfile or None,
            verify=reqs == "required",
            check_hostname=_TRUTH[check] and reqs == "required",
        )
        try:
            tls.context()
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot set up TLS for {shown}: {exc}") from None
        return tls

    def context(self) -> ssl.SSLContext:
        return _context(self)


@functools.cache
def _context(tls: RedisTls) -> ssl.SSLContext:
    """One context per set of options: loading the trust store costs milliseconds, and every
    connection of a cluster, each reconnect, shares it."""
    return client_context(tls.ca_certs, tls.certfile, tls.keyfile, tls.verify, tls.check_hostname)


def client_context(
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    verify: bool = True,
    check_hostname: bool = True,
) -> ssl.SSLContext:
    """A client's context: trusting `ca_file` (None: the system's CAs), presenting `cert_file`
    (its key in `key_file` or in the same file) when the server asks for a certificate.
    Raises OSError or ValueError (ssl.SSLError) when a file cannot be loaded."""
    ctx = ssl.create_default_context(cafile=ca_file)
    ctx.check_hostname = check_hostname and verify
    if not verify:
        ctx.verify_mode = ssl.CERT_NONE
    if cert_file:
        ctx.load_cert_chain(cert_file, key_file or None)
    return ctx


def server_context(cert_file: str, key_file: str = "") -> ssl.SSLContext:
    """The context `tickwire serve` listens with for `wss://` and `https://`: the certificate
    chain in `cert_file` (PEM), its key in `key_file` or, if empty, in the same file. A file
    that cannot be read or a key that does not match is a ConfigError."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # WebSocket upgrades are HTTP/1.1: say so to clients that offer h2 first.
    ctx.set_alpn_protocols(["http/1.1"])
    try:
        ctx.load_cert_chain(cert_file, key_file or None)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise ConfigError(f"cannot load the TLS certificate {cert_file!r}: {exc}") from None
    return ctx
