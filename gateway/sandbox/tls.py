"""A throwaway certificate authority and a loopback server certificate, made at start.

The CA's private key lives only in memory and is dropped once it has signed the one
server certificate, so trusting the CA file trusts nothing else. Blocking (key
generation and file I/O): call it before the event loop runs or in a worker thread.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = datetime.timedelta(days=30)
# Clocks of the two ends may differ a little even on one machine (VMs, containers).
BACKDATE = datetime.timedelta(minutes=5)


@dataclass(frozen=True, slots=True)
class ServerTLS:
    """The CA certificate file clients pin, and the server's TLS context."""

    ca_file: Path
    context: ssl.SSLContext
    # The server certificate and its key as files (0600), when asked for: the gateway's
    # proxy listener reads them (CIGW_TLS_CERT_FILE, CIGW_TLS_KEY_FILE).
    cert_file: Path | None = None
    key_file: Path | None = None


def create_server_tls(directory: Path, *, keep_pair: bool = False) -> ServerTLS:
    """Write `ca.pem` into `directory` and return a server context for 127.0.0.1/localhost;
    with `keep_pair`, also `server.crt` and `server.key` for another server to load."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, f"ci-gateway sandbox CA {now:%Y-%m-%d %H:%M}")]
    )
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        _builder(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]),
            ca_name,
            server_key.public_key(),
            now,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_file = directory / "ca.pem"
    write_private(ca_file, ca_cert.public_bytes(serialization.Encoding.PEM))

    # ssl loads a certificate chain only from files: write key and certificate privately,
    # load them, and delete the file at once.
    chain_file = directory / "server.pem"
    write_private(
        chain_file,
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        + server_cert.public_bytes(serialization.Encoding.PEM),
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(chain_file)
    finally:
        chain_file.unlink()
    if not keep_pair:
        return ServerTLS(ca_file, context)
    cert_file, key_file = directory / "server.crt", directory / "server.key"
    write_private(cert_file, server_cert.public_bytes(serialization.Encoding.PEM))
    write_private(
        key_file,
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    return ServerTLS(ca_file, context, cert_file, key_file)


def write_private(path: Path, data: bytes) -> None:
    """Replace `path` atomically with `data`, readable by the owner only (0600).

    Atomic so that a reader polling the file (the gateway's key watch) never sees it
    half-written; Kubernetes swaps a mounted Secret's symlink for the same reason.
    """
    staging = path.with_name(f".{path.name}.new")
    descriptor = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
    staging.replace(path)


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    now: datetime.datetime,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )
