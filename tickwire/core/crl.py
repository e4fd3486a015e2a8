"""Certificate revocation lists of the client CAs: read and checked once, then asked whether a
client certificate is revoked."""

from __future__ import annotations

import contextlib
import datetime
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from tickwire.core.errors import ConfigError

_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.DOTALL)

#: A certificate as a CRL names it: its issuer's name (DER) and its serial number.
CertificateId = tuple[bytes, int]


def certificate_id(certificate_der: bytes) -> CertificateId:
    """The id of a certificate (DER, as `SSLObject.getpeercert(True)` gives it)."""
    cert = x509.load_der_x509_certificate(certificate_der)
    return cert.issuer.public_bytes(), cert.serial_number


@dataclass(frozen=True, slots=True)
class Revocations:
    """The certificates the CRLs of a file revoke."""

    revoked: frozenset[CertificateId]

    def revokes(self, certificate: CertificateId) -> bool:
        return certificate in self.revoked


def load_revocations(
    crl_file: str,
    ca_file: str,
    now: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC),
) -> Revocations:
    """The CRLs in `crl_file` (PEM, one or more), or a ConfigError: the file cannot be read or
    holds no CRL, a CRL is not signed by a CA of `ca_file` (it would revoke nothing that CA
    let in), or one is past its next update (what it leaves out may have been revoked since)."""
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
    revoked: set[CertificateId] = set()
    for crl in crls:
        issuer = crl.issuer.rfc4514_string()
        ca = next((c for c in cas if c.subject == crl.issuer), None)
        if ca is None or not _signed_by(crl, ca):
            raise ConfigError(f"the CRL of {issuer} in {crl_file!r} is not signed by a client CA")
        expiry = crl.next_update_utc
        if expiry is not None and expiry <= at:
            raise ConfigError(
                f"the CRL of {issuer} in {crl_file!r} expired at {expiry:%Y-%m-%d %H:%M} UTC: "
                "publish a current one"
            )
        revoked.update((crl.issuer.public_bytes(), r.serial_number) for r in crl)
    return Revocations(frozenset(revoked))


def _signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    key = ca.public_key()
    # A CA's key of a kind that cannot sign (say X25519) signed nothing.
    with contextlib.suppress(TypeError, ValueError):
        return crl.is_signature_valid(key)  # type: ignore[arg-type]
    return False
