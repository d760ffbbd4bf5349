"""`$batch` requests through a running gateway: parts that name the gateway reach the upstream
naming the upstream; everything else, and every other request, arrives byte-exact."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from gateway.batch_requests import BATCH_REQUEST_LIMIT
from gateway.sandbox.issuer import TokenIssuer
from tests.conftest import RunningGateway, StartGateway, serving_upstream
from tests.functional.test_links import SINGLE_ROUTE, routes_file
from tests.servers.upstream import Upstream

BOUNDARY = "batch_7f"
CONTENT_TYPE = f"multipart/mixed; boundary={BOUNDARY}"


class RecordingUpstream(Upstream):
    """Keeps every body sent to a path ending in $batch, and answers a small multipart."""

    def __init__(self, issuer: TokenIssuer) -> None:
        super().__init__(issuer, require_key=False)
        self.batches: list[tuple[str, bytes, str | None]] = []

    async def _route(self, request: web.Request) -> web.StreamResponse:
        path = request.raw_path.split("?", 1)[0]
        if not path.endswith(("$batch", "accounts")):
            return await super()._route(request)
        body = b"".join([chunk async for chunk in request.content.iter_any()])  # no size cap
        self._record(request, body)
        self.batches.append((request.raw_path, body, request.headers.get("Content-Length")))
        return web.Response(
            body=b"--r--\r\n", headers={"Content-Type": "multipart/mixed; boundary=r"}
        )


@pytest.fixture
async def recording(issuer: TokenIssuer) -> AsyncIterator[RecordingUpstream]:
    """The recording Dataverse-like upstream."""
    async with serving_upstream(RecordingUpstream(issuer)) as server:
        yield server


@pytest.fixture
async def gw_batch(
    start_gateway: StartGateway, recording: RecordingUpstream, upstream: Upstream, tmp_path: Path
) -> RunningGateway:
    """A gateway routing /dataverse/ (rewriting) and /ci/ (not) to the recording upstream."""
    config = routes_file(tmp_path, recording, upstream)
    return await start_gateway({**SINGLE_ROUTE, "CIGW_CONFIG": str(config)})


def http_part(method: str, url: str, content_id: int, body: str = "") -> str:
    """One application/http part holding a request, as Microsoft's SDK writes it."""
    head = "Content-Type: application/json; type=entry\r\n" if body else ""
    return (
        "Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n"
        f"Content-ID: {content_id}\r\n\r\n{method} {url} HTTP/1.1\r\n{head}\r\n{body}\r\n"
    )


def batch_body(urls: list[str], padding: int = 0) -> bytes:
    """A GET part per URL, then a change set creating one row per URL."""
    parts = "".join(f"--{BOUNDARY}\r\n{http_part('GET', u, n)}" for n, u in enumerate(urls))
    row = '{"name": "x"}'
    change_set = "".join(
        f"--cs_1\r\n{http_part('POST', u, 10 + n, row)}" for n, u in enumerate(urls)
    )
    pad = f"--{BOUNDARY}\r\nContent-Type: text/plain\r\n\r\n{'p' * padding}\r\n" if padding else ""
    return (
        f'{parts}{pad}--{BOUNDARY}\r\nContent-Type: multipart/mixed; boundary="cs_1"\r\n\r\n'
        f"{change_set}--cs_1--\r\n--{BOUNDARY}--\r\n"
    ).encode()


async def post(gw: RunningGateway, path: str, body: bytes, chunked: bool = False) -> int:
    """POST `body` as a $batch (chunked in 1000-byte writes when asked); the answer's status."""

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 1000):
            yield body[start : start + 1000]

    data = pieces() if chunked else body
    headers = {"Content-Type": CONTENT_TYPE, "Host": "gw.example:8080"}
    async with gw.session.post(gw.url(path), data=data, headers=headers) as response:
        await response.read()
        return response.status


@pytest.mark.parametrize("chunked", [False, True], ids=["length", "chunked"])
async def test_parts_naming_the_gateway_reach_the_upstream_naming_it(
    gw_batch: RunningGateway, recording: RecordingUpstream, chunked: bool
) -> None:
    """Absolute part URLs on the gateway's address (outer parts and the change set's) arrive
    on the upstream's origin and base path; a foreign host and relative URLs arrive as sent;
    the forwarded Content-Length is the new body's length."""
    gateway = "http://gw.example:8080/dataverse"
    urls = [f"{gateway}/accounts", "https://evil.example/dataverse/accounts", "accounts", "$1"]
    body = batch_body(urls)
    assert await post(gw_batch, "/dataverse/$batch", body, chunked) == 200
    ((path, received, length),) = recording.batches
    assert path == "/v1/$batch"
    upstream = f"{recording.base_url}/v1"
    assert received == body.replace(f"{gateway}/".encode(), f"{upstream}/".encode())
    assert received.count(upstream.encode()) == 2
    assert b"https://evil.example/dataverse/accounts" in received
    assert length == str(len(received))  # held whole, so sent with its new length
    assert len(recording.seen) == 1  # one request, to the route's upstream only


async def test_nothing_naming_the_gateway_passes_byte_exact(
    gw_batch: RunningGateway, recording: RecordingUpstream
) -> None:
    """A $batch whose parts name another host, another port or another route arrives byte-exact."""
    urls = [
        "http://evil.example/dataverse/accounts",
        "http://gw.example:9999/dataverse/accounts",
        "http://gw.example:8080/ci/accounts",
        "http://gw.example:8080/dataversex/accounts",
    ]
    body = batch_body(urls)
    assert await post(gw_batch, "/dataverse/$batch", body) == 200
    assert recording.batches[0][1] == body


async def test_only_batch_posts_on_rewriting_routes_are_rewritten(
    gw_batch: RunningGateway, recording: RecordingUpstream
) -> None:
    """The same body to a path not ending in $batch, or to a route without rewrite_links,
    arrives byte-exact."""
    body = batch_body(["http://gw.example:8080/dataverse/accounts"])
    assert await post(gw_batch, "/dataverse/accounts", body) == 200
    assert await post(gw_batch, "/ci/$batch", body) == 200
    assert [b for _, b, _ in recording.batches] == [body, body]


async def test_a_batch_above_the_bound_passes_unchanged(
    gw_batch: RunningGateway, recording: RecordingUpstream
) -> None:
    """A $batch larger than the 16 MiB bound is streamed through as it came, byte-exact."""
    body = batch_body(["http://gw.example:8080/dataverse/accounts"], BATCH_REQUEST_LIMIT)
    assert await post(gw_batch, "/dataverse/$batch", body, chunked=True) == 200
    assert recording.batches[0][1] == body


async def test_a_streamed_batch_within_the_bound_is_held_and_rewritten(
    gw_batch: RunningGateway, recording: RecordingUpstream
) -> None:
    """A chunked $batch larger than the replay buffer but within the bound is held whole,
    rewritten, and sent with its new Content-Length."""
    gateway = "http://gw.example:8080/dataverse"
    body = batch_body([f"{gateway}/accounts"], 3 * 1024 * 1024)
    assert await post(gw_batch, "/dataverse/$batch", body, chunked=True) == 200
    ((_, received, length),) = recording.batches
    upstream = f"{recording.base_url}/v1"
    assert received == body.replace(f"{gateway}/".encode(), f"{upstream}/".encode())
    assert length == str(len(received))
