"""Hostile requests over raw sockets, against a gateway process on each aiohttp parser.

Every case: a 4xx (or a clean forward below the base path where the issue allows it),
at most one clean request at the upstream, nothing secret in the answer (the ledger
checks), and a connection that is either closed or still framed correctly.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from yarl import URL

from tests.conftest import CANARY_PRIMARY
from tests.security.support import (
    ConnectionClosedError,
    GatewayProcess,
    Ledger,
    RawClient,
    RawResponse,
    SecurityUpstream,
)
from tests.servers.upstream import Seen

pytestmark = pytest.mark.asyncio(loop_scope="module")

PROBE = b"GET /echo/probe HTTP/1.1\r\nHost: gateway\r\n\r\n"
# Headers that must never arrive at the upstream from a caller.
NEVER_FORWARDED = frozenset(
    {
        "connection",
        "upgrade",
        "keep-alive",
        "te",
        "trailer",
        "proxy-authorization",
        "proxy-connection",
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "subscription-key",
    }
)


@dataclass(frozen=True, slots=True)
class Case:
    """One hostile request and the answer it must get."""

    id: str
    raw: bytes
    status: int = 400


def post(headers: bytes, body: bytes, target: bytes = b"/echo/framing") -> bytes:
    """A POST with the given header lines (CRLF-terminated) and body bytes."""
    return b"POST " + target + b" HTTP/1.1\r\nHost: gateway\r\n" + headers + b"\r\n" + body


def get(headers: bytes = b"", target: bytes = b"/echo/headers") -> bytes:
    """A GET with the given header lines (CRLF-terminated)."""
    return b"GET " + target + b" HTTP/1.1\r\nHost: gateway\r\n" + headers + b"\r\n"


SMUGGLED = b"GET /echo/smuggled HTTP/1.1\r\nHost: gateway\r\n\r\n"

FRAMING = [
    Case("cl-and-te", post(b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n")),
    Case(
        "te-and-cl-hiding-a-request",
        post(b"Transfer-Encoding: chunked\r\nContent-Length: 48\r\n", b"0\r\n\r\n" + SMUGGLED),
    ),
    Case("te-chunked-chunked", post(b"Transfer-Encoding: chunked, chunked\r\n", b"0\r\n\r\n")),
    Case("te-chunked123", post(b"Transfer-Encoding: chunked123\r\n", b"0\r\n\r\n")),
    Case("te-xchunked", post(b"Transfer-Encoding: xchunked\r\n", b"0\r\n\r\n")),
    Case("te-identity-chunked", post(b"Transfer-Encoding: identity, chunked\r\n", b"0\r\n\r\n")),
    Case("te-chunked-identity", post(b"Transfer-Encoding: chunked, identity\r\n", b"0\r\n\r\n")),
    Case("te-twice", post(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", b"")),
    Case("te-space-before-colon", post(b"Transfer-Encoding : chunked\r\n", b"0\r\n\r\n")),
    Case("te-obs-folded", post(b"Transfer-Encoding:\r\n chunked\r\n", b"0\r\n\r\n")),
    Case("te-vertical-tab", post(b"Transfer-Encoding:\x0bchunked\r\n", b"0\r\n\r\n")),
    Case("te-on-http10", b"POST /echo/x HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    Case("cl-conflicting", post(b"Content-Length: 3\r\nContent-Length: 5\r\n", b"abcde")),
    Case("cl-repeated", post(b"Content-Length: 3\r\nContent-Length: 3\r\n", b"abc")),
    Case("cl-list", post(b"Content-Length: 3, 3\r\n", b"abc")),
    Case("cl-plus", post(b"Content-Length: +3\r\n", b"abc")),
    Case("cl-minus", post(b"Content-Length: -3\r\n", b"abc")),
    Case("cl-hex", post(b"Content-Length: 0x3\r\n", b"abc")),
    Case("cl-underscore-digits", post(b"Content-Length: 1_0\r\n", b"abc")),
    Case("chunk-size-non-hex", post(b"Transfer-Encoding: chunked\r\n", b"3g\r\nabc\r\n0\r\n\r\n")),
    Case("chunk-size-0x", post(b"Transfer-Encoding: chunked\r\n", b"0x3\r\nabc\r\n0\r\n\r\n")),
    Case("chunk-size-negative", post(b"Transfer-Encoding: chunked\r\n", b"-3\r\nabc\r\n0\r\n\r\n")),
    Case("chunk-size-space", post(b"Transfer-Encoding: chunked\r\n", b"3 \r\nabc\r\n0\r\n\r\n")),
    Case(
        "chunk-size-overflow",
        post(b"Transfer-Encoding: chunked\r\n", b"1" + b"0" * 20 + b"\r\nabc\r\n0\r\n\r\n"),
    ),
    Case(
        "chunk-ext-bare-lf",
        post(b"Transfer-Encoding: chunked\r\n", b"3;a=b\n" + SMUGGLED + b"abc\r\n0\r\n\r\n"),
    ),
    Case(
        "chunk-data-overrun",
        post(b"Transfer-Encoding: chunked\r\n", b"3\r\nabcdef\r\n0\r\n\r\n" + SMUGGLED),
    ),
    Case("chunk-missing-crlf", post(b"Transfer-Encoding: chunked\r\n", b"3\r\nabc0\r\n\r\n")),
]

HEADER_SYNTAX = [
    Case("duplicate-host", b"GET /echo/x HTTP/1.1\r\nHost: gateway\r\nHost: evil.example\r\n\r\n"),
    Case("bare-lf-line-ends", b"GET /echo/x HTTP/1.1\nHost: gateway\n\n"),
    Case("bare-lf-in-header", get(b"X-A: 1\nX-B: 2\r\n")),
    Case("bare-cr-in-header", get(b"X-A: 1\rX-B: 2\r\n")),
    Case("nul-in-value", get(b"X-A: 1\x002\r\n")),
    Case("nul-in-name", get(b"X-\x00A: 1\r\n")),
    Case("obs-fold", get(b"X-A: 1\r\n 2\r\n")),
    Case("obs-fold-tab", get(b"X-A: 1\r\n\t2\r\n")),
    Case("underscore-name", get(b"X_Forwarded_For: 10.0.0.1\r\n")),
    Case("underscore-credential-name", get(b"Ocp_Apim_Subscription_Key: x\r\n")),
    Case("space-in-name", get(b"X A: 1\r\n")),
    Case("space-before-colon", get(b"X-A : 1\r\n")),
    Case("leading-space-first-header", b"GET /echo/x HTTP/1.1\r\n Host: gateway\r\n\r\n"),
    Case("no-colon", get(b"X-A 1\r\n")),
    Case("http09", b"GET /echo/x\r\n\r\n"),
    Case("http2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
    Case("unknown-version", b"GET /echo/x HTTP/1.7\r\nHost: gateway\r\n\r\n"),
    Case("non-utf8-header-value", get(b"Accept: \x90/*\r\n")),  # found by the fuzz
    Case("non-ascii-target", get(target=b"/echo/\xb7x")),  # found by the fuzz
    Case("lowercase-method-junk", b"G\x00ET /echo/x HTTP/1.1\r\nHost: gateway\r\n\r\n"),
]

LIMITS = [
    Case("request-line-over-limit", get(target=b"/echo/" + b"a" * 9000), 414),
    Case("query-over-limit", get(target=b"/echo/x?q=" + b"a" * 9000), 414),
    Case("absolute-target-over-limit", get(target=b"http://x/" + b"a" * 9000), 414),
    Case("header-value-over-limit", get(b"X-Big: " + b"a" * 9000 + b"\r\n"), 431),
    Case("header-name-over-limit", get(b"X-" + b"a" * 9000 + b": 1\r\n"), 431),
    Case("header-no-space-over-limit", get(b"X-Big:" + b"/" * 9000 + b"\r\n"), 431),
    Case("too-many-headers", get(b"".join(b"X-H%d: 1\r\n" % i for i in range(120))), 431),
]

TARGETS = [
    Case("absolute-form-other-host", get(target=b"http://evil.example/echo/x")),
    Case("absolute-form-upstream", get(target=b"http://127.0.0.1/v1/echo/x")),
    Case("absolute-form-https", get(target=b"https://evil.example:443/x")),
    Case("asterisk-form", b"OPTIONS * HTTP/1.1\r\nHost: gateway\r\n\r\n"),
    Case("authority-form-get", get(target=b"evil.example:443")),
    Case(
        "connect",
        b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n",
        405,
    ),
    Case(
        "connect-origin-form",
        b"CONNECT /echo/x HTTP/1.1\r\nHost: gateway\r\n\r\n",
        405,
    ),
    Case("fragment", get(target=b"/echo/x#frag")),
]


async def _refused(
    gateway: GatewayProcess, upstream: SecurityUpstream, ledger: Ledger, case: Case
) -> RawResponse:
    """Send the case; assert its status, a JSON error, nothing upstream, a sane connection."""
    before = len(upstream.seen)
    client = await gateway.connect(ledger)
    try:
        await client.send(case.raw)
        response = await client.response()
        assert response.status == case.status, response.raw
        assert response.error_code is not None, response.raw
        await _assert_sane(client)
    finally:
        await client.close()
    reached = upstream.seen[before:]
    assert [seen for seen in reached if "smuggled" in seen.raw_path] == []
    assert [seen for seen in reached if seen.raw_path != "/v1/echo/probe"] == []
    return response


async def _assert_sane(client: RawClient) -> None:
    """The connection is closed, or the next request on it is answered as itself."""
    try:
        await client.send(PROBE)
        probe = await client.response()
    except ConnectionClosedError:
        return
    assert probe.status == 200, probe.raw
    assert probe.json()["raw_path"] == "/v1/echo/probe"


def _assert_clean(seen: Seen, upstream: SecurityUpstream) -> None:
    """A request as the gateway should forward it: its credentials only, below /v1/."""
    assert seen.raw_path.startswith("/v1/"), seen.raw_path
    (authorization,) = seen.header_values("Authorization")
    assert upstream.issuer.verify(authorization.removeprefix("Bearer "))
    assert seen.header_values("Ocp-Apim-Subscription-Key") == [CANARY_PRIMARY]
    assert seen.header_values("Host") == [URL(upstream.base_url).raw_authority]
    forwarded = {name.lower() for name, _ in seen.headers}
    assert not forwarded & NEVER_FORWARDED, forwarded
    assert "subscription-key" not in seen.raw_path.lower()


async def test_parser_in_use(gateway_proc: GatewayProcess) -> None:
    """At start-up the gateway logs which aiohttp HTTP parser serves: the one this run asked for."""
    (event,) = gateway_proc.logged("listening")
    assert event["http_parser"] in ("c", "python")
    assert gateway_proc.logged("listening")[0]["http_parser"] == event["http_parser"]


@pytest.mark.parametrize("case", FRAMING, ids=lambda case: case.id)
async def test_ambiguous_framing_is_refused(
    gateway_proc: GatewayProcess, shared_upstream: SecurityUpstream, ledger: Ledger, case: Case
) -> None:
    """Smuggling framing (CL+TE, TE lists, odd CL, bad chunks): 400, closed, none upstream."""
    response = await _refused(gateway_proc, shared_upstream, ledger, case)
    assert response.error_code in ("malformed_request", "bad_request", "body_incomplete")


@pytest.mark.parametrize("case", HEADER_SYNTAX, ids=lambda case: case.id)
async def test_bad_header_syntax_is_refused(
    gateway_proc: GatewayProcess, shared_upstream: SecurityUpstream, ledger: Ledger, case: Case
) -> None:
    """Duplicate Host, bare LF/CR, NUL, obs-fold, odd names or versions: 400, nothing upstream."""
    await _refused(gateway_proc, shared_upstream, ledger, case)


@pytest.mark.parametrize("case", LIMITS, ids=lambda case: case.id)
async def test_limits_answer_414_and_431(
    gateway_proc: GatewayProcess, shared_upstream: SecurityUpstream, ledger: Ledger, case: Case
) -> None:
    """A request line over the limit gets 414, too large or too many headers 431; none forwarded."""
    await _refused(gateway_proc, shared_upstream, ledger, case)


async def test_requests_within_limits_pass(
    gateway_proc: GatewayProcess, shared_upstream: SecurityUpstream, ledger: Ledger
) -> None:
    """A 7000-byte target, a 7000-byte header and 90 headers are still forwarded as one request."""
    headers = b"X-Big: " + b"b" * 7000 + b"\r\n" + b"".join(b"X-H%d: 1\r\n" % i for i in range(88))
    client = await gateway_proc.connect(ledger)
    before = len(shared_upstream.seen)
    try:
        await client.send(get(headers, target=b"/echo/" + b"a" * 7000))
        response = await client.response()
    finally:
        await client.close()
    assert response.status == 200, response.raw[:300]
    (seen,) = shared_upstream.seen[before:]
    _assert_clean(seen, shared_upstream)
    assert seen.header_values("X-Big") == ["b" * 7000]


@pytest.mark.parametrize("case", TARGETS, ids=lambda case: case.id)
async def test_foreign_targets_are_refused(
    gateway_proc: GatewayProcess, shared_upstream: SecurityUpstream, ledger: Ledger, case: Case
) -> None:
    """Absolute, authority and asterisk-form targets and CONNECT are refused: no open proxy."""
    await _refused(gateway_proc, shared_upstream, ledger, case)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"Content-Length: 48\r\n", id="content-length"),
        pytest.param(b"Transfer-Encoding: chunked\r\n", id="chunked"),
    ],
)
async def test_request_hidden_in_a_body_stays_a_body(
    gateway_proc: GatewayProcess, shared_upstream: SecurityUpstream, ledger: Ledger, body: bytes
) -> None:
    """A request hidden in a well-framed body reaches the upstream as the body of one request."""
    payload = SMUGGLED + b"\r\n"
    assert len(payload) == 48
    data = payload if b"Content-Length" in body else b"30\r\n" + payload + b"\r\n0\r\n\r\n"
    client = await gateway_proc.connect(ledger)
    before = len(shared_upstream.seen)
    try:
        await client.send(post(body, data))
        response = await client.response()
        assert response.status == 200, response.raw
        await _assert_sane(client)
    finally:
        await client.close()
    posted, probe = shared_upstream.seen[before:]
    assert (posted.method, posted.raw_path, posted.body_length) == ("POST", "/v1/echo/framing", 48)
    _assert_clean(posted, shared_upstream)
    assert probe.raw_path == "/v1/echo/probe"


async def test_refused_request_drops_what_is_pipelined_behind_it(
    gateway_proc: GatewayProcess, shared_upstream: SecurityUpstream, ledger: Ledger
) -> None:
    """A request pipelined behind a refused one is never forwarded: the connection closes first."""
    bad = post(b"Content-Length: 0\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n")
    client = await gateway_proc.connect(ledger)
    before = len(shared_upstream.seen)
    try:
        await client.send(bad + SMUGGLED + PROBE)
        response = await client.response()
        assert response.status == 400
        assert await client.closed()
    finally:
        await client.close()
    assert shared_upstream.seen[before:] == []


@pytest.mark.parametrize(
    "spoof",
    [
        pytest.param(b"X-Forwarded-Host: evil.example\r\n", id="x-forwarded-host"),
        pytest.param(b"Forwarded: for=1.2.3.4;host=evil.example;proto=https\r\n", id="forwarded"),
        pytest.param(
            b"X-Forwarded-For: 10.0.0.1\r\nX-Forwarded-Proto: http\r\n", id="x-forwarded-for"
        ),
        pytest.param(
            b"X-Forwarded-Port: 1\r\nProxy-Authorization: Basic eA==\r\n", id="proxy-auth"
        ),
    ],
)
async def test_host_and_forwarding_headers_are_not_trusted(
    gateway_proc: GatewayProcess, shared_upstream: SecurityUpstream, ledger: Ledger, spoof: bytes
) -> None:
    """A spoofed Host and forwarding headers neither steer the request nor reach the upstream."""
    raw = b"GET /echo/spoof HTTP/1.1\r\nHost: evil.example\r\n" + spoof + b"\r\n"
    client = await gateway_proc.connect(ledger)
    before = len(shared_upstream.seen)
    try:
        await client.send(raw)
        response = await client.response()
    finally:
        await client.close()
    assert response.status == 200, response.raw
    (seen,) = shared_upstream.seen[before:]
    _assert_clean(seen, shared_upstream)
    assert not any(name.lower().startswith("x-forwarded") for name, _ in seen.headers)


# (raw path, True when it must be refused). Anything forwarded goes byte-exact below /v1.
PATHS = [
    (b"/../x", True),
    (b"/echo/../../x", True),
    (b"/%2e%2e/x", True),
    (b"/%2E%2E/x", True),
    (b"/.%2e/x", True),
    (b"/%252e%252e/x", True),
    (b"/echo/..%2F..%2Fx", True),
    (b"/echo/%2e%2e%2f%2e%2e%2fx", True),
    (b"/..;/x", True),
    (b"/echo/..;/..;/x", True),
    (b"/..\\x", True),
    (b"/echo\\..\\..\\x", True),
    (b"/%5c..%5c..%5cx", True),
    (b"/./../x", True),
    (b"/echo/../x", False),
    (b"/echo/%2F/x", False),
    (b"//evil.example/x", False),
    (b"/echo//x", False),
    (b"/echo/..x/y", False),
    (b"/echo/;/x", False),
    (b"/echo/%00/x", False),
]


@pytest.mark.parametrize(("path", "refuse"), PATHS, ids=[path.decode() for path, _ in PATHS])
async def test_path_tricks_stay_below_the_base_path(
    gateway_proc: GatewayProcess,
    shared_upstream: SecurityUpstream,
    ledger: Ledger,
    path: bytes,
    refuse: bool,
) -> None:
    """Climbing dot-segments in any spelling are refused; other paths go byte-exact below /v1."""
    client = await gateway_proc.connect(ledger)
    before = len(shared_upstream.seen)
    try:
        await client.send(get(target=path))
        response = await client.response()
    finally:
        await client.close()
    reached = shared_upstream.seen[before:]
    if refuse:
        assert response.status == 400, response.raw
        assert reached == []
    else:
        (seen,) = reached
        assert seen.raw_path == "/v1" + path.decode()
        _assert_clean(seen, shared_upstream)


@pytest.mark.parametrize(
    "connection",
    [
        b"Connection: close, Authorization, Ocp-Apim-Subscription-Key\r\n",
        b"Connection: keep-alive, authorization\r\nConnection: OCP-APIM-SUBSCRIPTION-KEY\r\n",
        b"Connection: Host, X-Request-ID, Content-Length\r\n",
    ],
    ids=["close-and-credentials", "split-and-cased", "framing-names"],
)
async def test_connection_header_cannot_strip_the_credentials(
    gateway_proc: GatewayProcess,
    shared_upstream: SecurityUpstream,
    ledger: Ledger,
    connection: bytes,
) -> None:
    """Credential names listed in Connection do not strip the gateway's Authorization and key."""
    client = await gateway_proc.connect(ledger)
    before = len(shared_upstream.seen)
    try:
        await client.send(post(connection + b"Content-Length: 2\r\n", b"hi"))
        response = await client.response()
    finally:
        await client.close()
    assert response.status == 200, response.raw
    (seen,) = shared_upstream.seen[before:]
    _assert_clean(seen, shared_upstream)
    assert seen.body_length == 2


