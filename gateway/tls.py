"""HTTPS on the proxy listener: a certificate pair that is re-read when its files change.

cert-manager and the kubelet rotate a mounted Secret by renaming a new file into place or
by swapping the `..data` symlink. The listener's context never changes; its SNI callback
(run for every ClientHello, with or without a server name) hands each new handshake the
newest context, so kept-alive connections keep the session they negotiated and new ones
see the new certificate, with no listener restart and no dropped connection.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from gateway.logging import get_logger

log = get_logger("tls")
# How often the files are compared with what is served: a rotation is seen within this.
POLL_SECONDS = 2.0


class TLSPairError(ValueError):
    """The certificate and key files do not make a usable server pair; says why."""


@dataclass(frozen=True, slots=True)
class TLSFiles:
    """The PEM certificate (chain allowed) and its private key."""

    cert_file: Path
    key_file: Path

    def fingerprint(self) -> str:
        """A digest of both files' contents as they are now (blocking reads)."""
        digest = hashlib.sha256()
        for path in (self.cert_file, self.key_file):
            # Content, not inode or mtime: a symlink swap changes neither of the link's.
            digest.update(path.read_bytes())
            digest.update(b"\x00")
        return digest.hexdigest()


def server_context(files: TLSFiles) -> ssl.SSLContext:
    """A server context for the pair: TLS 1.2 or newer, ALPN http/1.1 (blocking file I/O)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # HTTP/1.1 only: the listener speaks nothing else, and a client offering h2 must learn
    # that in the handshake rather than from a broken connection.
    context.set_alpn_protocols(["http/1.1"])
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        context.load_cert_chain(certfile=str(files.cert_file), keyfile=str(files.key_file))
    except ssl.SSLError as exc:
        # The reason only ("KEY_VALUES_MISMATCH", "PEM lib"): never the files' contents.
        raise TLSPairError(
            f"the certificate and key do not form a usable pair ({exc.reason or 'unreadable'})"
        ) from None
    except OSError as exc:
        raise TLSPairError(f"cannot be read ({exc.strerror})") from None
    return context


class ReloadingTLS:
    """The proxy listener's TLS: the newest good pair for every new handshake."""

    def __init__(
        self,
        files: TLSFiles,
        *,
        on_reload: Callable[[bool], None] | None = None,
        poll_seconds: float = POLL_SECONDS,
    ) -> None:
        self._files = files
        self._fingerprint = files.fingerprint()
        self._current = server_context(files)
        self._poll_seconds = poll_seconds
        self._on_reload = on_reload
        # The context the listener is built with; it only routes handshakes to _current.
        self.listener_context = server_context(files)
        self.listener_context.sni_callback = self._pick

    def _pick(self, connection: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
        connection.context = self._current

    async def reload(self) -> bool:
        """Take the files' pair if they changed and form a good one; True when swapped."""
        try:
            fingerprint = await asyncio.to_thread(self._files.fingerprint)
        except OSError as exc:
            # Mid-rotation a file can be missing for a moment: keep serving the old pair.
            log.error("tls_reload_failed", reason=f"cannot be read ({exc.strerror})")
            return False
        if fingerprint == self._fingerprint:
            return False
        self._fingerprint = fingerprint  # a bad pair is reported once, not on every poll
        try:
            context = await asyncio.to_thread(server_context, self._files)
        except TLSPairError as exc:
            log.error("tls_reload_failed", reason=str(exc), kept="previous certificate")
            if self._on_reload is not None:
                self._on_reload(False)
            return False
        self._current = context
        log.info("tls_certificate_reloaded", cert_file=str(self._files.cert_file))
        if self._on_reload is not None:
            self._on_reload(True)
        return True

    async def watch(self, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        """Poll the files until cancelled."""
        while True:
            await sleep(self._poll_seconds)
            await self.reload()
