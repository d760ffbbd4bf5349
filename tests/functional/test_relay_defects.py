"""Issue 11's proxy-path defects as callers of a running gateway see them, upstream scripted raw.

Every test here failed on the gateway before the fix (f026d08).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import socket
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from gateway.sandbox.issuer import TokenIssuer
from tests.conftest import RunningGateway, StartGateway
from tests.servers.raw import BioTls, Peer, RawServer, Script, answering, reset

KIB = 1024
MIB = 1024 * KIB


def answer(status: bytes, body: bytes, *fields: bytes) -> bytes:
    """An answer framed by Content-Length, with extra header lines."""
    extra = b"".join(line + b"\r\n" for line in fields)
    return b"HTTP/1.1 %b\r\nContent-Length: %d\r\n%b\r\n%b" % (status, len(body), extra, body)


@pytest.fixture
async def raw_servers() -> AsyncIterator[list[RawServer]]:
    """Raw upstreams started by a test, stopped after it."""
    started: list[RawServer] = []
    yield started
    for server in started:
        await server.stop()


async def gateway_to(
    start_gateway: StartGateway,
    raw_servers: list[RawServer],
    script: Script,
    *,
    tls: bool = False,
    **overrides: str,
) -> tuple[RunningGateway, RawServer]:
    """A raw upstream running `script`, and a gateway forwarding /… to its /v1/…."""
    server = RawServer(script, None)
    await server.start()
    raw_servers.append(server)
    scheme = "https" if tls else "http"
    env = {
        "CIGW_UPSTREAM_URL": f"{scheme}://127.0.0.1:{server.port}/v1",
        "CIGW_UPSTREAM_TIMEOUT": "3",
        "CIGW_RETRY_ATTEMPTS": "0",
        **{f"CIGW_{name.upper()}": value for name, value in overrides.items()},
    }
    return await start_gateway(env), server


async def slow_reader(
    port: int, request: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A caller with a tiny receive window that sends `request` and then reads nothing."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 16)
    writer.write(request)
    await writer.drain()
    return reader, writer


# --------------------------------------------------------------------------- 1. paused pool


async def test_retry_after_an_answer_completed_while_paused_is_not_stuck(
    start_gateway: StartGateway, raw_servers: list[RawServer]
) -> None:
    """A 600 KiB 503 read whole while paused, then a retry: the retry is answered, not a 504."""
    first = answer(b"503 Service Unavailable", bytes(600 * KIB))
    gw, _ = await gateway_to(
        start_gateway,
        raw_servers,
        answering(first, answer(b"200 OK", b"retried")),
        retry_attempts="1",
    )
    started = time.monotonic()
    async with gw.session.get(gw.url("/x")) as response:
        body = await response.read()
    assert (response.status, body) == (200, b"retried")
    assert time.monotonic() - started < 2.5  # the upstream timeout is 3 s


# --------------------------------------------------------------------------- 2. trailers


async def test_one_callers_trailer_never_reaches_another_caller(
    start_gateway: StartGateway, raw_servers: list[RawServer]
) -> None:
    """Caller A's answer carries a Set-Cookie trailer; caller B's answer never shows it."""
    for_a = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"1\r\na\r\n0\r\nSet-Cookie: session=caller-a-secret\r\n\r\n"
    )
    gw, server = await gateway_to(
        start_gateway, raw_servers, answering(for_a, answer(b"200 OK", b"b"))
    )
    async with gw.session.get(gw.url("/a")) as response:
        assert await response.read() == b"a"
        assert "Set-Cookie" not in response.headers
    async with gw.session.get(gw.url("/b")) as response:
        assert await response.read() == b"b"
        assert "Set-Cookie" not in response.headers
        assert "caller-a-secret" not in str(response.headers)
    assert len(server.wires) == 1  # both went over one upstream connection


# --------------------------------------------------------------------------- 3. interim bodies


async def test_interim_answer_with_a_body_is_502_not_a_forged_answer(
    start_gateway: StartGateway, raw_servers: list[RawServer]
) -> None:
    """A 1xx carrying bytes: the caller gets 502, never those bytes in a body."""
    forged = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged"
    interim = b"HTTP/1.1 150 Odd\r\nContent-Length: %d\r\n\r\n%b" % (len(forged), forged)
    gw, _ = await gateway_to(
        start_gateway, raw_servers, answering(interim + answer(b"200 OK", b"real"))
    )
    async with gw.session.get(gw.url("/x")) as response:
        body = await response.read()
    assert response.status == 502
    assert b"forged" not in body


# --------------------------------------------------------------------------- 4. send timeout


async def test_caller_that_reads_nothing_is_cut_off_and_frees_its_slot(
    start_gateway: StartGateway, raw_servers: list[RawServer]
) -> None:
    """A caller accepting no bytes for CIGW_CLIENT_TIMEOUT is reset; its slot serves the next."""
    upstream_ended = asyncio.Event()

    async def script(peer: Peer) -> None:
        while (head := await peer.request()) is not None:
            if b"/v1/big" not in head:
                await peer.send(answer(b"200 OK", b"small"))
                continue
            await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (256 * MIB))
            try:
                for _ in range(256 * MIB // (64 * KIB)):
                    await peer.send(bytes(64 * KIB))
            except ConnectionError:
                upstream_ended.set()
                return

    gw, _ = await gateway_to(
        start_gateway,
        raw_servers,
        script,
        client_timeout="1",
        max_connections="1",
        connection_wait="0.2",
    )
    reader, writer = await slow_reader(
        gw.gateway.proxy_port, b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    try:
        async with asyncio.timeout(6):
            while True:  # the slot is busy while the stalled caller holds it
                async with gw.session.get(gw.url("/small")) as response:
                    if response.status == 200:
                        assert await response.read() == b"small"
                        break
                    assert response.status == 503
                await asyncio.sleep(0.2)
        async with asyncio.timeout(3):
            await upstream_ended.wait()  # its upstream exchange was aborted
        cut_off = False
        try:
            async with asyncio.timeout(3):
                while await reader.read(65536):
                    pass
        except ConnectionResetError:
            cut_off = True
        assert cut_off, "the stalled caller's connection was ended cleanly, not reset"
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


# --------------------------------------------------------------------------- 5. truncation


@pytest.mark.parametrize("ending", ["tcp-reset", "tls-without-close_notify"])
async def test_truncated_close_delimited_answer_reaches_the_caller_aborted(
    start_gateway: StartGateway,
    raw_servers: list[RawServer],
    server_ssl: ssl.SSLContext,
    ca_file: Path,
    ending: str,
) -> None:
    """A close-delimited answer cut by a reset, or TLS without close_notify: aborted for callers."""
    head = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"

    async def plain(peer: Peer) -> None:
        await peer.request()
        await peer.send(head + b"partial")
        await asyncio.sleep(0.1)
        reset(peer.writer)

    async def tls(peer: Peer) -> None:
        wrapped = BioTls(peer.reader, peer.writer, server_ssl)
        if not await wrapped.handshake() or await wrapped.head() is None:
            return
        await wrapped.send(head + b"partial")
        await asyncio.sleep(0.1)
        await wrapped.end(close_notify=False)

    if ending == "tcp-reset":
        gw, _ = await gateway_to(start_gateway, raw_servers, plain)
    else:
        gw, _ = await gateway_to(
            start_gateway, raw_servers, tls, tls=True, upstream_ca_file=str(ca_file)
        )
    async with gw.session.get(gw.url("/x")) as response:
        assert response.status == 200  # the head was relayed before the end came
        with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError)):
            await response.read()


async def test_close_delimited_answer_with_close_notify_is_complete(
    start_gateway: StartGateway,
    raw_servers: list[RawServer],
    server_ssl: ssl.SSLContext,
    ca_file: Path,
) -> None:
    """The same answer ended by TLS close_notify arrives complete (the control case)."""

    async def tls(peer: Peer) -> None:
        wrapped = BioTls(peer.reader, peer.writer, server_ssl)
        if not await wrapped.handshake() or await wrapped.head() is None:
            return
        await wrapped.send(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nwhole")
        await asyncio.sleep(0.1)
        await wrapped.end(close_notify=True)

    gw, _ = await gateway_to(
        start_gateway, raw_servers, tls, tls=True, upstream_ca_file=str(ca_file)
    )
    async with gw.session.get(gw.url("/x")) as response:
        assert await response.read() == b"whole"


# --------------------------------------------------------------------------- 6. leaks


def unfinished(status: bytes, first_part: bytes, declared: int, *fields: bytes) -> Script:
    """Answer `status` declaring `declared` body bytes, send `first_part`, then read until EOF."""

    async def script(peer: Peer) -> None:
        await peer.request()
        extra = b"".join(line + b"\r\n" for line in fields)
        await peer.send(
            b"HTTP/1.1 %b\r\nContent-Length: %d\r\n%b\r\n%b" % (status, declared, extra, first_part)
        )
        await peer.until_eof()

    return script


async def caller_leaves(gw: RunningGateway, after: float) -> None:
    """A caller that sends a GET and hangs up `after` seconds later, before any answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.proxy_port)
    writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    await asyncio.sleep(after)
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
    del reader


