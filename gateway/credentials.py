"""Loading client certificates into the shape MSAL expects.

Used by the configuration loader (to reject an unreadable certificate at start)
and by the token source (to build the MSAL credential).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes


class Secret:
    """A secret string that never shows itself in repr, str or format."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret value itself; call only where it is sent to its destination."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> str:
        raise TypeError("secrets are not picklable")


@dataclass(frozen=True, slots=True)
class CertificateCredential:
    """A private key and its certificate, ready for MSAL's client_credential dict."""

    private_key_pem: Secret = field(repr=False)
    thumbprint: str
    public_certificate: str

    def for_msal(self) -> dict[str, str]:
        """The dict MSAL's ConfidentialClientApplication takes as client_credential."""
        # No SHA-1 thumbprint: given the certificate, MSAL signs with PS256 and the SHA-256
        # thumbprint (x5t#S256), and sends x5c, which enables Entra ID's subject-name/issuer
        # validation so a renewed certificate needs no app-registration change.
        return {
            "private_key": self.private_key_pem.reveal(),
            "public_certificate": self.public_certificate,
        }


class CertificateError(ValueError):
    """The certificate file cannot be used; the message never contains key material."""


def load_certificate(path: Path, password: Secret | None) -> CertificateCredential:
    """Read a PEM (key + certificate) or PFX file into a credential."""
    # Imported here: cryptography (its own OpenSSL, ~8 MB resident) serves only
    # certificate credentials, and most pods use a secret or workload identity.
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    data = path.read_bytes()
    secret = password.reveal().encode() if password else None
    if b"-----BEGIN" in data:
        key, cert = _from_pem(data, secret)
    else:
        key, cert = _from_pfx(data, secret)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise CertificateError("Entra ID accepts only RSA certificate credentials")
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    # Entra ID identifies the certificate by its SHA-1 thumbprint (x5t), by protocol, not choice.
    thumbprint = hashlib.sha1(cert.public_bytes(serialization.Encoding.DER)).hexdigest()  # noqa: S324
    return CertificateCredential(Secret(key_pem), thumbprint.upper(), cert_pem)


def _from_pem(data: bytes, password: bytes | None) -> tuple[PrivateKeyTypes, x509.Certificate]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_private_key(data, password)
    except (ValueError, TypeError):
        raise CertificateError(
            "the PEM private key cannot be read (wrong or missing password, or no key in the file)"
        ) from None
    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError:
        raise CertificateError("the PEM file holds no certificate next to the key") from None
    return key, cert


def _from_pfx(data: bytes, password: bytes | None) -> tuple[PrivateKeyTypes, x509.Certificate]:
    from cryptography.hazmat.primitives.serialization import pkcs12

    try:
        key, cert, _ = pkcs12.load_key_and_certificates(data, password)
    except ValueError:
        raise CertificateError(
            "the file is neither PEM nor a PFX readable with the given password"
        ) from None
    if key is None or cert is None:
        raise CertificateError("the PFX file must hold both a private key and a certificate")
    return key, cert
