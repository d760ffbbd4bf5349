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
- a request head whose method, target, field names or values break RFC 9110/9112's
  grammar is refused, never repaired, and nothing of it is sent;
- it is held to h11, a well-kept reference parser, by a differential suite
  (tests/functional/test_upstream_differential.py); SECURITY.md lists every deliberate
  difference.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from operator import itemgetter
from typing import Final, cast

import httptools
from multidict import CIMultiDict
from yarl import URL

from gateway.egress import ProxyServer
from gateway.errors import GatewayError, MalformedRequest, UpstreamTimeout, UpstreamUnreachable
from gateway.tunnel import open_through_proxy

IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
MAX_HEAD_BYTES: Final = 64 * 1024  # status line and header fields of one answer
MAX_FIELDS: Final = 100
MAX_FIELD_BYTES: Final = 8190
# Reading from the upstream pauses while this much of an answer waits for the caller.
_READ_HIGH_WATER: Final = 512 * 1024
_READ_LOW_WATER: Final = 128 * 1024
# What one buffered piece costs besides its payload (a bytes object's header and its deque
# slot, rounded up): counted so that many tiny chunks pause reading as early as a few
# large ones would, instead of holding tens of times the mark in object headers.
_PIECE_COST: Final = 64
# The default idle timeout: below the 5 s keep-alive timeout of Node.js, uvicorn and
# Apache httpd (the shortest common upstream defaults; nginx 75 s, Azure's load balancers
# 4 min), so the gateway drops an idle connection before the upstream can, and a request
# never races the upstream's close of the connection it went out on.
DEFAULT_IDLE_TIMEOUT: Final = 4.0
DEFAULT_MAX_CONNECTION_AGE: Final = 300.0
# RFC 9110 §5.6.2 token: a method or a field name.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Bytes a request head may hold besides CR and LF: HTAB, visible ASCII, SP, obs-text.
_HEAD_BYTES: Final = bytes(b for b in range(256) if b == 9 or 0x20 <= b != 0x7F)
_CRLF: Final = b"\r\n"
_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE"})
# Names the client writes itself: a caller's copy would be a second Host or framing.
_OWN_FIELDS: Final = frozenset({"host", "content-length", "transfer-encoding"})
_name = itemgetter(0)
# Valid names already seen, so a name is checked once, not on every request.
_NAMES_SEEN: set[str] = set()
_NAMES_SEEN_MAX: Final = 4096
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
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        max_connection_age: float = DEFAULT_MAX_CONNECTION_AGE,
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
        if proxy is not None and origin.scheme == "https" and tls is None:
            # Absolute form would name the https origin to the proxy as plain http.
            raise ValueError("an https origin through a proxy needs a TLS context")
        if proxy is not None and origin.scheme == "http":
            self._target_prefix = f"http://{origin.raw_authority}"
            credentials = proxy.authorization()
            if credentials:
                self._host_line += f"\r\nProxy-Authorization: {credentials}"
                self._proxy_lines = 1
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self._max_idle, self._idle_timeout = max_idle, idle_timeout
        # A connection older than this is not reused, so a DNS change reaches steady traffic.
        self._max_age = max_connection_age
        self._monotonic = monotonic
        self._idle: deque[_Connection] = deque()
        self._open: set[_Connection] = set()
        self._closing = False
        self._reaper: asyncio.TimerHandle | None = None

    @property
    def idle_connections(self) -> int:
        """How many pooled connections are open and waiting for a request."""
        return sum(1 for connection in self._idle if not connection.closed)

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
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
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
        if isinstance(headers, Iterator):
            headers = list(headers)  # read twice below
        fields = [f"\r\n{name}: {value}" for name, value in headers]
        # Each name is checked once, then remembered: one set operation per request.
        if not _NAMES_SEEN.issuperset(map(_name, headers)):
            for name, _ in headers:
                _admit(name)
        if isinstance(body, bytes):
            framing = f"\r\nContent-Length: {len(body)}"
        elif body is None:
            framing = "" if method in _BODYLESS else "\r\nContent-Length: 0"
        elif length is None:
            framing = "\r\nTransfer-Encoding: chunked"
        else:
            framing = f"\r\nContent-Length: {length}"
        if (
            (method not in _METHODS and not _TOKEN.fullmatch(method))
            or not (target.isascii() and target.isprintable())
            or " " in target
            or not target
        ):
            raise MalformedRequest("the request's method or target is not valid; nothing was sent")
        head = (
            f"{method} {self._target_prefix}{target} HTTP/1.1"
            f"{self._host_line}{''.join(fields)}{framing}\r\n\r\n"
        )
        try:
            data = head.encode()
        except UnicodeEncodeError:
            raise MalformedRequest("a request header is not UTF-8; nothing was sent") from None
        # The head holds exactly its own line ends and no other control character: a CR,
        # LF or NUL in a value would smuggle a field or a second request to the upstream
        # (RFC 9110 §5.5 allows HTAB). One pass in C deletes every allowed byte; what is
        # left must be the line ends. (str.isprintable, a regex or a check per field cost
        # several times more on a head carrying a bearer token.)
        line_ends = 1 + self._proxy_lines + len(fields) + (1 if framing else 0) + 2
        if data.translate(None, _HEAD_BYTES) != _CRLF * line_ends:
            raise MalformedRequest(
                "a request header value holds a control character; nothing was sent"
            )
        return data

    def _pooled(self) -> _Connection | None:
        """The most recently used idle connection still open and fresh, if any."""
        idle = self._idle
        while idle:
            connection = idle.pop()
            if connection.closed:
                continue
            if self._expired(connection, self._monotonic()):
                connection.close()
                continue
            return connection
        return None

    def _expired(self, connection: _Connection, now: float) -> bool:
        return (
            now - connection.idle_since > self._idle_timeout
            or now - connection.born > self._max_age
        )

    def _reap(self) -> None:
        """Close idle connections past their idle timeout or age, without waiting for a request."""
        self._reaper = None
        now = self._monotonic()
        kept: deque[_Connection] = deque()
        for connection in self._idle:
            if connection.closed:
                continue
            if self._expired(connection, now):
                connection.close()
            else:
                kept.append(connection)
        self._idle = kept
        if kept and not self._closing:
            self._reaper = asyncio.get_running_loop().call_later(self._idle_timeout, self._reap)

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
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamUnreachable(self._connect_failure(exc)) from None
        return connection

    def _connect_failure(self, exc: OSError) -> str:
        """What went wrong, in words: errno's text is misleading for TLS and DNS failures."""
        if isinstance(exc, ssl.SSLError):
            # e.g. TLS spoken to a plain-HTTP port: WRONG_VERSION_NUMBER (errno 1, "EPERM").
            return f"TLS handshake with the upstream failed ({exc.reason or 'protocol error'})"
        if isinstance(exc, socket.gaierror):
            return f"cannot resolve {self._host}"
        if self._tls is not None and exc.errno is None and isinstance(exc, ConnectionError):
            # The TCP connection was made; it ended during the handshake.
            return "TLS handshake with the upstream failed (the connection closed)"
        # asyncio's message names the address, not the cause; errno does.
        reason = os.strerror(exc.errno) if exc.errno else "connection failed"
        return f"cannot connect to the upstream ({reason})"

    def _opened(self, connection: _Connection) -> None:
        connection.born = self._monotonic()
        self._open.add(connection)

    def _released(self, connection: _Connection) -> None:
        """A connection whose answer is complete is free for the next request."""
        now = self._monotonic()
        if (
            self._closing
            or len(self._idle) >= self._max_idle
            or now - connection.born > self._max_age
        ):
            connection.close()
            return
        connection.idle_since = now
        self._idle.append(connection)
        if self._reaper is None:
            self._reaper = connection.loop.call_later(self._idle_timeout, self._reap)

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
        "transfer_codings",
    )

    def __init__(self, connection: _Connection) -> None:
        self.status = 0
        self.reason: str | None = None
        self.headers: CIMultiDict[str] = CIMultiDict()
        # Transfer codings other than chunked (RFC 9112 §6.1), outermost last: the body is
        # handed over still encoded with them, as it came.
        self.transfer_codings: tuple[str, ...] = ()
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
                self._buffered -= len(chunk) + _PIECE_COST
                if self._buffered <= _READ_LOW_WATER and not self.done:
                    # Once the answer is complete its connection serves another one.
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
        """Done with this answer: a connection whose answer is not complete is aborted."""
        if not self._released:
            self._released = True
            if not self.done:
                self._connection.abort()

    async def wait(self, *, timed: bool = True) -> None:
        """Until the connection has news for this answer, at most the read timeout if `timed`."""
        if self._error is not None:
            raise self._error
        connection = self._connection
        loop = connection.loop
        waiter = self._waiter = loop.create_future()
        if timed:
            connection.watch(loop.time() + connection.client.read_timeout)
        try:
            await waiter
        except TimeoutError:
            connection.abort()
            message = "the upstream stalled mid-answer" if self.head_done else "no answer in time"
            raise UpstreamTimeout(f"the upstream did not answer in time ({message})") from None
        except BaseException:
            connection.abort()  # cancelled: the caller went away; the exchange ends here
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
        self._buffered += len(chunk) + _PIECE_COST
        if self._buffered > _READ_HIGH_WATER:
            self._connection.pause_reading()
        self._wake()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


def _admit(name: str) -> None:
    """Check a field name once (RFC 9110 §5.1 token, not one the client writes itself)."""
    if not _TOKEN.fullmatch(name):
        raise MalformedRequest("a request header name is not a valid token; nothing was sent")
    if name.lower() in _OWN_FIELDS:
        raise MalformedRequest(f"the client writes {name} itself; nothing was sent")
    if len(_NAMES_SEEN) < _NAMES_SEEN_MAX:
        _NAMES_SEEN.add(name)


def _retrieve(task: asyncio.Task[None]) -> None:
    """Collect the outcome of an upload cut short, so it is not reported as never retrieved."""
    if not task.cancelled():
        task.exception()


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
        self.born = 0.0
        self._method = ""
        self._fields: list[tuple[str, str]] = []
        self._head_bytes = 0  # bytes received while the head is incomplete
        self._head_size = 0  # the head's (and trailer section's) size as llhttp reports its parts
        self._in_trailer = False  # fields now are the trailer section's
        self._body_fed = False  # a body byte arrived in the current data_received
        self._since_body = 0  # bytes received since the last body byte (chunk lines, trailers)
        self._received = False  # any byte of the current answer
        self._reason: bytes = b""
        self._keep_alive = False
        self._until_close = False  # the body ends when the connection does (no framing)
        self._clean_eof = False  # the upstream ended the connection (TLS: with close_notify)
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
                    await self._upload(body, response, length)
            while not response.head_done:
                await response.wait()
        except BaseException:
            # The upstream failed, the body iterator did (the caller's side), or the exchange
            # was cancelled: this connection's state is unknown, so it is not used again.
            self.abort()
            raise
        return response

    async def _upload(
        self, body: AsyncIterator[bytes], response: Response, length: int | None
    ) -> None:
        """Stream the body while watching for the answer: an early answer (a 413) ends it.

        The body is written by a task of its own, so an answer that arrives while the
        caller's next piece is awaited is returned at once, not after that piece.
        """
        self._sending = True
        upload = self.loop.create_task(self._stream(body, response, length))
        upload.add_done_callback(lambda _: response._wake())
        try:
            while not (response.head_done or upload.done()):
                # No read timeout while the request is still going out: the caller's pace
                # and the upstream's reading have timeouts of their own.
                await response.wait(timed=False)
            if upload.done():
                upload.result()  # what the upload raised (the caller's body, the upstream)
        finally:
            if not upload.done():
                # Answered before the whole body went out: relayed, and the connection is
                # not used again (the upstream may still be reading the rest).
                self._keep_alive = False
                upload.cancel()
                upload.add_done_callback(_retrieve)

    async def _stream(
        self, body: AsyncIterator[bytes], response: Response, length: int | None
    ) -> None:
        transport = self.transport
        assert transport is not None  # noqa: S101 - exchange() checked it
        sent = 0
        try:
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
        finally:
            self._sending = False

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
        """Close the connection after what is written has gone out; it is never used again."""
        self._keep_alive = False
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    def abort(self) -> None:
        """End a failed connection now: nothing written is flushed (it may be megabytes)."""
        self._keep_alive = False
        self.closed = True
        transport = self.transport
        if transport is not None:
            self.transport = None
            transport.abort()

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's does not subclass asyncio.Transport).
        self.transport = cast(asyncio.Transport, transport)
        self.client._opened(self)

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None or response.done:
            self.abort()  # bytes nobody asked for: the upstream is out of step
            return
        self._received = True
        head_done = response.head_done
        if not head_done:
            # Also counted here: a head that never completes is not buffered without end.
            self._head_bytes += len(data)
        self._body_fed = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._invalid(response)
            return
        if not response.head_done:
            if self._head_bytes > MAX_HEAD_BYTES:
                self._invalid(response)
        elif self._body_fed:
            self._since_body = 0
        elif head_done and not response.done:
            # Chunk-size lines and the trailer section: llhttp hands over a trailer field
            # only when it is complete, so its bytes are counted as they arrive.
            self._since_body += len(data)
            if self._since_body > MAX_HEAD_BYTES:
                self._invalid(response)

    def eof_received(self) -> bool:
        # The upstream ended the connection: never handed out again from here on.
        self.closed = True
        clean = True
        transport = self.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        if ssl_object is not None:
            # asyncio reports a TCP end without TLS close_notify as an EOF too (uvloop does
            # not): after close_notify the TLS object reads b"", without it wants more data.
            try:
                clean = ssl_object.read(1) == b""
            except ssl.SSLError:
                clean = False
        self._clean_eof = clean
        return False  # close the transport; connection_lost settles the answer

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
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
            elif self._until_close and self._clean_eof and exc is None:
                self.on_message_complete()
            else:
                # A reset, or TLS ended without close_notify, is a truncation, even when the
                # body's end is the connection's: never passed off as a complete answer.
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
        self._reason = b""
        self._head_size = 15  # "HTTP/1.1 200 " and CRLF

    def on_status(self, reason: bytes) -> None:
        self._reason = reason
        self._head_size = len(reason) + 15

    def on_header(self, name: bytes, value: bytes) -> None:
        fields = self._fields
        size = len(name) + len(value)
        self._head_size += size + 4  # ": " and CRLF
        if len(fields) >= MAX_FIELDS or size > MAX_FIELD_BYTES or self._head_size > MAX_HEAD_BYTES:
            raise _OutOfStep
        if self._in_trailer:
            # Counted against the head's limit, then dropped: a trailer field is never
            # another answer's header, and the relay has no way to send it on.
            return
        # Names are tokens (llhttp checked); a value that is not UTF-8 makes the answer
        # invalid (UnicodeDecodeError stops the parser): relayed byte-exact or not at all.
        # llhttp strips the whitespace before a value, not after it (RFC 9110 §5.5: not
        # part of the value).
        fields.append((name.decode(), value.rstrip(b" \t").decode()))

    def on_headers_complete(self) -> None:
        response = self.response
        assert response is not None  # noqa: S101 - on_message_begin checked it
        parser = self.parser
        status = parser.get_status_code()
        fields = self._fields
        self._fields = []
        if status < 200:
            # 1xx answers are interim (RFC 9110 §15.2) and have no body. 101 would switch
            # protocols, which the gateway never asks for; below 100 is no status at all.
            # llhttp reads a body after 104-199 when framing says so: such bytes would
            # reach the final answer's body, so that framing makes the answer invalid.
            if status < 100 or status == 101 or (status > 103 and _frames_a_body(fields)):
                raise _OutOfStep
            return
        if status > 599:
            raise _OutOfStep  # RFC 9110 §15: three digits from 100 to 599
        headers = response.headers = CIMultiDict(fields)
        response.status = status
        reason = self._reason
        response.reason = reason.decode("ascii") if reason.isascii() and reason else None
        version = parser.get_http_version()
        if version not in {"1.1", "1.0"}:
            raise _OutOfStep  # an HTTP/1.1 connection carries HTTP/1.x answers only
        # HTTP/1.0's keep-alive is not relied on (h11 does not either).
        self._keep_alive = version == "1.1" and parser.should_keep_alive()
        bodyless = self._method == "HEAD" or status in (204, 304)
        if bodyless or "Content-Length" in headers:
            self._until_close = False
        elif "Transfer-Encoding" in headers:
            codings = [
                coding.strip().lower()
                for value in headers.getall("Transfer-Encoding")
                for coding in value.split(",")
            ]
            if codings[-1] == "chunked":
                codings.pop()
                self._until_close = False
            else:
                # RFC 9112 §6.3: a final coding other than chunked is framed by the
                # connection's close.
                self._until_close = True
            response.transfer_codings = tuple(coding for coding in codings if coding)
        else:
            self._until_close = True
        self._in_trailer = False
        self._since_body = 0
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
        if not response.head_done:
            raise _OutOfStep  # no body byte before the final answer's head
        self._body_fed = True
        response._feed(body)

    def on_chunk_header(self) -> None:
        # After the last chunk (size 0) llhttp reports the trailer section's fields.
        self._in_trailer = True

    def on_chunk_complete(self) -> None:
        self._in_trailer = False

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
            if self._reading_paused:
                # Paused for this answer's caller; the answer is complete, and a pooled
                # connection must read the next one (its waiting pieces stay with it).
                self._reading_paused = False
                transport.resume_reading()
            self.client._released(self)
        elif self._sending or (transport is not None and transport.get_write_buffer_size()):
            # Answered before the whole request was written: the upstream may still be
            # reading it, so the connection is not trusted with another one, and the rest
            # of the upload is not flushed.
            self.abort()
        else:
            self.close()

    def _invalid(self, response: Response) -> None:
        response._fail(UpstreamUnreachable("the upstream sent an invalid response"))
        self.abort()


def _frames_a_body(fields: list[tuple[str, str]]) -> bool:
    """True when an interim answer's fields announce a body (Transfer-Encoding, a length > 0)."""
    for name, value in fields:
        lower = name.lower()
        if lower == "transfer-encoding" or (lower == "content-length" and value.strip() != "0"):
            return True
    return False


class _OutOfStep(Exception):
    """Raised inside an llhttp callback to stop parsing an answer the gateway will not take."""
