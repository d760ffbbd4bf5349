"""Tools for the security suite: a raw HTTP client, a gateway subprocess, a leak ledger.

The raw client writes bytes exactly as given and reads responses with its own small
parser, so neither side's HTTP library tidies a hostile request or a broken answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import signal
import ssl
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler

from tests.servers.upstream import Upstream

# An issued bearer token is a JWT; any JWT in captured output is a leaked token.
JWT = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{16,}")
CREDENTIAL_HEADERS = frozenset({"authorization", "ocp-apim-subscription-key"})
PARSERS = ("c", "python")


# --------------------------------------------------------------------------- leak ledger


@dataclass
class Ledger:
    """Every text the suite saw leave a gateway, and every secret that must not be in it."""

    canaries: set[str] = field(default_factory=set)
    texts: list[tuple[str, str]] = field(default_factory=list)

    def secret(self, *values: str) -> None:
        """Add canary values (client secret, keys, passwords, issued tokens)."""
        self.canaries.update(value for value in values if value)

    def record(self, where: str, text: str | bytes) -> None:
        """Keep `text` (output, a response, a page) for the scan."""
        if isinstance(text, bytes):
            text = text.decode("latin-1")
        self.texts.append((where, text))

    def leaks(self, texts: Iterable[tuple[str, str]] | None = None) -> list[str]:
        """`where: what` for every canary or JWT found; empty when nothing leaked."""
        found: list[str] = []
        for where, text in self.texts if texts is None else texts:
            found.extend(
                f"{where}: canary {canary[:12]}…" for canary in self.canaries if canary in text
            )
            found.extend(f"{where}: a JWT" for _ in JWT.finditer(text))
        return found


# --------------------------------------------------------------------------- raw HTTP


@dataclass
class RawResponse:
    """One response as it came off the wire."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    raw: bytes

    def header(self, name: str) -> list[str]:
        """Every value of header `name` (case-insensitive)."""
        return [value for key, value in self.headers if key.lower() == name.lower()]

    def json(self) -> Any:
        """The body as JSON."""
        return json.loads(self.body)

    @property
    def closes(self) -> bool:
        """True when the response announced the end of the connection."""
        return any("close" in value.lower() for value in self.header("Connection"))

    @property
    def error_code(self) -> str | None:
        """The gateway's JSON error code, when the body is one."""
        with contextlib.suppress(ValueError, TypeError, KeyError, AttributeError):
            code = self.json()["error"]["code"]
            return str(code)
        return None


class ConnectionClosedError(Exception):
    """The server closed the connection before a complete response."""