async def test_caller_leaving_during_a_retry_backoff_frees_the_upstream_connection(
    start_gateway: StartGateway, raw_servers: list[RawServer]
) -> None:
    """A 503 with Retry-After: 2, its body unfinished; the caller leaves: the upstream sees EOF."""
    script = unfinished(b"503 Service Unavailable", b"partial", 1000, b"Retry-After: 2")
    gw, server = await gateway_to(start_gateway, raw_servers, script, retry_attempts="1")
    await caller_leaves(gw, 0.5)
    async with asyncio.timeout(1.2):  # before the back-off would have ended
        await server.wires[0].eof.wait()


async def test_caller_leaving_during_a_token_refresh_frees_the_upstream_connection(
    start_gateway: StartGateway, raw_servers: list[RawServer], issuer: TokenIssuer
) -> None:
    """A 401 naming the token, its body unfinished; the caller leaves during the refresh: EOF."""
    body = b'{"error": "invalid_token"}' + b" " * (70 * KIB)
    script = unfinished(
        b"401 Unauthorized", body, 200 * KIB, b'WWW-Authenticate: Bearer error="invalid_token"'
    )
    gw, server = await gateway_to(start_gateway, raw_servers, script)
    issuer.faults.delay = 3.0  # the refresh hangs
    await caller_leaves(gw, 0.5)
    async with asyncio.timeout(1.5):
        await server.wires[0].eof.wait()


