"""Certificate pairs on disk for the HTTPS listener, and the two ways Kubernetes rotates them."""

from __future__ import annotations

import ssl
from pathlib import Path

import trustme


def write_pair(ca: trustme.CA, directory: Path, name: str = "tls") -> tuple[Path, Path, bytes]:
    """A fresh 127.0.0.1 certificate (chain) and key as files: (cert, key, leaf DER)."""
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    return cert, key, leaf_der(leaf)


def leaf_der(leaf: trustme.LeafCert) -> bytes:
    """The leaf certificate's DER bytes, as a TLS client sees the peer certificate."""
    return ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())


def replace_by_rename(ca: trustme.CA, cert: Path, key: Path) -> bytes:
    """Write a new pair beside the old and rename it into place (cert-manager's CSI driver)."""
    new_cert, new_key, der = write_pair(ca, cert.parent, "incoming")
    new_key.replace(key)
    new_cert.replace(cert)
    return der


class KubeletSecretVolume:
    """A Secret volume laid out as the kubelet does: files → ..data → a timestamped folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.generation = 0
        (root / "tls.crt").symlink_to("..data/tls.crt")
        (root / "tls.key").symlink_to("..data/tls.key")

    @property
    def cert(self) -> Path:
        """The certificate path a pod is given."""
        return self.root / "tls.crt"

    @property
    def key(self) -> Path:
        """The key path a pod is given."""
        return self.root / "tls.key"

    def publish(self, cert_pem: bytes, key_pem: bytes) -> None:
        """A new generation, swapped in atomically by renaming a new ..data symlink."""
        self.generation += 1
        folder = self.root / f"..gen_{self.generation}"
        folder.mkdir()
        (folder / "tls.crt").write_bytes(cert_pem)
        (folder / "tls.key").write_bytes(key_pem)
        staged = self.root / "..data_tmp"
        staged.symlink_to(folder.name)
        staged.replace(self.root / "..data")

    def publish_leaf(self, ca: trustme.CA) -> bytes:
        """Publish a fresh 127.0.0.1 pair from `ca`; its leaf DER."""
        leaf = ca.issue_cert("127.0.0.1", "localhost")
        self.publish(
            b"".join(blob.bytes() for blob in leaf.cert_chain_pems), leaf.private_key_pem.bytes()
        )
        return leaf_der(leaf)


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    """A client context trusting only `ca` (not the machine's SSL_CERT_FILE)."""
    context = ssl.create_default_context(cadata=ca.cert_pem.bytes().decode())
    context.set_alpn_protocols(["http/1.1"])
    return context


def key_canary(key_file: Path) -> str:
    """A base64 line from the middle of a PEM private key: it must appear in no output."""
    lines = key_file.read_text().splitlines()
    return lines[len(lines) // 2]
