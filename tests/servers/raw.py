"""Raw loopback servers whose scripts write exact wire bytes, for tests of the upstream client.

A script drives the server's end of each accepted connection (`Peer`); `BioTls` puts TLS
under a script with the test in charge of how it ends (with or without close_notify).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from yarl import URL

if TYPE_CHECKING:
    from gateway.upstream import Response


@dataclass
class Wire:
    """One accepted connection: every byte that arrived on it, and whether the client ended it."""

    index: int
    received: bytearray = field(default_factory=bytearray)
    requests: list[bytes] = field(default_factory=list)
    eof: asyncio.Event = field(default_factory=asyncio.Event)


class Peer:
    """The server's end of one connection, as a script drives it."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        wire: Wire,
        stopping: asyncio.Event,
    ) -> None:
        self.reader, self.writer, self.wire = reader, writer, wire
        self._stopping = stopping

    async def _take(self, read: Awaitable[bytes]) -> bytes:
        try:
            data = await read
        except asyncio.IncompleteReadError as exc:
            self.wire.received += exc.partial
            self.wire.eof.set()
            raise
        self.wire.received += data
        return data

    async def head(self) -> bytes | None:
        """The next request head (up to the blank line); None once the client closed."""
        try:
            return await self._take(self.reader.readuntil(b"\r\n\r\n"))
        except asyncio.IncompleteReadError:
            return None

    async def request(self) -> bytes | None:
        """The next whole request as it arrived, body read by its framing; None at EOF."""
        head = await self.head()
        if head is None:
            return None
        fields = {
            name.strip().lower(): value.strip()
            for name, _, value in (
                line.partition(b":") for line in head.split(b"\r\n")[1:] if b":" in line
            )
        }
        body = b""
        try:
            if fields.get(b"transfer-encoding", b"").lower() == b"chunked":
                while True:
                    size_line = await self._take(self.reader.readuntil(b"\r\n"))
                    body += size_line
                    size = int(size_line.split(b";")[0], 16)
                    if size == 0:
                        while (trailer := await self._take(self.reader.readuntil(b"\r\n"))) != (
                            b"\r\n"
                        ):
                            body += trailer
                        body += b"\r\n"
                        break
                    body += await self._take(self.reader.readexactly(size + 2))
            elif b"content-length" in fields:
                body = await self._take(self.reader.readexactly(int(fields[b"content-length"])))
        except asyncio.IncompleteReadError:
            return None
        except ValueError:
            return None  # framing that is not HTTP: the test's assertions on `requests` show it
        self.wire.requests.append(head + body)
        return head + body

    async def body(self, size: int) -> bytes:
        """Exactly `size` more bytes of the request body."""
        return await self._take(self.reader.readexactly(size))

    async def until_eof(self) -> None:
        """Read (and record) everything until the client closes the connection."""
        while data := await self._take(self.reader.read(65536)):
            del data
        self.wire.eof.set()

    async def send(self, data: bytes) -> None:
        """Write `data` and wait until the transport took it."""
        self.writer.write(data)
        await self.writer.drain()

    async def hold(self) -> None:
        """Keep the connection open, reading nothing, until the server stops."""
        await self._stopping.wait()

    async def close(self) -> None:
        """Close the server's end of the connection."""
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


Script = Callable[[Peer], Awaitable[None]]


class RawServer:
    """A loopback server whose script writes raw bytes; it records every connection."""

    def __init__(self, script: Script, tls: ssl.SSLContext | None) -> None:
        self.script, self.tls = script, tls
        self.wires: list[Wire] = []
        self.errors: list[BaseException] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self._stopping = asyncio.Event()
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def origin(self) -> URL:
        """The scheme, host and port the client is bound to."""
        return URL(f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}")

    @property
    def requests(self) -> list[bytes]:
        """Every whole request that arrived, over all connections, in connection order."""
        return [request for wire in self.wires for request in wire.requests]

    async def start(self) -> None:
        """Listen on an ephemeral loopback port."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and end every connection's script."""
        assert self._server is not None
        self._server.close()
        # Ended by EOF, not cancelled: Python 3.11's start_server logs cancelled handlers
        # as errors (https://github.com/python/cpython/issues/113538).
        self._stopping.set()
        for writer in self._writers:
            writer.transport.abort()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)
        await self._server.wait_closed()
        if self.errors:
            raise self.errors[0]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.append(writer)
        wire = Wire(len(self.wires))
        self.wires.append(wire)
        try:
            await self.script(Peer(reader, writer, wire, self._stopping))
        except (ConnectionError, asyncio.IncompleteReadError):
            wire.eof.set()  # the client reset or closed the connection mid-script
        except Exception as exc:  # noqa: BLE001 - raised again when the server stops
            self.errors.append(exc)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await asyncio.wait_for(writer.wait_closed(), 1)


def answering(*answers: bytes) -> Script:
    """Each request, on any connection, gets the next of `answers` (the last one repeats)."""
    queue = list(answers)

    async def script(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.send(queue.pop(0) if len(queue) > 1 else queue[0])

    return script


def answering_once(answer: bytes) -> Script:
    """Read one request, send `answer` and close the connection."""

    async def script(peer: Peer) -> None:
        if await peer.request() is not None:
            await peer.send(answer)
        await peer.close()

    return script


def reset(writer: asyncio.StreamWriter) -> None:
    """End the connection with a TCP reset instead of a FIN (SO_LINGER with a zero timeout)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class BioTls:
    """TLS spoken over a plain stream by the script itself, so it decides how TLS ends."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, context: ssl.SSLContext
    ) -> None:
        self.reader, self.writer = reader, writer
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._plain = bytearray()

    async def _flush(self) -> None:
        data = self._outgoing.read()
        if data:
            self.writer.write(data)
            await self.writer.drain()

    async def _more(self) -> bool:
        await self._flush()
        data = await self.reader.read(65536)
        if not data:
            return False
        self._incoming.write(data)
        return True

    async def handshake(self) -> bool:
        """Complete the server side of the handshake; False if the client went away."""
        while True:
            try:
                self._tls.do_handshake()
                await self._flush()
                return True
            except ssl.SSLWantReadError:
                if not await self._more():
                    return False

    async def head(self) -> bytes | None:
        """The next request head (bodyless requests only); None at EOF."""
        while b"\r\n\r\n" not in self._plain:
            try:
                self._plain += self._tls.read(65536)
            except ssl.SSLWantReadError:
                if not await self._more():
                    return None
            except ssl.SSLZeroReturnError:
                return None
        head, _, rest = bytes(self._plain).partition(b"\r\n\r\n")
        self._plain = bytearray(rest)
        return head + b"\r\n\r\n"

    async def send(self, data: bytes) -> None:
        """Write `data` as TLS application data."""
        self._tls.write(data)
        await self._flush()

    async def end(self, *, close_notify: bool, tcp_reset: bool = False) -> None:
        """End TLS with close_notify (a clean end) or without it (a truncation), then TCP."""
        if close_notify:
            with contextlib.suppress(ssl.SSLWantReadError):
                self._tls.unwrap()
            await self._flush()
        if tcp_reset:
            reset(self.writer)
        else:
            self.writer.close()


async def read_all(response: Response) -> bytes:
    """The whole body of an upstream client's answer, piece by piece through readany."""
    pieces = []
    while piece := await response.readany():
        pieces.append(piece)
    return b"".join(pieces)
