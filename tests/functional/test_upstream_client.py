"""The upstream client against raw loopback servers: each test scripts the exact wire bytes."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

import pytest
import trustme
from yarl import URL

from gateway.errors import GatewayError, UpstreamTimeout, UpstreamUnreachable
from gateway.upstream import ClosedBeforeAnswer, UpstreamClient
from tests.clock import FakeClock, settle
from tests.poll import eventually
from tests.servers.raw import Peer, RawServer, Script, answering, answering_once, read_all
from tests.servers.upstream import pattern, pattern_sha256

MIB = 1024 * 1024
READ_TIMEOUT = 0.5
OK_EMPTY = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


def ok(body: bytes, *fields: bytes) -> bytes:
    """A 200 answer framed by Content-Length, with extra header lines."""
    extra = b"".join(line + b"\r\n" for line in fields)
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%b\r\n%b" % (len(body), extra, body)


class Serve(Protocol):
    """Start a RawServer running `script`."""

    async def __call__(self, script: Script, *, tls: ssl.SSLContext | None = None) -> RawServer:
        """The started server."""


class Connect(Protocol):
    """Build an UpstreamClient bound to `origin`, closed after the test."""

    def __call__(
        self,
        origin: URL,
        *,
        tls: ssl.SSLContext | None = None,
        read_timeout: float = READ_TIMEOUT,
        idle_timeout: float = 30.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> UpstreamClient:
        """The client."""


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Factory: raw servers on loopback, stopped after the test (script errors re-raised)."""
    servers: list[RawServer] = []

    async def start(script: Script, *, tls: ssl.SSLContext | None = None) -> RawServer:
        server = RawServer(script, tls)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


