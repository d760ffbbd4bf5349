"""An APIM-like upstream for tests: enforces key and bearer like APIM, echoes, streams, misbehaves.

Routes under /v1 (the gateway's base path in tests):
  /v1/echo/...           JSON of what arrived (method, raw path, headers, body digest)
  /v1/download?size=N    N deterministic bytes, streamed in chunks
  /v1/upload             consumes the body, answers its length and SHA-256
  /v1/status/{code}      answers that status (Retry-After from ?retry_after=)
  /v1/stall              never answers
  /v1/delay?s=N          answers after N seconds
  /v1/reset              closes the connection before any response byte
  /v1/reset-mid-body     sends headers and part of the body, then closes
  /v1/redirect           302 to another host
Anything outside /v1 answers 404, so a path that escaped the base path is visible.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.sandbox.apim import SubscriptionKeyPair, apim_guard
from gateway.sandbox.issuer import TokenIssuer

CHUNK = 64 * 1024
GZIPPED = gzip.compress(b"compressed payload " * 100)


@dataclass(frozen=True, slots=True)
class Seen:
    """One request as the upstream received it."""

    method: str
    raw_path: str
    headers: list[tuple[str, str]]
    body_sha256: str | None = None
    body_length: int = 0

    def header_values(self, name: str) -> list[str]:
        """Every value of header `name` (case-insensitive)."""
        return [value for key, value in self.headers if key.lower() == name.lower()]


def pattern(size: int) -> Iterator[bytes]:
    """Deterministic bytes in CHUNK-sized pieces, so both ends can hash without storing."""
    block = bytes(range(256)) * (CHUNK // 256)
    left = size
    while left > 0:
        piece = block[: min(CHUNK, left)]
        left -= len(piece)
        yield piece


def pattern_sha256(size: int) -> str:
    """SHA-256 of `pattern(size)`."""
    digest = hashlib.sha256()
    for piece in pattern(size):
        digest.update(piece)
    return digest.hexdigest()


@dataclass
class Upstream:
    """State of the test upstream; the test reads `seen` and flips the switches."""

    issuer: TokenIssuer
    keys: SubscriptionKeyPair = field(default_factory=SubscriptionKeyPair)
    seen: list[Seen] = field(default_factory=list)
    fail_next: list[int] = field(default_factory=list)  # statuses to answer first, in order
    retry_after: str | None = None  # Retry-After sent with fail_next statuses
    active: int = 0  # requests being handled now
    base_url: str = ""
    revoked: set[str] = field(default_factory=set)  # tokens rejected even though unexpired
    require_key: bool = True  # False: no APIM in front, only the bearer token is checked

    def verify_token(self, token: str) -> bool:
        """Valid when the issuer minted it, it has not expired and it was not revoked."""
        return token not in self.revoked and self.issuer.verify(token)

    def app(self) -> web.Application:
        """The upstream application, APIM guard in front."""
        with_key = apim_guard(self.keys, self.verify_token)
        token_only = apim_guard(None, self.verify_token)

        @web.middleware
        async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
            return await (with_key if self.require_key else token_only)(request, handler)

        application = web.Application(middlewares=[guard])
        application.router.add_route("*", "/{tail:.*}", self._handle)
        return application

    def count(self, path_prefix: str = "/v1/") -> int:
        """How many requests reached a path starting with `path_prefix`."""
        return sum(1 for seen in self.seen if seen.raw_path.startswith(path_prefix))

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.active += 1
        try:
            return await self._route(request)
        finally:
            self.active -= 1

    async def _route(self, request: web.Request) -> web.StreamResponse:
        path = request.raw_path.split("?", 1)[0]
        if path.startswith("/v1/upload"):
            return await self._upload(request)
        body = await request.read()
        self._record(request, body)
        if self.fail_next:
            status = self.fail_next.pop(0)
            headers = {"Retry-After": self.retry_after} if self.retry_after else {}
            return web.json_response({"injected": status}, status=status, headers=headers)
        if not path.startswith("/v1/"):
            return web.json_response({"error": "outside the API"}, status=404)
        name = path.removeprefix("/v1/").split("/", 1)[0]
        if name == "download":
            return await self._download(request)
        if name == "status":
            code = int(path.rsplit("/", 1)[-1])
            retry = request.query.get("retry_after")
            return web.json_response(
                {"status": code}, status=code, headers={"Retry-After": retry} if retry else None
            )
        if name == "stall":
            await asyncio.sleep(3600)
        if name == "delay":
            await asyncio.sleep(float(request.query.get("s", "1")))
        if name == "reset":
            assert request.transport is not None
            request.transport.abort()
            await asyncio.sleep(1)
        if name == "reset-mid-body":
            return await self._reset_mid_body(request)
        if name == "redirect":
            return web.Response(status=302, headers={"Location": "http://203.0.113.7/elsewhere"})
        if name == "gzip":
            return web.Response(
                body=GZIPPED, headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"}
            )
        return web.json_response(
            {
                "method": request.method,
                "raw_path": request.raw_path,
                "headers": list(request.headers.items()),
                "body_sha256": hashlib.sha256(body).hexdigest(),
                "body_length": len(body),
            }
        )

    def _record(self, request: web.Request, body: bytes) -> None:
        self.seen.append(
            Seen(
                request.method,
                request.raw_path,
                list(request.headers.items()),
                hashlib.sha256(body).hexdigest(),
                len(body),
            )
        )

    async def _upload(self, request: web.Request) -> web.Response:
        digest, length = hashlib.sha256(), 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            length += len(chunk)
        self.seen.append(
            Seen(
                request.method,
                request.raw_path,
                list(request.headers.items()),
                digest.hexdigest(),
                length,
            )
        )
        return web.json_response({"sha256": digest.hexdigest(), "length": length})

    async def _download(self, request: web.Request) -> web.StreamResponse:
        size = int(request.query.get("size", "0"))
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        if request.query.get("length") == "1":
            response.content_length = size
        await response.prepare(request)
        for piece in pattern(size):
            await response.write(piece)
        await response.write_eof()
        return response

    async def _reset_mid_body(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = 10 * CHUNK
        await response.prepare(request)
        await response.write(b"x" * CHUNK)
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()
        return response
