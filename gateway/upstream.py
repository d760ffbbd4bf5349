"""The upstream client: keep-alive HTTP/1.1 connections to the one configured origin.

Why not aiohttp's ClientSession: per request it builds a URL, a request and a response
object, a connection wrapper, timers and trace hooks around aiohttp's own parser; the
benchmark's profile put it at a quarter of the gateway's time. Replacing it raised the
gateway's throughput by 44% and cut its CPU per request by a quarter (tests/perf/README.md).

Why it is safe to hand-write this much:
- it is bound to one origin when it is built; a request names only a path, so nothing
  a caller sends can point it at another host;
- answers are parsed by llhttp (httptools, the parser Node.js and uvicorn use) with no
  leniency: CR, bare LF, NUL or obs-fold in a field, Content-Length with
  Transfer-Encoding, two Content-Lengths all make the answer invalid (a 502);
- a request head holding CR or LF anywhere but its line ends is never sent.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Final, cast

import httptools
from multidict import CIMultiDict
from yarl import URL

from gateway.egress import ProxyServer
from gateway.errors import GatewayError, UpstreamTimeout, UpstreamUnreachable
from gateway.tunnel import open_through_proxy

IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
MAX_HEAD_BYTES: Final = 64 * 1024  # status line and header fields of one answer
MAX_FIELDS: Final = 100
MAX_FIELD_BYTES: Final = 8190
# Reading from the upstream pauses while this much of an answer waits for the caller.
_READ_HIGH_WATER: Final = 512 * 1024
_READ_LOW_WATER: Final = 128 * 1024
# Methods whose requests carry no body unless the caller sent one (aiohttp's choice too).
_BODYLESS: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "DELETE"})


class ClosedBeforeAnswer(UpstreamUnreachable):
    """The connection ended before a single byte of the answer arrived."""


class UpstreamClient:
    """Sends requests to one origin over a pool of kept-alive connections."""

    def __init__(
        self,
        origin: URL,
        *,
        tls: ssl.SSLContext | None,
        connect_timeout: float,
        read_timeout: float,
        max_idle: int = 100,
        idle_timeout: float = 30.0,
        monotonic: Callable[[], float] = time.monotonic,
        proxy: ProxyServer | None = None,
    ) -> None:
        if origin.host is None or origin.port is None:
            raise ValueError("the upstream origin needs a host")  # config.load checked it
        self._host, self._port = origin.host, origin.port
        self._host_line = f"\r\nHost: {origin.raw_authority}"
        self._tls = tls if origin.scheme == "https" else None
        # The egress proxy, if Settings.egress_for chose one. An https origin is tunnelled
        # (CONNECT); an http one is sent to the proxy in absolute form with its credentials.
        self._proxy = proxy
        self._target_prefix = ""
        self._proxy_lines = 0  # CRLFs the proxy's own header adds to every request head
        if proxy is not None and self._tls is None:
            self._target_prefix = f"http://{origin.raw_authority}"
            credentials = proxy.authorization()
            if credentials:
                self._host_line += f"\r\nProxy-Authorization: {credentials}"
                self._proxy_lines = 1
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self._max_idle, self._idle_timeout = max_idle, idle_timeout
        self._monotonic = monotonic
        self._idle: deque[_Connection] = deque()
        self._open: set[_Connection] = set()
        self._closing = False

    async def request(
        self,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: bytes | AsyncIterator[bytes] | None,
        length: int | None = None,
    ) -> Response:
        """Send one request (target: path and query) and return once the answer's head is in.

        A streamed `body` with no `length` goes chunked. Failures raise
        UpstreamUnreachable or UpstreamTimeout; what the body iterator raises passes
        through unchanged.
        """
        head = self._head(method, target, headers, body, length)
        connection = self._pooled()
        if connection is not None:
            try:
                return self._answered(await connection.exchange(method, head, body, length))
            except ClosedBeforeAnswer:
                # The upstream closed a kept-alive connection as this request went out
                # (RFC 9112 §9.3.1): sent again once, on a new connection, when that is safe.
                if method not in IDEMPOTENT or not isinstance(body, bytes | None):
                    raise
        connection = await self._connect()
        return self._answered(await connection.exchange(method, head, body, length))

    def _answered(self, response: Response) -> Response:
        """`response`, unless the egress proxy itself refused an absolute-form request."""
        if response.status == 407 and self._target_prefix and self._proxy is not None:
            # Only a proxy sends 407 (RFC 9110 §15.5.8); its other refusals (403, 502) look
            # like the upstream's own answers and are relayed as such (SECURITY.md).
            response.release()
            raise UpstreamUnreachable(
                f"the egress proxy {self._proxy.address} refused the request: "
                "407 Proxy Authentication Required"
            )
        return response

    async def close(self) -> None:
        """Close every connection (at shutdown, once no request is left)."""
        self._closing = True
        for connection in list(self._open):
            connection.close()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports run their close callbacks

    def _head(
        self,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: bytes | AsyncIterator[bytes] | None,
        length: int | None,
    ) -> bytes:
        fields = [f"\r\n{name}: {value}" for name, value in headers]
        if isinstance(body, bytes):
            framing = f"\r\nContent-Length: {len(body)}"
        elif body is None:
            framing = "" if method in _BODYLESS else "\r\nContent-Length: 0"
        elif length is None:
            framing = "\r\nTransfer-Encoding: chunked"
        else:
            framing = f"\r\nContent-Length: {length}"
        head = (
            f"{method} {self._target_prefix}{target} HTTP/1.1"
            f"{self._host_line}{''.join(fields)}{framing}\r\n\r\n"
        )
        # The head has exactly its own line ends: a CR or LF inside a target, name or value
        # would smuggle a header or a second request to the upstream. Counting them is
        # one pass in C instead of a check per field.
        line_ends = 1 + self._proxy_lines + len(fields) + (1 if framing else 0) + 2
        if head.count("\r") != line_ends or head.count("\n") != line_ends:
            raise GatewayError("a request header holds CR or LF; nothing was sent")
        return head.encode()

    def _pooled(self) -> _Connection | None:
        """The most recently used idle connection still open and fresh, if any."""
        idle = self._idle
        while idle:
            connection = idle.pop()
            if connection.closed:
                continue
            if self._monotonic() - connection.idle_since > self._idle_timeout:
                connection.close()
                continue
            return connection
        return None

    async def _connect(self) -> _Connection:
        if self._proxy is not None:
            return await open_through_proxy(
                lambda: _Connection(self),
                self._proxy,
                host=self._host,
                port=self._port,
                tls=self._tls,
                connect_timeout=self.connect_timeout,
            )
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, connection = await loop.create_connection(
                    lambda: _Connection(self),
                    self._host,
                    self._port,
                    ssl=self._tls,
                    server_hostname=self._host if self._tls else None,
                )
        except TimeoutError:
            raise UpstreamTimeout("connecting to the upstream timed out") from None
        except ssl.SSLCertVerificationError:
            raise UpstreamUnreachable("the upstream's TLS certificate is not trusted") from None
        except OSError as exc:
            # asyncio's message names the address, not the cause; errno does.
            reason = os.strerror(exc.errno) if exc.errno else "connection failed"
            raise UpstreamUnreachable(f"cannot connect to the upstream ({reason})") from None
        return connection

    def _opened(self, connection: _Connection) -> None:
        self._open.add(connection)

    def _released(self, connection: _Connection) -> None:
        """A connection whose answer is complete is free for the next request."""
        if self._closing or len(self._idle) >= self._max_idle:
            connection.close()
            return
        connection.idle_since = self._monotonic()
        self._idle.append(connection)

    def _lost(self, connection: _Connection) -> None:
        self._open.discard(connection)


class Response:
    """An answer's head, and its body as the upstream sends it."""

    __slots__ = (
        "_buffered",
        "_chunks",
        "_connection",
        "_error",
        "_released",
        "_waiter",
        "done",
        "head_done",
        "headers",
        "reason",
        "status",
    )

    def __init__(self, connection: _Connection) -> None:
        self.status = 0
        self.reason: str | None = None
        self.headers: CIMultiDict[str] = CIMultiDict()
        self.head_done = False
        self.done = False
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._error: GatewayError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._connection = connection
        self._released = False

    @property
    def content_length(self) -> int | None:
        """The Content-Length the upstream declared, if any."""
        value = self.headers.get("Content-Length")
        return int(value) if value is not None else None

    async def readany(self) -> bytes:
        """The next piece of the body as it arrived; b"" at its end."""
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                if self._buffered <= _READ_LOW_WATER:
                    self._connection.resume_reading()
                return chunk
            if self.done:
                self.release()
                return b""
            await self.wait()

    async def read(self) -> bytes:
        """The whole body."""
        while not self.done:
            if self._buffered > _READ_LOW_WATER:
                self._connection.resume_reading()  # the whole body is wanted anyway
            await self.wait()
        return self.body()

    def body(self) -> bytes:
        """The whole body of an answer that is `done` (read() waits for that)."""
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        self.release()
        return data

    def release(self) -> None:
        """Done with this answer: a connection whose answer is not complete is closed."""
        if not self._released:
            self._released = True
            if not self.done:
                self._connection.close()

    async def wait(self) -> None:
        """Until the connection has news for this answer, at most the read timeout."""
        if self._error is not None:
            raise self._error
        connection = self._connection
        loop = connection.loop
        waiter = self._waiter = loop.create_future()
        connection.watch(loop.time() + connection.client.read_timeout)
        try:
            await waiter
        except TimeoutError:
            connection.close()
            message = "the upstream stalled mid-answer" if self.head_done else "no answer in time"
            raise UpstreamTimeout(f"the upstream did not answer in time ({message})") from None
        except BaseException:
            connection.close()  # cancelled: the caller went away; the exchange ends here
            raise
        finally:
            self._waiter = None
        if self._error is not None:
            raise self._error

    # Called by the connection.

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: GatewayError) -> None:
        if not self.done and self._error is None:
            self._error = error
            self._wake()

    def _feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        if self._buffered > _READ_HIGH_WATER:
            self._connection.pause_reading()
        self._wake()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class _Connection(asyncio.Protocol):
    """One connection to the upstream; llhttp calls the on_* methods as it parses."""

    def __init__(self, client: UpstreamClient) -> None:
        self.client = client
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: Response | None = None
        self.closed = False
        self.idle_since = 0.0
        self._method = ""
        self._fields: list[tuple[str, str]] = []
        self._head_bytes = 0  # bytes received while the head is incomplete
        self._head_size = 0  # the head's size as llhttp reports its parts
        self._received = False  # any byte of the current answer
        self._reason: bytes = b""
        self._keep_alive = False
        self._until_close = False  # the body ends when the connection does (no framing)
        self._reading_paused = False
        self._writing_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._sending = False  # a streamed request body is still being written
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0

    # ------------------------------------------------------------------ the exchange

    async def exchange(
        self,
        method: str,
        head: bytes,
        body: bytes | AsyncIterator[bytes] | None,
        length: int | None,
    ) -> Response:
        """Write the request; return when the answer's head has arrived."""
        response = self.response = Response(self)
        self._method = method
        transport = self.transport
        if transport is None or self.closed:
            raise ClosedBeforeAnswer("the upstream closed the connection before answering")
        try:
            if isinstance(body, bytes):
                # One write, one segment for small bodies; no copy of large ones.
                if len(body) < 65536:
                    transport.write(head + body)
                else:
                    transport.writelines((head, body))
            else:
                transport.write(head)
                if body is not None:
                    self._sending = True
                    try:
                        await self._stream(body, response, length)
                    finally:
                        self._sending = False
            while not response.head_done:
                await response.wait()
        except BaseException:
            # The upstream failed, the body iterator did (the caller's side), or the exchange
            # was cancelled: this connection's state is unknown, so it is not used again.
            self.close()
            raise
        return response

    async def _stream(
        self, body: AsyncIterator[bytes], response: Response, length: int | None
    ) -> None:
        transport = self.transport
        assert transport is not None  # noqa: S101 - exchange() checked it
        sent = 0
        async for chunk in body:
            if response.head_done or self.closed:
                # The upstream answered (or hung up) before taking the whole body, e.g. a
                # 413: the answer is relayed and this connection is not used again.
                self.close_when_done()
                return
            if not chunk:
                continue  # an empty chunk would end a chunked body early
            sent += len(chunk)
            if length is None:
                transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
            elif sent > length:
                raise GatewayError("the request body is longer than its Content-Length")
            else:
                transport.write(chunk)
            if self._writing_paused:
                await self._drained(response)
        if length is None and not self.closed:
            transport.write(b"0\r\n\r\n")
        elif length is not None and sent != length:
            raise GatewayError("the request body is shorter than its Content-Length")

    async def _drained(self, response: Response) -> None:
        drain = self._drain = self.loop.create_future()
        timer = self.loop.call_later(self.client.read_timeout, _expire, drain)
        try:
            await drain
        except TimeoutError:
            raise UpstreamTimeout("the upstream stopped reading the request body") from None
        finally:
            timer.cancel()
            self._drain = None
        if self.closed and not response.head_done:
            raise UpstreamUnreachable("the upstream closed the connection during the request")
        # An answer that arrived meanwhile ends the upload: _stream sees head_done.

    # ------------------------------------------------------------------ flow control

    def pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = False
            self.transport.resume_reading()

    def watch(self, deadline: float) -> None:
        """Fail the answer's waiter if nothing arrives by `deadline` (loop time).

        One timer per connection, re-armed only when it fires: a timer made and
        cancelled for every wait cost more than the rest of the wait (uvloop, 1.2 µs).
        Deadlines only move later, so the timer firing early just re-arms it.
        """
        self._deadline = deadline
        if self._timer is None:
            self._timer = self.loop.call_at(deadline, self._check_deadline)

    def _check_deadline(self) -> None:
        self._timer = None
        response = self.response
        waiter = response._waiter if response is not None else None
        if waiter is None or waiter.done():
            return  # nothing waits now; the next wait arms a timer again
        if self.loop.time() >= self._deadline:
            waiter.set_exception(TimeoutError())
        else:
            self._timer = self.loop.call_at(self._deadline, self._check_deadline)

    def close_when_done(self) -> None:
        """Do not reuse this connection: closed once its answer is complete (or now)."""
        self._keep_alive = False
        if self.response is None:
            self.close()

    def close(self) -> None:
        """Close the connection; it is never used again."""
        self._keep_alive = False
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's does not subclass asyncio.Transport).
        self.transport = cast(asyncio.Transport, transport)
        self.client._opened(self)

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None or response.done:
            self.close()  # bytes nobody asked for: the upstream is out of step
            return
        self._received = True
        if not response.head_done:
            # Also counted here: a head that never completes is not buffered without end.
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._invalid(response)
            return
        if not response.head_done and self._head_bytes > MAX_HEAD_BYTES:
            self._invalid(response)

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost settles the answer

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.client._lost(self)
        response = self.response
        if response is not None and not response.done:
            if not response.head_done:
                if not self._received:
                    response._fail(
                        ClosedBeforeAnswer("the upstream closed the connection before answering")
                    )
                else:
                    response._fail(UpstreamUnreachable("the upstream sent an invalid response"))
            elif self._until_close:
                self.on_message_complete()
            else:
                response._fail(UpstreamUnreachable("the upstream closed the connection mid-answer"))
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    # ------------------------------------------------------------------ llhttp callbacks

    def on_message_begin(self) -> None:
        response = self.response
        if response is None or response.head_done:
            raise _OutOfStep  # a second answer to one request

    def on_status(self, reason: bytes) -> None:
        self._reason = reason
        self._head_size = len(reason) + 15  # "HTTP/1.1 200 " and CRLF

    def on_header(self, name: bytes, value: bytes) -> None:
        fields = self._fields
        size = len(name) + len(value)
        self._head_size += size + 4  # ": " and CRLF
        if len(fields) >= MAX_FIELDS or size > MAX_FIELD_BYTES or self._head_size > MAX_HEAD_BYTES:
            raise _OutOfStep
        fields.append(
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        )

    def on_headers_complete(self) -> None:
        response = self.response
        assert response is not None  # noqa: S101 - on_message_begin checked it
        parser = self.parser
        status = parser.get_status_code()
        if status < 200:
            # 1xx answers are interim (RFC 9110 §15.2); 101 would switch protocols, which
            # the gateway never asks for.
            if status == 101:
                raise _OutOfStep
            self._fields = []
            return
        headers = response.headers = CIMultiDict(self._fields)
        self._fields = []
        response.status = status
        reason = self._reason
        response.reason = reason.decode("ascii") if reason.isascii() and reason else None
        self._keep_alive = parser.should_keep_alive()
        bodyless = self._method == "HEAD" or status in (204, 304)
        self._until_close = not bodyless and (
            "Content-Length" not in headers and "Transfer-Encoding" not in headers
        )
        response.head_done = True
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)  # an upload waiting for the upstream to read stops here
        if bodyless and self._method == "HEAD":
            # llhttp does not know the method and would wait for a body; the answer ends
            # here, and the connection is not trusted with another.
            self._keep_alive = False
            self.on_message_complete()
        else:
            response._wake()

    def on_body(self, body: bytes) -> None:
        response = self.response
        assert response is not None  # noqa: S101 - on_message_begin checked it
        response._feed(body)

    def on_message_complete(self) -> None:
        response = self.response
        if response is None or not response.head_done or response.done:
            return
        response.done = True
        response._wake()
        self.response = None
        self._head_bytes = 0
        self._received = False
        transport = self.transport
        if (
            self._keep_alive
            and not self.closed
            and not self._sending
            and transport is not None
            and not transport.get_write_buffer_size()
        ):
            self.client._released(self)
        else:
            # Answered before the whole request was written: the upstream may still be
            # reading it, so the connection is not trusted with another one.
            self.close()

    def _invalid(self, response: Response) -> None:
        response._fail(UpstreamUnreachable("the upstream sent an invalid response"))
        self.close()


class _OutOfStep(Exception):
    """Raised inside an llhttp callback to stop parsing an answer the gateway will not take."""