class RawClient:
    """One TCP connection; writes bytes as given, reads responses with a small parser."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ledger: Ledger
    ) -> None:
        self.reader, self.writer, self.ledger = reader, writer, ledger

    @classmethod
    async def connect(
        cls, port: int, ledger: Ledger, tls: ssl.SSLContext | None = None
    ) -> RawClient:
        """Open a connection to 127.0.0.1:`port`, over TLS when `tls` is given."""
        reader, writer = await asyncio.open_connection(
            "127.0.0.1",
            port,
            limit=1 << 22,
            ssl=tls,
            server_hostname="127.0.0.1" if tls else None,
        )
        return cls(reader, writer, ledger)

    async def send(self, data: bytes) -> None:
        """Write bytes as they are."""
        self.writer.write(data)
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()

    async def response(self, *, head: bool = False, within: float = 10.0) -> RawResponse:
        """Read one response; ConnectionClosedError if the server hung up first."""
        async with asyncio.timeout(within):
            response = await self._read(head)
        self.ledger.record("response", response.raw)
        return response

    async def closed(self, within: float = 5.0) -> bool:
        """True when the server closes the connection (reads EOF or a reset) in time."""
        try:
            async with asyncio.timeout(within):
                return await self.reader.read(1) == b""
        except ConnectionError:
            return True
        except TimeoutError:
            return False

    async def close(self) -> None:
        """Close our end."""
        self.writer.close()
        # Over TLS our close_notify can cross answer bytes the gateway is still sending
        # (a fuzzed request may draw answers nobody reads): OpenSSL then reports
        # APPLICATION_DATA_AFTER_CLOSE_NOTIFY from our own shutdown, which says nothing
        # about the gateway.
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()

    async def _read(self, head: bool) -> RawResponse:
        try:
            header_block = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            raise ConnectionClosedError("closed before a response") from None
        lines = header_block[:-4].split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        status_text, _, reason = rest.partition(b" ")
        if not version.startswith(b"HTTP/") or not status_text.isdigit():
            raise AssertionError(f"not an HTTP response: {lines[0]!r}")
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.append((name.decode("latin-1"), value.strip().decode("latin-1")))
        status = int(status_text)
        by_name = {name.lower(): value for name, value in headers}
        body = b""
        try:
            if head or status in (204, 304) or 100 <= status < 200:
                pass
            elif "chunked" in by_name.get("transfer-encoding", "").lower():
                body = await self._chunked()
            elif "content-length" in by_name:
                body = await self.reader.readexactly(int(by_name["content-length"]))
            else:
                body = await self.reader.read()
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise ConnectionClosedError("closed in the middle of a body") from exc
        return RawResponse(status, reason.decode("latin-1"), headers, body, header_block + body)

    async def _chunked(self) -> bytes:
        body = bytearray()
        while True:
            size_line = await self.reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")
                return bytes(body)
            body += await self.reader.readexactly(size)
            await self.reader.readexactly(2)


async def exchange(port: int, data: bytes, ledger: Ledger) -> RawResponse:
    """Send `data` on a fresh connection and read one response."""
    client = await RawClient.connect(port, ledger)
    try:
        await client.send(data)
        return await client.response()
    finally:
        await client.close()


# --------------------------------------------------------------------------- upstream


def _redacted(headers: list[list[str]]) -> list[list[str]]:
    # The echo shows which credential arrived by fingerprint, so echoed bodies can be
    # scanned for canaries like every other answer a caller gets.
    return [
        [name, "sha256:" + hashlib.sha256(value.encode()).hexdigest()[:16]]
        if name.lower() in CREDENTIAL_HEADERS
        else [name, value]
        for name, value in headers
    ]


def key_name(piece: str) -> str:
    """A query parameter's name as the most lenient server would read it."""
    return unquote_plus(piece.split("=", 1)[0]).strip().lstrip("?").strip().lower()


def fingerprint(value: str) -> str:
    """What the redacting echo shows in place of a credential value."""
    return "sha256:" + hashlib.sha256(value.encode()).hexdigest()[:16]


# Raw answers the test upstream writes straight to the socket (aiohttp would refuse them).
RAW_ANSWERS: Mapping[str, bytes] = {
    "cr-in-value": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Note: a\rSet-Cookie: x=1\r\n\r\nok",
    "lf-in-value": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Note: a\nSet-Cookie: x=1\r\n\r\nok",
    "nul-in-value": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Note: a\x00b\r\n\r\nok",
    "obs-fold": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Note: a\r\n Set-Cookie: x=1\r\n\r\nok",
}


