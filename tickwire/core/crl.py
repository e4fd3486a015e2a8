"""Certificate revocation lists for client certificates: read and checked once, loaded into the
server's TLS context, and matched against the certificates of connections already open."""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from tickwire.core.errors import ConfigError

_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.DOTALL)


@dataclass(frozen=True, slots=True)
class Revocations:
    """The CRLs of a file, one per client CA: the PEM as read (loaded into the TLS context as
    it was checked, whatever the file holds by then) and the certificates they revoke."""

    pem: bytes
    #: (issuer name as DER, serial number) of each revoked certificate.
    revoked: frozenset[tuple[bytes, int]]

    def revokes(self, certificate_der: bytes) -> bool:
        """Whether a certificate (DER, as `SSLObject.getpeercert(True)` gives it) is revoked."""
        cert = x509.load_der_x509_certificate(certificate_der)
        return (cert.issuer.public_bytes(), cert.serial_number) in self.revoked

    def load_into(self, ctx: ssl.SSLContext) -> None:
        """Have `ctx` refuse the revoked certificates in the handshake. OpenSSL reads CRLs from
        a file only (`cadata` takes certificates), so from a private copy of the checked PEM."""
        fd, path = tempfile.mkstemp(suffix=".pem")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(self.pem)
            ctx.load_verify_locations(cafile=path)
        finally:
            os.unlink(path)
        # The leaf only: a client CA's own revocation is its issuer's business.
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF


def load_revocations(
    crl_file: str,
    ca_file: str,
    now: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC),
) -> Revocations:
    """The CRLs in `crl_file` (PEM), each signed by a CA of `ca_file`, every CA of which must
    have one that is current. Anything else is a ConfigError now: OpenSSL, checking CRLs,
    refuses every certificate of a CA without a current CRL, and a handshake failure would be
    all the clients saw of it."""
    try:
        pem = Path(crl_file).read_bytes()
        cas = x509.load_pem_x509_certificates(Path(ca_file).read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the client CRL {crl_file!r}: {exc}") from None
    crls = []
    for block in _PEM_CRL.findall(pem):
        try:
            crls.append(x509.load_pem_x509_crl(block))
        except ValueError as exc:
            raise ConfigError(f"a CRL in {crl_file!r} cannot be read: {exc}") from None
    if not crls:
        raise ConfigError(f"{crl_file!r} holds no CRL (PEM, -----BEGIN X509 CRL-----)")
    at = now()
    covered: set[bytes] = set()
    revoked: set[tuple[bytes, int]] = set()
    for crl in crls:
        issuer = crl.issuer.rfc4514_string()
        ca = next((c for c in cas if c.subject == crl.issuer), None)
        if ca is None or not _signed_by(crl, ca):
            raise ConfigError(f"the CRL of {issuer} in {crl_file!r} is not signed by a client CA")
        expiry = crl.next_update_utc
        if expiry is not None and expiry <= at:
            raise ConfigError(
                f"the CRL of {issuer} in {crl_file!r} expired at {expiry:%Y-%m-%d %H:%M} UTC: "
                "OpenSSL would refuse every certificate of its CA"
            )
        covered.add(ca.subject.public_bytes())
        revoked.update((crl.issuer.public_bytes(), r.serial_number) for r in crl)
    missing = [c.subject.rfc4514_string() for c in cas if c.subject.public_bytes() not in covered]
    if missing:
        raise ConfigError(
            f"no CRL in {crl_file!r} for the client CA {', '.join(missing)}: OpenSSL would refuse "
            "every certificate it signed"
        )
    return Revocations(pem, frozenset(revoked))


def _signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    key = ca.public_key()
    # A CA's key of a kind that cannot sign (say X25519) signed nothing.
    with contextlib.suppress(TypeError, ValueError):
        return crl.is_signature_valid(key)  # type: ignore[arg-type]
    return False
