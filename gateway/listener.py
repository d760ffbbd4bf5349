"""The proxy listener's connection handling: parser refusals as the gateway's JSON answers.

aiohttp answers a request its parser refuses with a text body that quotes the offending
bytes (possibly a caller's credentials) and then keeps reading the connection for up to
ten seconds. The proxy listener's handler names only the kind of problem, answers
400/414/431 in the gateway's JSON shape, and closes the connection at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
from collections.abc import Awaitable, Callable

from aiohttp import http_parser, web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_request import BaseRequest

from gateway.errors import GatewayError, HeaderFieldsTooLarge, MalformedRequest, UriTooLong
from gateway.handler import render_error
from gateway.logging import get_logger
from gateway.state import CLOSE_CONNECTION

log = get_logger("listener")

# Request-line and header limits, explicit so they are documented and tested (README,
# SECURITY.md). Past them the parser refuses the request before any handler runs, and
# _ProxyRequestHandler answers 414 or 431. The two sizes differ on purpose: llhttp tells
# which line overflowed only by the limit it reports.
MAX_LINE_SIZE = 8192
MAX_FIELD_SIZE = 8190
MAX_HEADERS = 100
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset
_HEADER_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+:(?!//)")


class _ProxyRequestHandler(web.RequestHandler):
    """The proxy listener's connection handler: refused requests get the gateway's JSON."""

    # Seconds a caller may accept no bytes of its answer (nginx's send_timeout); set by
    # _ProxyServer. The timer exists only while the transport's buffer is over its mark,
    # so an answer that goes out at once costs nothing.
    send_timeout: float = 30.0
    _send_timer: asyncio.TimerHandle | None = None
    _send_backlog = 0

    def pause_writing(self) -> None:
        """The caller stopped taking bytes: from now on it has `send_timeout` to take some."""
        super().pause_writing()
        self._arm_send_timer()

    def resume_writing(self) -> None:
        """The caller took enough bytes: no deadline."""
        super().resume_writing()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def connection_lost(self, exc: BaseException | None) -> None:
        """The connection is gone: so is any deadline."""
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        super().connection_lost(exc)

    def _arm_send_timer(self) -> None:
        transport = self.transport
        if transport is None:
            return
        self._send_backlog = transport.get_write_buffer_size()
        self._send_timer = self._loop.call_later(self.send_timeout, self._send_deadline)

    def _send_deadline(self) -> None:
        self._send_timer = None
        transport = self.transport
        if transport is None or not self._paused:
            return
        if transport.get_write_buffer_size() < self._send_backlog:
            self._arm_send_timer()  # it took some bytes: another period from now
            return
        # Reset, not closed: a close would leave the kernel flushing to a caller that reads
        # nothing (SO_LINGER 0 drops what it holds, as nginx's reset_timedout_connection).
        # Losing the connection cancels the handler, which frees its slot and aborts its
        # upstream exchange.
        log.warning("caller_send_timeout", seconds=self.send_timeout)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        transport.abort()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Parser refusals become 400/414/431 JSON answers that close the connection."""
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        error = _refusal(exc)
        # aiohttp's own answer and log line quote the offending bytes, which may hold a
        # caller's credentials; this one names only the kind of problem.
        log.warning("malformed_request", status=error.status, reason=type(exc).__name__)
        return render_error(error)

    async def finish_response(
        self, request: BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        """Send the answer; end the connection at once when the answer says so."""
        result = await super().finish_response(request, resp, start_time)
        if resp.status >= 400 and resp.get(CLOSE_CONNECTION):  # only refusals carry it
            # Without this aiohttp keeps reading ("lingering") up to 10 s to drain a body
            # whose framing was just refused, or the tunnel bytes after a CONNECT.
            self.force_close()
        return result


def _refusal(exc: HttpProcessingError) -> GatewayError:
    if isinstance(exc, LineTooLong):
        excerpt = exc.args[0] if exc.args and isinstance(exc.args[0], bytes | bytearray) else b""
        limit = exc.args[1] if len(exc.args) > 1 else None
        # Only the request line is checked against MAX_LINE_SIZE, except that the
        # pure-Python parser checks a header line that is still incomplete against it too;
        # its excerpt then starts with "name:".
        if limit == MAX_LINE_SIZE and not _HEADER_LINE.match(excerpt):
            return UriTooLong(f"the request line exceeds {MAX_LINE_SIZE} bytes")
        return HeaderFieldsTooLarge(f"a header field exceeds {MAX_FIELD_SIZE} bytes")
    if "too many headers" in exc.message.lower():
        return HeaderFieldsTooLarge(f"more than {MAX_HEADERS} header fields")
    return MalformedRequest("the request is not valid HTTP/1.1")


class _ProxyServer(web.Server):
    """Serves each proxy connection with _ProxyRequestHandler."""

    send_timeout = 30.0

    def __call__(self) -> web.RequestHandler:
        handler = _ProxyRequestHandler(self, loop=self._loop, **self._kwargs)
        handler.send_timeout = self.send_timeout
        return handler


def proxy_runner(
    handler: Callable[[BaseRequest], Awaitable[web.StreamResponse]],
    *,
    client_timeout: float,
    shutdown_timeout: float,
) -> web.ServerRunner:
    """The proxy listener: aiohttp's low-level server running `handler` for every request.

    No application, router or middleware chain: the handler is the whole of it.
    """
    server = _ProxyServer(
        handler,
        handler_cancellation=True,  # a caller that hangs up cancels its upstream exchange
        access_log=None,  # the handler writes the one line per request
        max_line_size=MAX_LINE_SIZE,
        max_field_size=MAX_FIELD_SIZE,
        max_headers=MAX_HEADERS,
        # aiohttp closes a connection that has not completed a request's headers within
        # the keep-alive timeout (counted from connect or the last answer): it is also the
        # slowloris header timeout.
        keepalive_timeout=client_timeout,
    )
    # A caller that accepts no bytes of its answer this long is cut off (nginx's send_timeout).
    server.send_timeout = client_timeout
    return web.ServerRunner(server, handle_signals=False, shutdown_timeout=shutdown_timeout)


def http_parser_in_use() -> str:
    """Which aiohttp HTTP parser serves: "c" (llhttp) or "python" (AIOHTTP_NO_EXTENSIONS=1)."""
    # Chosen at import time; logged because the two differ in what they accept.
    c_parser = getattr(http_parser, "HttpRequestParserC", None)
    return "c" if http_parser.HttpRequestParser is c_parser else "python"
