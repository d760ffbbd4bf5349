"""Links that lead back: a rewriting route's answers name the gateway, never the upstream."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
import yaml
from aiohttp import web

from gateway.sandbox.issuer import TokenIssuer
from tests.conftest import RunningGateway, StartGateway, gateway_environment, serving_upstream
from tests.functional.test_streaming import MAX_RSS_GROWTH, MIB, PeakRss
from tests.process import spawn_gateway
from tests.servers.upstream import Upstream
from tests.tls_files import client_context, write_pair

SINGLE_ROUTE: dict[str, str | None] = {
    "CIGW_UPSTREAM_URL": None,
    "CIGW_SCOPE": None,
    "CIGW_SUBSCRIPTION_KEY": None,
    "CIGW_SUBSCRIPTION_KEY_SECONDARY": None,
}
RECORD = b'{"name": "' + b"n" * 200 + b'", "websiteurl": "%s/v1/keep"},'


class LinksUpstream(Upstream):
    """A Dataverse-like upstream whose answers carry absolute links to itself, under /v1/links/."""

    async def _route(self, request: web.Request) -> web.StreamResponse:
        path = request.raw_path.split("?", 1)[0]
        if not path.startswith("/v1/links/"):
            return await super()._route(request)
        await request.read()
        self._record(request, b"")
        name = path.removeprefix("/v1/links/")
        base = f"{self.base_url}/v1"
        if name == "page":
            number = int(request.query.get("n", "0"))
            page: dict[str, Any] = {
                "@odata.context": f"{base}/$metadata#accounts",
                "value": [{"name": f"a{number}", "websiteurl": f"{base}/keep"}],
            }
            if number < 3:
                page["@odata.nextLink"] = f"{base}/links/page?n={number + 1}&$skiptoken=%3Cx%3E"
            return web.json_response(page)
        if name == "created":
            headers = {"OData-EntityId": f"{base}/accounts(1)", "Location": f"{base}/accounts(1)"}
            return web.Response(status=204, headers=headers)
        if name == "gzip":
            body = gzip.compress(json.dumps({"@odata.nextLink": f"{base}/links/x"}).encode())
            return web.Response(
                body=body,
                headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
            )
        if name == "batch":
            return web.Response(
                body=batch_answer(base).encode(),
                headers={"Content-Type": "multipart/mixed; boundary=batchresponse_Q1"},
            )
        if name == "split":
            return await self._written(request, split_body(base), pause=0.05)
        if name == "big":
            return await self._written(request, big_body(base, int(request.query["mib"])))
        return web.json_response({"error": "unknown"}, status=404)

    async def _written(
        self, request: web.Request, pieces: Iterator[bytes], pause: float = 0.0
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        for piece in pieces:
            await response.write(piece)
            if pause:
                await asyncio.sleep(pause)  # a separate read on the gateway's side
        await response.write_eof()
        return response


def split_body(base: str) -> Iterator[bytes]:
    """A JSON answer whose nextLink is cut in the middle of the upstream's host."""
    body = json.dumps({"value": [], "@odata.nextLink": f"{base}/links/page?n=1"}).encode()
    cut = body.index(b"127.0.0") + 4
    yield body[:cut]
    yield body[cut:]


