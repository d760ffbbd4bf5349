"""Client certificates for the certificate-credential tests (Entra ID wants RSA)."""

from __future__ import annotations

import trustme
from cryptography.hazmat.primitives import serialization


def client_certificate(password: bytes) -> tuple[bytes, bytes]:
    """(PEM with the encrypted RSA key followed by its certificate, the certificate alone)."""
    issued = trustme.CA().issue_cert("ci-gateway.example", key_type=trustme.KeyType.RSA)
    key = serialization.load_pem_private_key(issued.private_key_pem.bytes(), None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(password),
    )
    certificate = issued.cert_chain_pems[0].bytes()
    return encrypted + certificate, certificate