class SecurityUpstream(Upstream):
    """The APIM-like upstream with credential-redacting echoes and raw broken answers."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Every request that arrived, including those the APIM guard refused: (method, path, key).
        self.arrivals: list[tuple[str, str, str | None]] = []

    def app(self) -> web.Application:
        """The upstream application, with arrivals recorded in front of the APIM guard."""
        application = super().app()

        @web.middleware
        async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
            key = request.headers.get("Ocp-Apim-Subscription-Key")
            self.arrivals.append((request.method, request.raw_path, key))
            return await handler(request)

        application.middlewares.insert(0, record)
        return application

    async def _route(self, request: web.Request) -> web.StreamResponse:
        path = request.raw_path.split("?", 1)[0]
        name = path.removeprefix("/v1/raw/")
        if path.startswith("/v1/raw/") and name in RAW_ANSWERS:
            await request.read()
            self._record(request, b"")
            assert request.transport is not None
            request.transport.write(RAW_ANSWERS[name])
            request.transport.close()
            return web.Response()
        response = await super()._route(request)
        if isinstance(response, web.Response) and isinstance(response.body, bytes):
            with contextlib.suppress(ValueError, TypeError):
                data = json.loads(response.body)
                if isinstance(data, dict) and "headers" in data:
                    data["headers"] = _redacted(data["headers"])
                    return web.json_response(data, status=response.status)
        return response


# --------------------------------------------------------------------------- subprocess gateway


@dataclass
class GatewayProcess:
    """`python -m gateway serve` in a child process, its output kept line by line."""

    process: asyncio.subprocess.Process
    ledger: Ledger
    lines: list[str] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    proxy_port: int = 0
    admin_port: int = 0
    listening: dict[str, Any] = field(default_factory=dict)
    # Set when the proxy listener serves HTTPS: the context raw clients connect with.
    client_tls: ssl.SSLContext | None = None
    _reader: asyncio.Task[None] | None = None
    _started: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    async def start(
        cls, env: Mapping[str, str], ledger: Ledger, *, parser: str = "c"
    ) -> GatewayProcess:
        """Start the gateway with `env` (plus PATH) and wait for its `listening` line."""
        full_env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONUNBUFFERED": "1",
            "CIGW_LOG_FORMAT": "json",
            "CIGW_LOG_LEVEL": "debug",
            "CIGW_SHUTDOWN_GRACE": "1",
            **env,
        }
        if parser == "python":
            # aiohttp picks its parser at import time: only a new process can switch.
            full_env["AIOHTTP_NO_EXTENSIONS"] = "1"
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            "serve",
            env=full_env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        handle = cls(process, ledger)
        handle._reader = asyncio.ensure_future(handle._read())
        try:
            async with asyncio.timeout(20):
                await handle._started.wait()
        except TimeoutError:
            await handle.stop()
            raise AssertionError("gateway did not start:\n" + handle.output()) from None
        return handle

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            self.ledger.record("gateway output", line)
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    self.events.append(event)
                    if event.get("event") == "listening":
                        self.listening = event
                        self.proxy_port = int(str(event["proxy"]).rsplit(":", 1)[1])
                        self.admin_port = int(str(event["admin"]).rsplit(":", 1)[1])
                        self._started.set()
        self._started.set()  # exited: let start() notice

    async def connect(self, ledger: Ledger) -> RawClient:
        """A raw connection to the proxy listener (over TLS when it serves HTTPS)."""
        return await RawClient.connect(self.proxy_port, ledger, self.client_tls)

    def output(self) -> str:
        """Everything the process printed so far."""
        return "\n".join(self.lines)

    def logged(self, event: str) -> list[dict[str, Any]]:
        """The JSON log events named `event`."""
        return [item for item in self.events if item.get("event") == event]

    async def stop(self) -> int:
        """SIGTERM, then wait (bounded); kill if it does not exit."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(10):
                    await self.process.wait()
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        if self._reader is not None:
            await self._reader
        return self.process.returncode or 0

    async def get(self, session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
        """GET on an absolute URL, body recorded for the leak scan."""
        async with session.get(url) as response:
            text = await response.text()
            self.ledger.record(url, f"{response.headers!r}\n{text}")
            return response.status, text

    async def wait_ready(self, session: aiohttp.ClientSession, within: float = 15.0) -> None:
        """Until the admin listener's /readyz answers 200."""
        url = f"http://127.0.0.1:{self.admin_port}/readyz"
        async with asyncio.timeout(within):
            while True:
                async with session.get(url) as response:
                    if response.status == 200:
                        return
                await asyncio.sleep(0.05)
