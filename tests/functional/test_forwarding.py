"""Forwarding through a running gateway to the APIM-like upstream, over real sockets."""

from __future__ import annotations

import asyncio
import gzip
import json
import re

import pytest

from tests.conftest import CANARY_PRIMARY, RunningGateway, StartGateway
from tests.servers.upstream import GZIPPED, Upstream


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
async def test_every_method_path_and_query_is_forwarded(
    gw: RunningGateway, upstream: Upstream, method: str
) -> None:
    """Method, path and query arrive under the base path; the body arrives byte-exact."""
    body = b'{"a": 1, "bytes": "\\u00e9"}' if method in {"POST", "PUT", "PATCH"} else b""
    async with gw.session.request(
        method, gw.url("/echo/instances/42?$top=5&$filter=City%20eq%20%27Oslo%27"), data=body
    ) as response:
        assert response.status == 200
        echoed = await response.json()
    assert echoed["method"] == method
    assert echoed["raw_path"] == "/v1/echo/instances/42?$top=5&$filter=City%20eq%20%27Oslo%27"
    assert echoed["body_length"] == len(body)
    assert len(upstream.seen) == 1


async def test_head_is_forwarded_without_body(gw: RunningGateway, upstream: Upstream) -> None:
    """HEAD goes upstream as HEAD and the answer carries headers only."""
    async with gw.session.head(gw.url("/echo/x")) as response:
        assert response.status == 200
        assert await response.read() == b""
    assert upstream.seen[-1].method == "HEAD"


async def test_caller_credentials_are_replaced(gw: RunningGateway, upstream: Upstream) -> None:
    """Caller-sent Authorization, key headers and key query are removed; the gateway's go up."""
    headers = [
        ("Authorization", "Bearer caller-token"),
        ("Ocp-Apim-Subscription-Key", "caller-key-1"),
        ("ocp-apim-subscription-key", "caller-key-2"),
        ("X-Keep", "yes"),
    ]
    url = gw.url("/echo/x?subscription-key=caller-key-3&keep=1&Subscription-Key=caller-key-4")
    async with gw.session.get(url, headers=headers) as response:
        assert response.status == 200
    seen = upstream.seen[-1]
    assert seen.raw_path == "/v1/echo/x?keep=1"
    assert seen.header_values("Ocp-Apim-Subscription-Key") == [CANARY_PRIMARY]
    (auth,) = seen.header_values("Authorization")
    assert auth != "Bearer caller-token"
    assert upstream.issuer.verify(auth.removeprefix("Bearer "))
    assert seen.header_values("X-Keep") == ["yes"]


async def test_hop_by_hop_headers_are_not_forwarded(gw: RunningGateway, upstream: Upstream) -> None:
    """Connection and the headers it names, Keep-Alive, TE, Proxy-* never reach the upstream."""
    headers = {
        "Connection": "keep-alive, X-Hop, Authorization, Ocp-Apim-Subscription-Key",
        "X-Hop": "1",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Proxy-Authorization": "Basic eDp5",
        "X-End-To-End": "1",
    }
    async with gw.session.get(gw.url("/echo/x"), headers=headers) as response:
        assert response.status == 200
    names = {name.lower() for name, _ in upstream.seen[-1].headers}
    assert not names & {"x-hop", "keep-alive", "te", "proxy-authorization"}
    assert "x-end-to-end" in names
    # Naming the credentials in Connection must not strip the gateway's own.
    assert upstream.seen[-1].header_values("Ocp-Apim-Subscription-Key") == [CANARY_PRIMARY]
    assert len(upstream.seen[-1].header_values("Authorization")) == 1


@pytest.mark.parametrize(
    "path",
    ["/../secret", "/%2e%2e/secret", "/echo/..%2f..%2f..%2fsecret", "/..;/secret", "/%252e%252e/x"],
)
async def test_escape_above_base_path_is_refused(
    gw: RunningGateway, upstream: Upstream, path: str
) -> None:
    """A path climbing above the base path gets 400 bad_request and nothing goes upstream."""
    async with gw.session.get(gw.url(path)) as response:
        assert response.status == 400
        assert (await response.json())["error"]["code"] == "bad_request"
    assert upstream.seen == []