@pytest.fixture
async def connect(serve: Serve) -> AsyncIterator[Connect]:
    """Factory: upstream clients, closed before the servers stop."""
    clients: list[UpstreamClient] = []

    def build(
        origin: URL,
        *,
        tls: ssl.SSLContext | None = None,
        read_timeout: float = READ_TIMEOUT,
        idle_timeout: float = 30.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> UpstreamClient:
        client = UpstreamClient(
            origin,
            tls=tls,
            connect_timeout=2.0,
            read_timeout=read_timeout,
            idle_timeout=idle_timeout,
            monotonic=monotonic,
        )
        clients.append(client)
        return client

    yield build
    for client in clients:
        await client.close()


@pytest.fixture
def client_tls(ca: trustme.CA) -> ssl.SSLContext:
    """Client-side TLS trusting only the test CA."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def stream(*pieces: bytes) -> AsyncIterator[bytes]:
    """A streamed request body made of `pieces`, each a separate write."""
    for piece in pieces:
        yield piece


async def get(client: UpstreamClient, target: str = "/v1/x") -> bytes:
    """GET `target` and read the whole body."""
    response = await client.request("GET", target, [], None)
    return await response.read()


# --------------------------------------------------------------------------- the request head

Body = bytes | AsyncIterator[bytes] | None


@dataclass(frozen=True)
class WireCase:
    """A request body as the caller hands it over, and the framing expected on the wire."""

    method: str
    make_body: Callable[[], Body]
    length: int | None
    framing: bytes
    wire_body: bytes


HEAD_CASES = [
    pytest.param(WireCase("GET", lambda: None, None, b"", b""), id="get-without-body-no-length"),
    pytest.param(
        WireCase("POST", lambda: None, None, b"Content-Length: 0\r\n", b""), id="post-without-body"
    ),
    pytest.param(
        WireCase("PUT", lambda: b"hello", None, b"Content-Length: 5\r\n", b"hello"), id="bytes"
    ),
    pytest.param(
        WireCase("PUT", lambda: b"z" * 70000, None, b"Content-Length: 70000\r\n", b"z" * 70000),
        id="bytes-over-64KiB",
    ),
    pytest.param(
        WireCase(
            "POST",
            lambda: stream(b"abc", b"x" * 300, b"defgh"),
            None,
            b"Transfer-Encoding: chunked\r\n",
            b"3\r\nabc\r\n12c\r\n" + b"x" * 300 + b"\r\n5\r\ndefgh\r\n0\r\n\r\n",
        ),
        id="streamed-chunked",
    ),
    pytest.param(
        WireCase(
            "POST", lambda: stream(b"abc", b"defgh"), 8, b"Content-Length: 8\r\n", b"abcdefgh"
        ),
        id="streamed-with-length",
    ),
]


@pytest.mark.parametrize("case", HEAD_CASES)
async def test_request_bytes_on_the_wire(serve: Serve, connect: Connect, case: WireCase) -> None:
    """The request goes out byte-exact: request line, Host, caller headers in order, framing."""
    server = await serve(answering(OK_EMPTY))
    client = connect(server.origin)
    headers = [("Accept", "*/*"), ("X-Trace", "a"), ("x-trace", "b")]
    response = await client.request(
        case.method, "/v1/items?q=1&r=%2F", headers, case.make_body(), case.length
    )
    assert response.status == 200
    assert await response.read() == b""
    expected = (
        b"%b /v1/items?q=1&r=%%2F HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
        b"Accept: */*\r\nX-Trace: a\r\nx-trace: b\r\n%b\r\n%b"
    ) % (case.method.encode(), server.port, case.framing, case.wire_body)
    assert server.requests == [expected]


async def test_empty_piece_of_a_chunked_body_does_not_end_it(
    serve: Serve, connect: Connect
) -> None:
    """An empty piece from a streamed body is skipped, never sent as the 0-size last chunk."""
    server = await serve(answering(OK_EMPTY))
    client = connect(server.origin)
    response = await client.request("POST", "/v1/up", [], stream(b"ab", b"", b"cd"))
    await response.read()
    assert len(server.requests) == 1
    assert server.requests[0].endswith(b"\r\n\r\n2\r\nab\r\n2\r\ncd\r\n0\r\n\r\n")


CRLF_CASES = [
    pytest.param("/v1/x", [("X-A", "a\r\nX-Injected: 1")], id="crlf-in-value"),
    pytest.param("/v1/x", [("X-A", "a\nb")], id="lf-in-value"),
    pytest.param("/v1/x", [("X-A", "a\rb")], id="cr-in-value"),
    pytest.param("/v1/x", [("X-A\r\nX-B", "b")], id="crlf-in-name"),
    pytest.param("/v1/x HTTP/1.1\r\nX-Injected: 1", [], id="crlf-in-target"),
]


@pytest.mark.parametrize(("target", "headers"), CRLF_CASES)
async def test_cr_or_lf_in_the_head_is_never_sent(
    serve: Serve, connect: Connect, target: str, headers: list[tuple[str, str]]
) -> None:
    """CR or LF inside a header or the target raises GatewayError; not one byte goes out."""
    server = await serve(answering(OK_EMPTY))
    fresh = connect(server.origin)
    with pytest.raises(GatewayError):
        await fresh.request("GET", target, headers, None)
    assert server.wires == []
    # Over a kept-alive connection too: the server sees only the good request before it.
    pooled = connect(server.origin)
    assert await get(pooled) == b""
    with pytest.raises(GatewayError):
        await pooled.request("POST", target, headers, b"body")
    await pooled.close()
    (wire,) = server.wires
    await asyncio.wait_for(wire.eof.wait(), 2)
    assert bytes(wire.received) == server.requests[0]
    assert server.requests[0].startswith(b"GET /v1/x HTTP/1.1\r\n")


# --------------------------------------------------------------------------- keep-alive


async def test_sequential_requests_share_one_connection(serve: Serve, connect: Connect) -> None:
    """Three requests in turn, answers read, travel over one kept-alive connection."""
    server = await serve(answering(ok(b"one"), ok(b"two"), ok(b"three")))
    client = connect(server.origin)
    assert await get(client) == b"one"
    response = await client.request("POST", "/v1/y", [], b"data")
    assert await response.read() == b"two"
    assert await get(client) == b"three"
    assert len(server.wires) == 1
    assert len(server.requests) == 3


@pytest.mark.parametrize(
    "first",
    [
        pytest.param(ok(b"bye", b"Connection: close"), id="connection-close"),
        pytest.param(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nbye", id="http-1.0"),
    ],
)
async def test_answer_that_ends_keep_alive_is_not_reused(
    serve: Serve, connect: Connect, first: bytes
) -> None:
    """After an answer that does not keep the connection alive, the next request opens another."""
    server = await serve(answering(first, ok(b"next")))
    client = connect(server.origin)
    assert await get(client) == b"bye"
    assert await get(client) == b"next"
    assert len(server.wires) == 2
    assert [len(wire.requests) for wire in server.wires] == [1, 1]
    await asyncio.wait_for(server.wires[0].eof.wait(), 2)  # and the client closed the first


async def test_idle_connection_past_idle_timeout_is_not_reused(
    serve: Serve, connect: Connect
) -> None:
    """A pooled connection idle longer than idle_timeout is closed and a new one is opened."""
    clock = FakeClock()
    server = await serve(answering(ok(b"a"), ok(b"b"), ok(b"c")))
    client = connect(server.origin, idle_timeout=10.0, monotonic=clock)
    assert await get(client) == b"a"
    await clock.advance(9.0)
    assert await get(client) == b"b"
    assert len(server.wires) == 1
    await clock.advance(10.5)
    assert await get(client) == b"c"
    assert len(server.wires) == 2
    await asyncio.wait_for(server.wires[0].eof.wait(), 2)


def _closing_on_second_request(peer_answers: list[bytes]) -> Script:
    """First connection: answer one request, then close as the next one arrives."""

    async def script(peer: Peer) -> None:
        if peer.wire.index == 0:
            if await peer.request() is not None:
                await peer.send(peer_answers[0])
            await peer.request()  # read whole, so the close is a FIN, not a reset
            await peer.close()
            return
        while await peer.request() is not None:
            await peer.send(peer_answers[1])

    return script


@pytest.mark.parametrize(
    ("method", "make_body", "resent"),
    [
        pytest.param("GET", lambda: None, True, id="get"),
        pytest.param("DELETE", lambda: None, True, id="delete"),
        pytest.param("PUT", lambda: b"payload", True, id="put-bytes"),
        pytest.param("POST", lambda: b"payload", False, id="post-bytes"),
        pytest.param("PUT", lambda: stream(b"pay", b"load"), False, id="put-streamed"),
    ],
)
async def test_request_crossing_the_upstreams_close_of_a_pooled_connection(
    serve: Serve, connect: Connect, method: str, make_body: Callable[[], Body], resent: bool
) -> None:
    """An upstream closing a pooled connection as a request arrives: sent again once if safe."""
    server = await serve(_closing_on_second_request([ok(b"first"), ok(b"again")]))
    client = connect(server.origin)
    assert await get(client) == b"first"
    if resent:
        response = await client.request(method, "/v1/second", [], make_body())
        assert await response.read() == b"again"
        assert len(server.wires) == 2
        assert server.wires[1].requests == [server.wires[0].requests[1]]
    else:
        with pytest.raises(ClosedBeforeAnswer) as caught:
            await client.request(method, "/v1/second", [], make_body())
        assert isinstance(caught.value, UpstreamUnreachable)
        assert len(server.wires) == 1
    assert len(server.requests) == (3 if resent else 2)


async def test_idle_close_the_client_noticed_costs_no_request(
    serve: Serve, connect: Connect
) -> None:
    """A pooled connection the upstream closed while idle is dropped: a POST goes on a new one."""

    async def script(peer: Peer) -> None:
        if await peer.request() is not None:
            await peer.send(ok(b"once"))
        await peer.close()

    server = await serve(script)
    client = connect(server.origin)
    assert await get(client) == b"once"
    await settle()  # the client's loop sees the FIN
    response = await client.request("POST", "/v1/p", [], b"payload")
    assert await response.read() == b"once"
    assert len(server.wires) == 2


# --------------------------------------------------------------------------- answers


async def test_content_length_answer(serve: Serve, connect: Connect) -> None:
    """A Content-Length answer: status, reason, repeated headers, body; the connection is reused."""
    first = ok(b"hello world", b"Set-Cookie: a=1", b"Content-Type: text/plain", b"Set-Cookie: b=2")
    server = await serve(answering(first, ok(b"next")))
    client = connect(server.origin)
    response = await client.request("GET", "/v1/x", [], None)
    assert (response.status, response.reason) == (200, "OK")
    assert response.content_length == 11
    assert response.headers.getall("Set-Cookie") == ["a=1", "b=2"]
    assert response.headers["content-type"] == "text/plain"
    assert await response.read() == b"hello world"
    assert await get(client) == b"next"
    assert len(server.wires) == 1


async def test_chunked_answer(serve: Serve, connect: Connect) -> None:
    """A chunked answer (extensions, trailer) arrives whole through readany; connection kept."""

    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(
            b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n5;x=1\r\nhello\r\n"
        )
        await peer.send(b"6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n")
        while await peer.request() is not None:
            await peer.send(ok(b"next"))

    server = await serve(script)
    client = connect(server.origin)
    response = await client.request("GET", "/v1/x", [], None)
    assert response.status == 201
    assert response.content_length is None
    assert await read_all(response) == b"hello world"
    assert await get(client) == b"next"
    assert len(server.wires) == 1


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n", id="http-1.0"),
        pytest.param(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", id="connection-close"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n", id="no-framing"),
    ],
)
async def test_close_delimited_answer_ends_at_eof(
    serve: Serve, connect: Connect, head: bytes
) -> None:
    """An answer without framing runs until the upstream closes; the next request reconnects."""

    async def script(peer: Peer) -> None:
        if peer.wire.index == 0:
            await peer.request()
            await peer.send(head + b"first part, ")
            await peer.send(b"second part")
            await peer.close()
        else:
            await answering(ok(b"next"))(peer)

    server = await serve(script)
    client = connect(server.origin)
    response = await client.request("GET", "/v1/x", [], None)
    assert response.content_length is None
    assert await response.read() == b"first part, second part"
    assert await get(client) == b"next"
    assert len(server.wires) == 2


@pytest.mark.parametrize(
    "bodyless",
    [
        pytest.param(b"HTTP/1.1 204 No Content\r\n\r\n", id="204"),
        pytest.param(
            b'HTTP/1.1 304 Not Modified\r\nContent-Length: 42\r\nETag: "v1"\r\n\r\n', id="304"
        ),
    ],
)
async def test_bodyless_status_has_no_body(serve: Serve, connect: Connect, bodyless: bytes) -> None:
    """204 and 304 end at their head (a 304's Content-Length included); the next answer parses."""
    server = await serve(answering(bodyless, ok(b"next")))
    client = connect(server.origin)
    response = await client.request("GET", "/v1/x", [], None)
    async with asyncio.timeout(READ_TIMEOUT / 2):
        assert await response.read() == b""
    assert await get(client) == b"next"
    assert len(server.wires) == 1


async def test_head_answer_has_no_body(serve: Serve, connect: Connect) -> None:
    """A HEAD answer declaring Content-Length returns at once with an empty body."""
    server = await serve(answering(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", ok(b"next")))
    client = connect(server.origin)
    async with asyncio.timeout(READ_TIMEOUT / 2):
        response = await client.request("HEAD", "/v1/x", [], None)
        assert response.content_length == 1000
        assert await response.read() == b""
    assert server.requests[0].endswith(b"\r\n\r\n")
    assert b"Content-Length" not in server.requests[0]
    assert await get(client) == b"next"


async def test_interim_answers_are_skipped(serve: Serve, connect: Connect) -> None:
    """100 Continue and 103 Early Hints before the final answer are skipped, headers and all."""

    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        await peer.send(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
        await peer.send(ok(b"final", b"X-Final: 1"))
        await peer.until_eof()

    server = await serve(script)
    client = connect(server.origin)
    response = await client.request("GET", "/v1/x", [], None)
    assert (response.status, response.reason) == (200, "OK")
    assert "Link" not in response.headers
    assert response.headers["X-Final"] == "1"
    assert await response.read() == b"final"


async def test_switching_protocols_is_invalid(serve: Serve, connect: Connect) -> None:
    """A 101 answer (never asked for) is an invalid response."""
    switch = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    )
    server = await serve(answering(switch))
    client = connect(server.origin)
    with pytest.raises(UpstreamUnreachable, match="invalid response"):
        await client.request("GET", "/v1/x", [], None)


# --------------------------------------------------------------------------- strictness


def _fields(count: int, size: int = 1) -> bytes:
    return b"".join(b"X-F%d: %b\r\n" % (n, b"v" * size) for n in range(count))


INVALID_ANSWERS = [
    pytest.param(b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\nContent-Length: 0\r\n\r\n", id="cr-in-value"),
    pytest.param(b"HTTP/1.1 200 OK\r\nX-A: a\nContent-Length: 0\r\n\r\n", id="bare-lf-in-field"),
    pytest.param(b"HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n", id="bare-lf-after-status"),
    pytest.param(b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n", id="nul"),
    pytest.param(b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 0\r\n\r\n", id="obs-fold"),
    pytest.param(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n",
        id="length-and-chunked",
    ),
    pytest.param(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        id="two-lengths",
    ),
    pytest.param(
        b"HTTP/1.1 200 OK\r\n" + _fields(20, 3500) + b"Content-Length: 0\r\n\r\n",
        id="head-over-64KiB",
    ),
    pytest.param(
        b"HTTP/1.1 200 OK\r\n" + _fields(101) + b"Content-Length: 0\r\n\r\n",
        id="101-fields",
    ),
]


@pytest.mark.parametrize("answer", INVALID_ANSWERS)
async def test_malformed_answer_is_invalid(serve: Serve, connect: Connect, answer: bytes) -> None:
    """An answer llhttp must not accept, or past the head limits, is an invalid response."""

    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(answer)  # in one write: the limits must hold however bytes arrive
        await peer.until_eof()

    server = await serve(script)
    client = connect(server.origin)
    with pytest.raises(UpstreamUnreachable, match="invalid response"):
        await client.request("GET", "/v1/x", [], None)


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param(_fields(99), id="100-fields"),
        pytest.param(_fields(10, 6000), id="head-of-60KiB"),
    ],
)
async def test_answer_at_the_head_limits_is_accepted(
    serve: Serve, connect: Connect, fields: bytes
) -> None:
    """Exactly 100 header fields, or a 60 KiB head, are within the limits."""
    server = await serve(
        answering(b"HTTP/1.1 200 OK\r\n" + fields + b"Content-Length: 2\r\n\r\nok")
    )
    client = connect(server.origin)
    response = await client.request("GET", "/v1/x", [], None)
    assert len(response.headers) == fields.count(b"\r\n") + 1
    assert await response.read() == b"ok"


# --------------------------------------------------------------------------- failures


async def test_connection_refused_names_the_cause(connect: Connect, closed_port: int) -> None:
    """Nothing listening: UpstreamUnreachable saying the connection was refused, at once."""
    client = connect(URL(f"http://127.0.0.1:{closed_port}"))
    async with asyncio.timeout(1):
        with pytest.raises(UpstreamUnreachable) as caught:
            await client.request("GET", "/v1/x", [], None)
    assert "refused" in str(caught.value).lower()


async def test_silent_upstream_times_out_at_the_read_timeout(
    serve: Serve, connect: Connect
) -> None:
    """An upstream that accepts and never answers: UpstreamTimeout after read_timeout, closed."""

    async def script(peer: Peer) -> None:
        await peer.until_eof()

    server = await serve(script)
    client = connect(server.origin)
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout):
        await client.request("GET", "/v1/x", [], None)
    assert 0.9 * READ_TIMEOUT <= time.monotonic() - started < 2 * READ_TIMEOUT
    await asyncio.wait_for(server.wires[0].eof.wait(), 2)


async def test_stall_mid_body_times_out_in_readany(serve: Serve, connect: Connect) -> None:
    """An upstream that stalls mid-body: readany raises UpstreamTimeout after read_timeout."""

    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        await peer.until_eof()

    server = await serve(script)
    client = connect(server.origin)
    response = await client.request("GET", "/v1/x", [], None)
    assert await response.readany() == b"0123456789"
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout):
        await response.readany()
    assert 0.9 * READ_TIMEOUT <= time.monotonic() - started < 2 * READ_TIMEOUT
    await asyncio.wait_for(server.wires[0].eof.wait(), 2)


@pytest.mark.parametrize(
    "truncated",
    [
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789", id="length"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n",
            id="chunked",
        ),
    ],
)
@pytest.mark.parametrize("reader", ["readany", "read"])
async def test_close_mid_body_fails_the_read(
    serve: Serve, connect: Connect, truncated: bytes, reader: str
) -> None:
    """An upstream that closes before the body's end: the read raises, never a short body."""
    server = await serve(answering_once(truncated))
    client = connect(server.origin)
    response = await client.request("GET", "/v1/x", [], None)
    with pytest.raises(UpstreamUnreachable, match="mid-answer"):
        await (response.read() if reader == "read" else read_all(response))
    assert len(server.wires) == 1


@pytest.mark.parametrize("wrong", ["unknown-ca", "wrong-name"])
async def test_untrusted_certificate_is_unreachable(
    serve: Serve, connect: Connect, ca: trustme.CA, client_tls: ssl.SSLContext, wrong: str
) -> None:
    """A certificate from an unknown CA, or for another name: UpstreamUnreachable, nothing sent."""
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    issuer = trustme.CA() if wrong == "unknown-ca" else ca
    issuer.issue_cert("127.0.0.1" if wrong == "unknown-ca" else "elsewhere.example").configure_cert(
        server_tls
    )
    server = await serve(answering(ok(b"secret")), tls=server_tls)
    client = connect(server.origin, tls=client_tls)
    with pytest.raises(UpstreamUnreachable, match="certificate"):
        await client.request("GET", "/v1/x", [("Authorization", "Bearer t")], None)
    assert server.wires == []


async def test_trusted_tls_origin_works(
    serve: Serve, connect: Connect, server_ssl: ssl.SSLContext, client_tls: ssl.SSLContext
) -> None:
    """An origin whose certificate the given context trusts answers over TLS, kept alive."""
    server = await serve(answering(ok(b"one"), ok(b"two")), tls=server_ssl)
    client = connect(server.origin, tls=client_tls)
    assert await get(client) == b"one"
    assert await get(client) == b"two"
    assert len(server.wires) == 1
    assert server.requests[0].startswith(b"GET /v1/x HTTP/1.1\r\nHost: 127.0.0.1:")


async def test_failing_body_iterator_passes_its_error_through(
    serve: Serve, connect: Connect
) -> None:
    """What the body iterator raises reaches the caller unchanged; the connection is closed."""

    class CallerGone(Exception):
        pass

    async def broken() -> AsyncIterator[bytes]:
        yield b"part"
        raise CallerGone

    async def script(peer: Peer) -> None:
        await peer.until_eof()

    server = await serve(script)
    client = connect(server.origin)
    with pytest.raises(CallerGone):
        await client.request("POST", "/v1/x", [], broken())
    await asyncio.wait_for(server.wires[0].eof.wait(), 2)
    assert server.wires[0].received.endswith(b"\r\n\r\n4\r\npart\r\n")


async def test_bytes_after_a_complete_answer_end_the_connection(
    serve: Serve, connect: Connect
) -> None:
    """An upstream sending a second answer to one request is out of step: not reused."""
    server = await serve(answering(ok(b"one") + ok(b"extra"), ok(b"fresh")))
    client = connect(server.origin)
    assert await get(client) == b"one"
    await settle()
    assert await get(client) == b"fresh"
    assert len(server.wires) == 2


# --------------------------------------------------------------------------- early answers


class Upload:
    """A streamed request body of up to `limit` bytes; counts how much the client took."""

    def __init__(self, limit: int) -> None:
        self.limit, self.taken = limit, 0

    async def pieces(self) -> AsyncIterator[bytes]:
        """64 KiB pieces, yielding to the loop between them as a caller's body would."""
        block = b"u" * 65536
        while self.taken < self.limit:
            self.taken += len(block)
            yield block
            await asyncio.sleep(0)


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "content-length"])
@pytest.mark.parametrize("upstream_reads_on", [True, False], ids=["drains", "stops-reading"])
async def test_early_answer_during_upload_is_returned_and_not_reused(
    serve: Serve, connect: Connect, chunked: bool, upstream_reads_on: bool
) -> None:
    """A 413 sent while a large upload streams is returned at once; its connection is not reused."""

    answered_at = 0.0

    async def stalled() -> bool:
        before = upload.taken
        await asyncio.sleep(0.05)
        return upload.taken == before

    async def script(peer: Peer) -> None:
        nonlocal answered_at
        if peer.wire.index > 0:
            await answering(ok(b"after"))(peer)
            return
        await peer.head()
        await peer.body(65536)
        if not upstream_reads_on:
            await eventually(stalled)  # the client is blocked writing: its buffers are full
        answered_at = time.monotonic()
        await peer.send(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 9\r\n\r\ntoo large")
        if upstream_reads_on:
            await peer.until_eof()
        else:
            await peer.hold()

    upload = Upload(256 * MIB)
    server = await serve(script)
    client = connect(server.origin)
    response = await client.request(
        "PUT", "/v1/upload", [], upload.pieces(), None if chunked else upload.limit
    )
    assert time.monotonic() - answered_at < READ_TIMEOUT / 2
    assert response.status == 413
    assert await response.read() == b"too large"
    assert upload.taken < upload.limit
    try:
        assert await get(client, "/v1/after") == b"after"
    except UpstreamTimeout:
        pytest.fail("the next request went out on the connection still carrying the upload")
    assert len(server.wires) == 2
    assert server.wires[1].requests[0].startswith(b"GET /v1/after HTTP/1.1\r\n")
    if upstream_reads_on:
        await asyncio.wait_for(server.wires[0].eof.wait(), 2)


# --------------------------------------------------------------------------- back-pressure


async def test_large_answer_read_slowly_arrives_byte_exact(serve: Serve, connect: Connect) -> None:
    """A 64 MiB answer read slowly: the client stops reading the socket, and every byte arrives."""
    size = 64 * MIB
    sent = 0

    async def script(peer: Peer) -> None:
        nonlocal sent
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        for piece in pattern(size):
            await peer.send(piece)
            sent += len(piece)
        await peer.until_eof()

    server = await serve(script)
    client = connect(server.origin, read_timeout=5.0)
    response = await client.request("GET", "/v1/download", [], None)
    digest = hashlib.sha256(await response.readany())
    pieces = 0

    async def upstream_blocked() -> bool:
        before = sent
        await asyncio.sleep(0.05)
        return sent == before

    # While the caller reads nothing, the upstream's writes stall: the client buffers a bounded
    # amount (plus what the kernel holds), not the whole answer.
    await eventually(upstream_blocked, within=5.0)
    assert sent < size // 2
    while piece := await response.readany():
        digest.update(piece)
        pieces += 1
        if pieces % 16 == 0:  # slowly: the client pauses and resumes many times
            await asyncio.sleep(0.001)
    assert digest.hexdigest() == pattern_sha256(size)
    assert len(server.wires) == 1


async def test_close_ends_pooled_connections(serve: Serve, connect: Connect) -> None:
    """close() closes every pooled connection: the upstream sees EOF on each."""
    server = await serve(answering(ok(b"x")))
    client = connect(server.origin)
    assert list(await asyncio.gather(get(client), get(client))) == [b"x", b"x"]
    assert len(server.wires) == 2
    assert not any(wire.eof.is_set() for wire in server.wires)
    await client.close()
    async with asyncio.timeout(2):
        for wire in server.wires:
            await wire.eof.wait()
