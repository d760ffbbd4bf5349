"""The CONNECT tunnel against scripted proxies on loopback, and its answer parsing held to
http.client's (the tunnel reader under urllib3 and requests)."""

from __future__ import annotations

import asyncio
import http.client
import io
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.egress import parse_proxy_url
from gateway.errors import UpstreamTimeout, UpstreamUnreachable
from gateway.tunnel import _ConnectAnswer, _TunnelClosed, open_through_proxy

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class ScriptedProxy:
    """A loopback server that records what it was sent and answers as its script says."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.received: list[bytes] = []
        self.port = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        self.received.append(head)
        try:
            await self.script(reader, writer)
        finally:
            writer.close()


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[[Script], Awaitable[ScriptedProxy]]]:
    """Factory: a scripted proxy listening on 127.0.0.1 until the test ends."""
    servers: list[asyncio.Server] = []

    async def start(script: Script) -> ScriptedProxy:
        proxy = ScriptedProxy(script)
        server = await asyncio.start_server(proxy._serve, "127.0.0.1", 0)
        proxy.port = server.sockets[0].getsockname()[1]
        servers.append(server)
        return proxy

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


def answering(data: bytes, *, then_wait: float = 0.0) -> Script:
    """A script that writes `data`, then waits (keeping the connection open) or closes."""

    async def script(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()
        await asyncio.sleep(then_wait)

    return script


async def open_tunnel(port: int, url: str = "http://127.0.0.1", within: float = 2.0) -> None:
    """Open a tunnel to upstream.example:443 through the scripted proxy on `port`."""
    await open_through_proxy(
        asyncio.Protocol,
        parse_proxy_url(f"{url}:{port}"),
        host="upstream.example",
        port=443,
        tls=ssl.create_default_context(),
        connect_timeout=within,
    )


async def test_connect_request_names_the_upstream_and_carries_credentials(
    scripted: Callable[[Script], Awaitable[ScriptedProxy]],
) -> None:
    """CONNECT host:port with Host and Basic Proxy-Authorization, nothing else."""
    proxy = await scripted(answering(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n"))
    with pytest.raises(UpstreamUnreachable) as caught:
        await open_tunnel(proxy.port, "http://us%40er:p%40ss:w@127.0.0.1")
    assert proxy.received == [
        (
            b"CONNECT upstream.example:443 HTTP/1.1\r\nHost: upstream.example:443\r\n"
            b"Proxy-Authorization: Basic dXNAZXI6cEBzczp3\r\n\r\n"
        )
    ]
    assert str(caught.value) == (
        f"the egress proxy 127.0.0.1:{proxy.port} refused the tunnel to upstream.example:443: "
        "407 Proxy Authentication Required"
    )


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        pytest.param(
            b"HTTP/1.1 200 OK\r\n\r\nearly bytes",
            "sent bytes after its CONNECT answer",
            id="bytes-after-2xx",
        ),
        pytest.param(b"SSH-2.0-OpenSSH\r\n\r\n", "is not HTTP", id="not-http"),
        pytest.param(b"", "it closed the connection", id="closed"),
        pytest.param(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 3000, "too large", id="huge-head"),
        pytest.param(
            b"HTTP/1.1 502 Whatever the proxy says\r\n\r\n", "502 Bad Gateway", id="502-phrase"
        ),
    ],
)
async def test_tunnel_failures_name_the_proxy(
    scripted: Callable[[Script], Awaitable[ScriptedProxy]], answer: bytes, message: str
) -> None:
    """Anything but a clean 2xx head ends the attempt with a 502 naming the proxy."""
    proxy = await scripted(answering(answer, then_wait=1.0))
    with pytest.raises(UpstreamUnreachable) as caught:
        await open_tunnel(proxy.port)
    assert f"egress proxy 127.0.0.1:{proxy.port}" in str(caught.value)
    assert message in str(caught.value)
    assert "Whatever" not in str(caught.value)


async def test_a_silent_proxy_times_out_naming_the_proxy(
    scripted: Callable[[Script], Awaitable[ScriptedProxy]],
) -> None:
    """A proxy that never answers CONNECT: a 504 after the connect timeout, naming it."""
    proxy = await scripted(answering(b"", then_wait=5.0))
    with pytest.raises(UpstreamTimeout) as caught:
        await open_tunnel(proxy.port, within=0.3)
    assert str(caught.value) == (
        f"waiting for the egress proxy 127.0.0.1:{proxy.port} to open a tunnel timed out"
    )


async def test_an_unresolvable_proxy_is_named() -> None:
    """A proxy host that does not resolve: named, with its name, not the upstream's."""
    with pytest.raises(UpstreamUnreachable) as caught:
        await open_tunnel(3128, "http://proxy.invalid")
    assert str(caught.value) == (
        "cannot connect to the egress proxy proxy.invalid:3128 (cannot resolve proxy.invalid)"
    )


# --------------------------------------------------------------------------- reference


class _FakeTransport:
    def __init__(self) -> None:
        self.aborted = False

    def write(self, _data: bytes) -> None:
        """Ignored: the answer is scripted."""

    def abort(self) -> None:
        self.aborted = True


class _FakeSocket:
    def __init__(self, data: bytes) -> None:
        self._file = io.BytesIO(data)

    def makefile(self, _mode: str) -> io.BytesIO:
        return self._file


def reference_status(answer: bytes) -> int | None:
    """http.client's reading of a CONNECT answer: its status, or None if it is refused."""
    response = http.client.HTTPResponse(_FakeSocket(answer))  # type: ignore[arg-type]
    try:
        _, status, _ = response._read_status()  # type: ignore[attr-defined]
    except (http.client.HTTPException, ValueError):
        return None
    return int(status)


async def our_status(answer: bytes) -> int | None:
    """Ours: the status _ConnectAnswer settles on, or None if it refuses the answer."""
    reader = _ConnectAnswer()
    reader.connection_made(_FakeTransport())  # type: ignore[arg-type]
    reader.data_received(answer)
    if not reader.status.done():
        reader.connection_lost(None)
    try:
        return await reader.status
    except _TunnelClosed:
        return None


versions = st.sampled_from(("HTTP/1.1", "HTTP/1.0", "HTTP/2", "http/1.1", "HTTP/1.1 ", "ICY"))
statuses = st.sampled_from(("200", "204", "299", "407", "403", "502", "99", "2000", "20x"))
reasons = st.sampled_from(("", " ", " OK", " Connection established", " Proxy \u00e9"))
fields = st.lists(st.sampled_from(("Via: 1.1 p", "Proxy-Agent: x", "Content-Length: 0")))


@settings(max_examples=200, deadline=None)
@given(version=versions, status=statuses, reason=reasons, header_lines=fields)
async def test_connect_answers_read_as_http_client_reads_them(
    version: str, status: str, reason: str, header_lines: list[str]
) -> None:
    """Generated CONNECT answers: the same status as http.client, or a documented strictness."""
    head = f"{version} {status}{reason}\r\n" + "".join(f"{f}\r\n" for f in header_lines)
    answer = (head + "\r\n").encode("utf-8")
    ours, reference = await our_status(answer), reference_status(answer)
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        # Stricter (SECURITY.md): only HTTP/1.0 and 1.1 status lines; http.client takes any
        # `HTTP/` prefix (and a version it cannot read it treats as refused).
        assert ours is None
        return
    assert ours == reference, answer