# --------------------------------------------------------------------------- 9. early answers


async def test_early_413_reaches_a_caller_paused_mid_upload(
    start_gateway: StartGateway, raw_servers: list[RawServer]
) -> None:
    """The upstream answers 413 while the caller pauses its upload: the caller has it at once."""

    async def script(peer: Peer) -> None:
        await peer.head()
        await peer.body(64 * KIB)
        await peer.send(answer(b"413 Payload Too Large", b"too large"))
        await peer.until_eof()

    gw, _ = await gateway_to(start_gateway, raw_servers, script, client_timeout="10")
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.proxy_port)
    try:
        writer.write(b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        piece = b"u" * (64 * KIB)
        for _ in range(24):  # 1.5 MiB: past what the gateway keeps for a replay
            writer.write(b"%x\r\n%b\r\n" % (len(piece), piece))
        await writer.drain()
        # ... and then the caller pauses, its connection open.
        try:
            async with asyncio.timeout(2):
                status_line = await reader.readuntil(b"\r\n")
        except TimeoutError:
            pytest.fail("the 413 waited for the caller's next piece")
        assert status_line.startswith(b"HTTP/1.1 413")
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


# --------------------------------------------------------------------------- 8. transfer codings


async def test_transfer_coded_answer_is_relayed_with_its_coding_named(
    start_gateway: StartGateway, raw_servers: list[RawServer]
) -> None:
    """Transfer-Encoding: gzip framed by close reaches the caller byte-exact as Content-Encoding."""
    payload = gzip.compress(b"coded payload " * 50)

    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n" + payload)
        await peer.close()

    gw, _ = await gateway_to(start_gateway, raw_servers, script)
    async with gw.session.get(gw.url("/x")) as response:
        body = await response.read()
        assert response.status == 200
        assert response.headers["Content-Encoding"] == "gzip"
    assert body == payload


# --------------------------------------------------------------------------- 13. housekeeping


async def test_upstream_idle_timeout_setting_reaps_idle_connections(
    start_gateway: StartGateway, raw_servers: list[RawServer]
) -> None:
    """With CIGW_UPSTREAM_IDLE_TIMEOUT=0.3 the gateway closes an idle upstream connection itself."""
    gw, server = await gateway_to(
        start_gateway, raw_servers, answering(answer(b"200 OK", b"ok")), upstream_idle_timeout="0.3"
    )
    async with gw.session.get(gw.url("/x")) as response:
        assert await response.read() == b"ok"
    async with asyncio.timeout(2):
        await server.wires[0].eof.wait()