def big_body(base: str, mib: int) -> Iterator[bytes]:
    """About `mib` MiB of JSON records, the nextLink last, in 64 KiB writes."""
    record = RECORD % base.encode()
    per_write = (64 * 1024) // len(record)
    yield b'{"@odata.context": "%s/$metadata#accounts", "value": [' % base.encode()
    for _ in range(mib * MIB // (per_write * len(record))):
        yield record * per_write
    yield b'{"name": "last"}], "@odata.nextLink": "%s/links/page?n=1"}' % base.encode()


def batch_answer(base: str) -> str:
    """A Dataverse $batch answer: a change set with one create, then a GET's JSON."""
    inner = json.dumps({"@odata.id": f"{base}/accounts(2)", "websiteurl": f"{base}/keep"})
    return (
        "--batchresponse_Q1\r\n"
        "Content-Type: multipart/mixed; boundary=changesetresponse_Z9\r\n\r\n"
        "--changesetresponse_Z9\r\n"
        "Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n"
        "Content-ID: 1\r\n\r\n"
        f"HTTP/1.1 204 No Content\r\nOData-EntityId: {base}/accounts(1)\r\n\r\n\r\n"
        "--changesetresponse_Z9--\r\n"
        "--batchresponse_Q1\r\n"
        "Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n"
        "HTTP/1.1 200 OK\r\nContent-Type: application/json; odata.metadata=minimal\r\n\r\n"
        f"{inner}\r\n"
        "--batchresponse_Q1--\r\n"
    )


@pytest.fixture
async def dataverse(issuer: TokenIssuer) -> AsyncIterator[LinksUpstream]:
    """The Dataverse-like upstream (bearer token only, no APIM key)."""
    async with serving_upstream(LinksUpstream(issuer, require_key=False)) as server:
        yield server


def routes_file(directory: Path, dataverse: Upstream, upstream: Upstream, **extra: Any) -> Path:
    """/dataverse/ → the links upstream (rewrite_links by default: scope names its origin),
    /ci/ → the APIM-like upstream (no rewriting)."""
    path = directory / "routes.yaml"
    routes = [
        {
            "prefix": "/dataverse/",
            "upstream_url": f"{dataverse.base_url}/v1",
            "scope": f"{dataverse.base_url}/.default",
            **extra,
        },
        {
            "prefix": "/ci/",
            "upstream_url": f"{dataverse.base_url}/v1",
            "scope": "https://api.ci.ai.microsoft.com/.default",
        },
    ]
    path.write_text(yaml.safe_dump({"routes": routes}))
    return path


@pytest.fixture
async def gw_links(
    start_gateway: StartGateway, dataverse: LinksUpstream, upstream: Upstream, tmp_path: Path
) -> RunningGateway:
    """A gateway routing /dataverse/ (rewriting) and /ci/ (not) to the links upstream."""
    config = routes_file(tmp_path, dataverse, upstream)
    return await start_gateway({**SINGLE_ROUTE, "CIGW_CONFIG": str(config)})


async def test_paging_never_leaves_the_gateway(
    gw_links: RunningGateway, dataverse: LinksUpstream
) -> None:
    """Following @odata.nextLink page after page goes through the gateway every time."""
    gateway = f"http://127.0.0.1:{gw_links.gateway.proxy_port}"
    url: str | None = f"{gateway}/dataverse/links/page?n=0"
    names = []
    while url is not None:
        assert url.startswith(f"{gateway}/dataverse/links/page?n=")
        async with gw_links.session.get(url) as response:
            assert response.status == 200
            page = await response.json()
        names.append(page["value"][0]["name"])
        assert page["value"][0]["websiteurl"] == f"{dataverse.base_url}/v1/keep"  # data: kept
        assert page["@odata.context"].startswith(dataverse.base_url)  # not a link to follow
        url = page.get("@odata.nextLink")
    assert names == ["a0", "a1", "a2", "a3"]
    assert [seen.raw_path for seen in dataverse.seen][1:] == [
        f"/v1/links/page?n={n}&$skiptoken=%3Cx%3E" for n in (1, 2, 3)
    ]
    assert all(seen.header_values("Accept-Encoding") == ["identity"] for seen in dataverse.seen)


async def test_link_headers_are_rewritten(
    gw_links: RunningGateway, dataverse: LinksUpstream
) -> None:
    """OData-EntityId and Location of a create name the gateway's address and route prefix."""
    headers = {"Host": "gateway.example:8080"}
    async with gw_links.session.post(
        gw_links.url("/dataverse/links/created"), json={"name": "x"}, headers=headers
    ) as response:
        assert response.status == 204
        assert response.headers["OData-EntityId"] == (
            "http://gateway.example:8080/dataverse/accounts(1)"
        )
        assert response.headers["Location"] == "http://gateway.example:8080/dataverse/accounts(1)"


@pytest.mark.parametrize(
    "host", ["evil.example/x", "user@evil.example", 'a"b', "evil.example:99999999"]
)
async def test_a_host_that_is_not_host_port_leaves_links_unchanged(
    gw_links: RunningGateway, dataverse: LinksUpstream, host: str
) -> None:
    """An unusable Host: the answer is relayed byte-identical, links and all."""
    async with gw_links.session.get(
        gw_links.url("/dataverse/links/page?n=0"), headers={"Host": host}
    ) as response:
        assert response.status == 200
        body = await response.read()
    assert json.loads(body)["@odata.nextLink"].startswith(dataverse.base_url)


async def test_a_callers_host_never_chooses_the_destination(
    gw_links: RunningGateway, dataverse: LinksUpstream, upstream: Upstream
) -> None:
    """A Host naming another server only names the links; the request goes to the route's
    upstream, and links to that other server in the answer are not touched."""
    async with gw_links.session.get(
        gw_links.url("/dataverse/links/page?n=0"), headers={"Host": "127.0.0.1:1"}
    ) as response:
        page = await response.json()
    assert page["@odata.nextLink"].startswith("http://127.0.0.1:1/dataverse/links/page?n=1")
    assert len(dataverse.seen) == 1
    assert not upstream.seen


async def test_a_link_split_across_reads_is_rewritten(
    gw_links: RunningGateway, dataverse: LinksUpstream
) -> None:
    """A nextLink that arrives in two reads, cut inside the host, is still rewritten."""
    async with gw_links.session.get(gw_links.url("/dataverse/links/split")) as response:
        page = await response.json()
    gateway = f"http://127.0.0.1:{gw_links.gateway.proxy_port}"
    assert page["@odata.nextLink"] == f"{gateway}/dataverse/links/page?n=1"


async def test_compressed_answer_passes_unchanged(
    gw_links: RunningGateway, dataverse: LinksUpstream
) -> None:
    """An answer compressed despite Accept-Encoding: identity is relayed as it came."""
    async with gw_links.session.get(gw_links.url("/dataverse/links/gzip")) as response:
        body = await response.read()
        assert response.headers["Content-Encoding"] == "gzip"
    link = json.loads(gzip.decompress(body))["@odata.nextLink"]
    assert link == f"{dataverse.base_url}/v1/links/x"


async def test_batch_answer_parts_are_rewritten(
    gw_links: RunningGateway, dataverse: LinksUpstream
) -> None:
    """$batch: a change set part's OData-EntityId and a JSON part's @odata.id lead back."""
    async with gw_links.session.post(
        gw_links.url("/dataverse/links/batch"), data=b"--batch_1--\r\n"
    ) as response:
        body = (await response.read()).decode()
    gateway = f"http://127.0.0.1:{gw_links.gateway.proxy_port}/dataverse"
    base = f"{dataverse.base_url}/v1"
    assert body == batch_answer(base).replace(f"{base}/accounts", f"{gateway}/accounts")


async def test_a_route_without_rewriting_relays_byte_identical(
    gw_links: RunningGateway, dataverse: LinksUpstream
) -> None:
    """rewrite_links off (the /ci/ route): the same answer keeps the upstream's links."""
    async with gw_links.session.get(gw_links.url("/ci/links/page?n=0")) as response:
        page = await response.json()
    assert page["@odata.nextLink"].startswith(dataverse.base_url)
    assert dataverse.seen[-1].header_values("Accept-Encoding") != ["identity"]


async def test_rewriting_a_100_mib_answer_keeps_memory_flat(
    issuer: TokenIssuer,
    dataverse: LinksUpstream,
    upstream: Upstream,
    ca_file: Path,
    tmp_path: Path,
) -> None:
    """100 MiB of JSON through a rewriting route, in a child process: RSS stays flat, every
    byte arrives (SHA-256), and the nextLink at the very end is rewritten."""
    env = {
        key: value
        for key, value in gateway_environment(issuer.base_url, "http://unused", ca_file).items()
        if key not in SINGLE_ROUTE
    }
    env["CIGW_CONFIG"] = str(routes_file(tmp_path, dataverse, upstream))
    child = await spawn_gateway(env, tmp_path / "gateway.log")
    try:
        await child.wait_ready()
        gateway = f"http://127.0.0.1:{child.proxy_port}/dataverse"
        base = f"{dataverse.base_url}/v1"
        expected = hashlib.sha256()
        for piece in big_body(base, 100):
            expected.update(piece)
        tail = f"{base}/links/page?n=1".encode()
        expected_tail = f"{gateway}/links/page?n=1".encode()
        async with aiohttp.ClientSession() as session:
            async with session.get(child.url("/dataverse/links/big?mib=4")) as response:
                await response.read()  # warm-up: allocator pools at working size
            rss = PeakRss(child)
            digest, last, size = hashlib.sha256(), b"", 0
            async with session.get(child.url("/dataverse/links/big?mib=100")) as response:
                assert response.status == 200
                async for chunk in response.content.iter_any():
                    digest.update(chunk)
                    last = (last + chunk)[-400:]
                    size += len(chunk)
            growth = await rss.growth()
    finally:
        await child.stop()
    assert size > 100 * MIB - 64 * 1024
    assert expected_tail in last
    assert growth < MAX_RSS_GROWTH, f"RSS grew {growth / MIB:.1f} MiB"
    # Every byte as sent, the one link at the end aside.
    rebuilt = hashlib.sha256()
    for piece in big_body(base, 100):
        rebuilt.update(piece.replace(tail, expected_tail) if tail in piece else piece)
    assert digest.hexdigest() == rebuilt.hexdigest()
    assert expected.hexdigest() != rebuilt.hexdigest()


async def test_links_name_https_on_the_tls_listener(
    start_gateway: StartGateway,
    dataverse: LinksUpstream,
    upstream: Upstream,
    ca: trustme.CA,
    tmp_path: Path,
) -> None:
    """Served over TLS, the rewritten links say https (the listener's scheme)."""
    cert, key, _ = write_pair(ca, tmp_path)
    config = routes_file(tmp_path, dataverse, upstream)
    gw = await start_gateway(
        {
            **SINGLE_ROUTE,
            "CIGW_CONFIG": str(config),
            "CIGW_TLS_CERT_FILE": str(cert),
            "CIGW_TLS_KEY_FILE": str(key),
        }
    )
    port = gw.gateway.proxy_port
    async with gw.session.get(
        f"https://127.0.0.1:{port}/dataverse/links/page?n=0",
        ssl=client_context(ca),
        headers={"X-Forwarded-Proto": "http"},
    ) as response:
        page = await response.json()
    assert page["@odata.nextLink"] == (
        f"https://127.0.0.1:{port}/dataverse/links/page?n=1&$skiptoken=%3Cx%3E"
    )
