"""Opening an upstream connection through the egress proxy.

An https upstream is reached through a `CONNECT host:port` tunnel (RFC 9110 §9.3.6): TLS
runs inside it, end to end with the upstream, its name checked against the upstream's
certificate and sent as SNI; the proxy sees only the host and port. An http upstream is
reached by a plain connection to the proxy, and the upstream client writes absolute-form
request targets (RFC 9112 §3.2.2) with the proxy's credentials on each request.

Every failure names the proxy, so an operator looks at the right machine: a proxy that
cannot be reached, or that answers CONNECT with anything but 2xx (its status is named),
is a 502 upstream_unreachable.
"""

from __future__ import annotations

import asyncio
import http
import os
import re
import socket
import ssl
from collections.abc import Callable
from typing import Final, TypeVar

from gateway.egress import ProxyServer
from gateway.errors import UpstreamTimeout, UpstreamUnreachable

MAX_CONNECT_ANSWER: Final = 16 * 1024  # a CONNECT answer's head; proxies send a few lines
_STATUS_LINE: Final = re.compile(rb"HTTP/1\.[01] (\d{3})(?:[ \t][^\r\n]*)?")

ProtocolT = TypeVar("ProtocolT", bound=asyncio.Protocol)


def authority(host: str, port: int) -> str:
    """host:port as a request target or Host value, an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def connect_request(proxy: ProxyServer, host: str, port: int) -> bytes:
    """The CONNECT request for `host:port`, with the proxy's credentials when it has some."""
    target = authority(host, port)
    credentials = proxy.authorization()
    auth = f"Proxy-Authorization: {credentials}\r\n" if credentials else ""
    return f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n".encode("ascii")


async def open_through_proxy(
    factory: Callable[[], ProtocolT],
    proxy: ProxyServer,
    *,
    host: str,
    port: int,
    tls: ssl.SSLContext | None,
    connect_timeout: float,
) -> ProtocolT:
    """A connection to `host:port` through `proxy`: a CONNECT tunnel with TLS, or plain TCP.

    Without `tls` the connection goes to the proxy itself (the caller writes absolute-form
    targets). Raises UpstreamUnreachable or UpstreamTimeout naming the proxy.
    """
    opening = _Opening(proxy, host, port)
    try:
        async with asyncio.timeout(connect_timeout):
            return await opening.run(factory, tls)
    except TimeoutError:
        opening.abort()
        raise UpstreamTimeout(f"{opening.step} timed out") from None
    except UpstreamUnreachable:
        opening.abort()
        raise
    except ssl.SSLCertVerificationError:
        opening.abort()
        raise UpstreamUnreachable(
            f"the upstream's TLS certificate is not trusted (through the egress proxy "
            f"{proxy.address})"
        ) from None
    except ssl.SSLError as exc:
        opening.abort()
        raise UpstreamUnreachable(
            f"TLS handshake with the upstream through the egress proxy {proxy.address} failed "
            f"({exc.reason or 'protocol error'})"
        ) from None
    except _TunnelClosed as exc:
        opening.abort()
        raise UpstreamUnreachable(f"{opening.step}: {exc}") from None
    except OSError as exc:
        opening.abort()
        if isinstance(exc, socket.gaierror):
            reason = f"cannot resolve {proxy.host}"
        else:
            reason = os.strerror(exc.errno) if exc.errno else "connection failed"
        raise UpstreamUnreachable(
            f"cannot connect to the egress proxy {proxy.address} ({reason})"
        ) from None


class _Opening:
    """One connection being opened through the proxy: its step (for messages), its socket."""

    def __init__(self, proxy: ProxyServer, host: str, port: int) -> None:
        self.proxy, self.host, self.port = proxy, host, port
        self.step = f"connecting to the egress proxy {proxy.address}"
        self.transport: asyncio.BaseTransport | None = None

    async def run(self, factory: Callable[[], ProtocolT], tls: ssl.SSLContext | None) -> ProtocolT:
        loop = asyncio.get_running_loop()
        proxy = self.proxy
        if tls is None:
            _, protocol = await loop.create_connection(factory, proxy.host, proxy.port)
            return protocol
        self.transport, answer = await loop.create_connection(
            _ConnectAnswer, proxy.host, proxy.port
        )
        self.step = f"waiting for the egress proxy {proxy.address} to open a tunnel"
        answer.send(connect_request(proxy, self.host, self.port))
        status = await answer.status
        if not 200 <= status < 300:
            raise UpstreamUnreachable(
                f"the egress proxy {proxy.address} refused the tunnel to "
                f"{authority(self.host, self.port)}: {_status_text(status)}"
            )
        self.step = f"the TLS handshake with the upstream through the egress proxy {proxy.address}"
        protocol = factory()
        secure = await loop.start_tls(
            self.transport,
            protocol,
            tls,
            server_hostname=self.host,
        )
        if secure is None:  # only for a transport closed under it
            raise _TunnelClosed("it closed the tunnel")
        # A client-side start_tls does not call connection_made on the new protocol.
        protocol.connection_made(secure)
        return protocol

    def abort(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.abort()  # type: ignore[attr-defined] # stream transports can abort


def _status_text(status: int) -> str:
    # The standard phrase, never the proxy's own reason text (it could say anything).
    try:
        return f"{status} {http.HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


class _TunnelClosed(ConnectionError):
    """The proxy ended the connection or answered something that is not HTTP."""


class _ConnectAnswer(asyncio.Protocol):
    """Reads the proxy's answer to CONNECT: its head only; no byte may follow a 2xx."""

    def __init__(self) -> None:
        self.status: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()

    def send(self, request: bytes) -> None:
        assert self._transport is not None  # noqa: S101 - create_connection made it
        self._transport.write(request)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment] # a stream transport

    def data_received(self, data: bytes) -> None:
        if self.status.done():
            # Bytes after the answer, before our TLS ClientHello: not a tunnel we can trust.
            self._fail("the egress proxy sent bytes after its CONNECT answer")
            return
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_CONNECT_ANSWER:
                self._fail("the egress proxy's CONNECT answer is too large")
            return
        match = _STATUS_LINE.fullmatch(bytes(self._buffer[: self._buffer.find(b"\r\n")]))
        if match is None:
            self._fail("the egress proxy's answer to CONNECT is not HTTP")
            return
        status = int(match.group(1))
        if 200 <= status < 300 and len(self._buffer) > end + 4:
            self._fail("the egress proxy sent bytes after its CONNECT answer")
            return
        self.status.set_result(status)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.status.done():
            self.status.set_exception(_TunnelClosed("it closed the connection"))

    def _fail(self, message: str) -> None:
        if not self.status.done():
            self.status.set_exception(_TunnelClosed(message))
        if self._transport is not None:
            self._transport.abort()