async def test_redirects_are_passed_back_not_followed(
    gw: RunningGateway, upstream: Upstream
) -> None:
    """A 302 from the upstream comes back to the caller; nothing is sent to its Location."""
    async with gw.session.get(gw.url("/redirect"), allow_redirects=False) as response:
        assert response.status == 302
        assert response.headers["Location"] == "http://203.0.113.7/elsewhere"
    assert len(upstream.seen) == 1


async def test_responses_are_not_decompressed(gw: RunningGateway) -> None:
    """A gzip body comes back byte-exact with its Content-Encoding."""
    async with gw.session.get(gw.url("/gzip"), headers={"Accept-Encoding": "gzip"}) as response:
        assert response.headers["Content-Encoding"] == "gzip"
        raw = await response.read()
    assert raw == GZIPPED
    assert gzip.decompress(raw).startswith(b"compressed payload")


async def test_status_and_headers_come_back_unchanged(gw: RunningGateway) -> None:
    """An upstream 404 with its own body and headers is relayed as it is."""
    async with gw.session.get(gw.url("/status/418?retry_after=7")) as response:
        assert response.status == 418
        assert response.headers["Retry-After"] == "7"
        assert json.loads(await response.read()) == {"status": 418}


async def test_request_id_is_kept_or_created(gw: RunningGateway, upstream: Upstream) -> None:
    """The caller's X-Request-ID goes upstream and back; without one, a new one is made."""
    async with gw.session.get(gw.url("/echo/a"), headers={"X-Request-ID": "abc-123"}) as response:
        assert response.headers["X-Request-ID"] == "abc-123"
    assert upstream.seen[-1].header_values("X-Request-ID") == ["abc-123"]
    async with gw.session.get(gw.url("/echo/b")) as response:
        generated = response.headers["X-Request-ID"]
    assert len(generated) == 32
    assert upstream.seen[-1].header_values("X-Request-ID") == [generated]
    async with gw.session.get(gw.url("/../x")) as response:
        assert response.status == 400
        assert response.headers["X-Request-ID"]


async def test_upstream_unreachable_is_502(start_gateway: StartGateway) -> None:
    """A refused connection to the upstream gives 502 upstream_unreachable."""
    gw = await start_gateway(
        {"CIGW_UPSTREAM_URL": "http://127.0.0.1:9/v1", "CIGW_RETRY_ATTEMPTS": "0"}
    )
    async with gw.session.get(gw.url("/x")) as response:
        assert response.status == 502
        body = await response.json()
    assert body["error"]["code"] == "upstream_unreachable"


async def test_upstream_silence_is_504(start_gateway: StartGateway, upstream: Upstream) -> None:
    """A silent upstream gives 504 upstream_timeout at CIGW_UPSTREAM_TIMEOUT, not retried."""
    gw = await start_gateway({"CIGW_UPSTREAM_TIMEOUT": "0.5"})
    async with gw.session.get(gw.url("/stall")) as response:
        assert response.status == 504
        assert (await response.json())["error"]["code"] == "upstream_timeout"
    assert len(upstream.seen) == 1


async def test_connect_is_refused(gw: RunningGateway, upstream: Upstream) -> None:
    """CONNECT gets 405 method_not_allowed and nothing reaches the upstream."""
    async with gw.session.request("CONNECT", gw.url("/x")) as response:
        assert response.status == 405
        assert (await response.json())["error"]["code"] == "method_not_allowed"
    assert upstream.seen == []


async def test_unknown_expectation_is_417(gw: RunningGateway, upstream: Upstream) -> None:
    """An Expect other than 100-continue gets a JSON 417, not a 500, and nothing goes upstream."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.proxy_port)
    writer.write(
        b"POST /echo/x HTTP/1.1\r\nHost: x\r\nExpect: 100-c\xb9ntinue\r\n"
        b"Content-Length: 5\r\n\r\nhello"
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert head.split()[1] == b"417"
    assert re.search(rb"\r\nX-Request-ID: [0-9a-f]{32}\r\n", head)
    assert upstream.seen == []


async def test_parser_refusals_carry_a_request_id(gw: RunningGateway, upstream: Upstream) -> None:
    """A request the parser refuses (a 414) still gets an X-Request-ID, like every answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.proxy_port)
    writer.write(b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert head.split()[1] == b"414"
    assert re.search(rb"\r\nX-Request-ID: [0-9a-f]{32}\r\n", head)
    assert upstream.seen == []
