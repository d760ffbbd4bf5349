"""Client certificates for the certificate-credential tests (Entra ID wants RSA)."""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID


def self_signed_rsa(
    common_name: str = "ci-gateway test client",
) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    """A fresh RSA key and a self-signed certificate for it, valid for a day."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return key, certificate


def client_certificate(password: bytes | None) -> tuple[bytes, bytes]:
    """(PEM with the RSA key, encrypted if `password`, then its certificate; the certificate)."""
    key, certificate = self_signed_rsa()
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    certificate_pem = certificate.public_bytes(serialization.Encoding.PEM)
    return key_pem + certificate_pem, certificate_pem