@pytest.mark.parametrize(
    "upgrade",
    [
        (
            b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        ),
        (
            b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
            b"HTTP2-Settings: AAMAAABkAAQAAP__\r\n"
        ),
    ],
    ids=["websocket", "h2c"],
)
async def test_upgrade_is_not_tunnelled(
    gateway_proc: GatewayProcess, shared_upstream: SecurityUpstream, ledger: Ledger, upgrade: bytes
) -> None:
    """Upgrade requests get a plain answer, no Upgrade goes upstream, the connection stays HTTP."""
    client = await gateway_proc.connect(ledger)
    before = len(shared_upstream.seen)
    try:
        await client.send(get(upgrade, target=b"/echo/upgrade"))
        response = await client.response()
        assert response.status != 101
        assert response.header("Upgrade") == []
        await _assert_sane(client)
    finally:
        await client.close()
    reached = shared_upstream.seen[before:]
    assert reached, "the ordinary request should have been forwarded"
    for seen in reached:
        _assert_clean(seen, shared_upstream)
        assert seen.header_values("HTTP2-Settings") == []


@pytest.mark.parametrize(
    ("headers", "query"),
    [
        (b"Authorization: Bearer caller-token\r\n", b""),
        (b"Authorization: Basic Y2FsbGVyOng=\r\nauthorization: Bearer two\r\n", b""),
        (b"Ocp-Apim-Subscription-Key: caller-key\r\nocp-apim-subscription-key: other\r\n", b""),
        (b"", b"?subscription-key=caller-key"),
        (b"", b"?a=1&Subscription-Key=caller-key&subscription-key=second&b=2"),
        (b"", b"?subscription%2Dkey=caller-key&%73ubscription-key=x"),
        (b"", b"?subscription+key=caller-key&subscription-key%20=y&%20subscription-key=z"),
        (
            b"Authorization: Bearer caller\r\nOcp-Apim-Subscription-Key: caller-key\r\n",
            b"?subscription-key=caller-key",
        ),
    ],
    ids=[
        "bearer",
        "two-authorizations",
        "two-keys",
        "query-key",
        "query-key-twice-cased",
        "query-key-encoded",
        "query-key-spaced",
        "all-forms",
    ],
)
async def test_caller_credentials_are_replaced(
    gateway_proc: GatewayProcess,
    shared_upstream: SecurityUpstream,
    ledger: Ledger,
    headers: bytes,
    query: bytes,
) -> None:
    """Caller credentials (headers, key query, repeats) never go upstream; the gateway's go once."""
    client = await gateway_proc.connect(ledger)
    before = len(shared_upstream.seen)
    try:
        await client.send(get(headers, target=b"/echo/creds" + query))
        response = await client.response()
    finally:
        await client.close()
    assert response.status == 200, response.raw
    (seen,) = shared_upstream.seen[before:]
    _assert_clean(seen, shared_upstream)
    query_names = [name.strip().lower() for name in URL(seen.raw_path).query]
    kept = [name for name in query_names if name == "subscription-key"]
    assert kept == [], seen.raw_path


@pytest.mark.parametrize("answer", ["cr-in-value", "nul-in-value", "lf-in-value", "obs-fold"])
async def test_upstream_header_injection_is_not_passed_on(
    gateway_proc: GatewayProcess, shared_upstream: SecurityUpstream, ledger: Ledger, answer: str
) -> None:
    """Upstream CR, NUL, bare LF or obs-fold in a header: 502 without the field (strict parser)."""
    client = await gateway_proc.connect(ledger)
    try:
        await client.send(get(target=b"/raw/" + answer.encode()))
        response = await client.response()
    finally:
        await client.close()
    assert response.status == 502, response.raw
    assert response.error_code == "upstream_unreachable"
    assert response.header("Set-Cookie") == []
    assert response.header("X-Note") == []
