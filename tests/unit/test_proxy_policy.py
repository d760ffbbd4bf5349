"""URL and header policy: where a request may go and which headers travel with it."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway.errors import BadRequest
from gateway.proxy import build_target, request_headers, response_headers, retry_after_seconds

BASE = URL("https://api.example.com/v1")


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        pytest.param("/instances", "/v1/instances", id="simple"),
        pytest.param("/instances?$top=5&$skip=1", "/v1/instances?$top=5&$skip=1", id="query-kept"),
        pytest.param("/a%20b/%C3%A9", "/v1/a%20b/%C3%A9", id="percent-encoding-kept"),
        pytest.param("/a/../b", "/v1/a/../b", id="dot-segment-below-base"),
        pytest.param("//evil.example/x", "/v1//evil.example/x", id="double-slash-stays-below"),
        pytest.param("/x?subscription-key=evil&a=1", "/v1/x?a=1", id="key-param-removed"),
        pytest.param(
            "/x?a=1&Subscription-Key=e&subscription%2Dkey=e2", "/v1/x?a=1", id="key-param-variants"
        ),
        pytest.param("/x?a=%2B1+2&b", "/v1/x?a=%2B1+2&b", id="query-byte-exact"),
        pytest.param("/", "/v1/", id="root"),
    ],
)
def test_target_is_below_base_path(target: str, expected: str) -> None:
    """The forwarded target is the base path + the path, byte-exact, minus any key parameter."""
    assert build_target(BASE.raw_path, target) == expected


@pytest.mark.parametrize(
    "target",
    [
        pytest.param("/..", id="dotdot"),
        pytest.param("/../secret", id="dotdot-prefix"),
        pytest.param("/a/../../secret", id="climb-two"),
        pytest.param("/%2e%2e/secret", id="encoded-dots"),
        pytest.param("/%2E%2E/secret", id="encoded-dots-upper"),
        pytest.param("/a/..%2f..%2fsecret", id="encoded-slash"),
        pytest.param("/%252e%252e/secret", id="double-encoded"),
        pytest.param("/..;/secret", id="servlet-params"),
        pytest.param("/a\\..\\..\\secret", id="backslashes"),
        # A servlet container drops ";\\x" as parameters (a backslash separates nothing
        # there), leaving an empty segment and then ".." (found by the property test).
        pytest.param("/;\\x/..", id="servlet-params-over-a-backslash"),
        pytest.param("/;%2fx/..", id="servlet-params-over-an-encoded-slash"),
        pytest.param("http://other.example/", id="absolute-form"),
        pytest.param("*", id="asterisk-form"),
        pytest.param("/x#frag", id="fragment"),
    ],
)
def test_escaping_targets_are_refused(target: str) -> None:
    """Targets that would leave the base path, or are not origin-form, are a 400."""
    with pytest.raises(BadRequest):
        build_target(BASE.raw_path, target)


def _headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def test_request_headers_drop_hop_by_hop_and_caller_credentials() -> None:
    """Hop-by-hop, Connection-named, credential and forwarding headers never go upstream."""
    headers = _headers(
        ("Host", "evil.example"),
        ("Connection", "keep-alive, X-Secret-Hop"),
        ("X-Secret-Hop", "1"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Authorization", "Basic eA=="),
        ("Proxy-Foo", "1"),
        ("TE", "trailers"),
        ("Trailer", "X"),
        ("Transfer-Encoding", "chunked"),
        ("Upgrade", "websocket"),
        ("Authorization", "Bearer caller"),
        ("Ocp-Apim-Subscription-Key", "caller-key"),
        ("ocp-apim-subscription-key", "caller-key-2"),
        ("X-Forwarded-Host", "evil.example"),
        ("Forwarded", "host=evil.example"),
        ("X-Caller", "billing"),
        ("Accept", "application/json"),
        ("X-Custom", "a"),
        ("X-Custom", "b"),
    )
    out = request_headers(headers, frozenset({"x-caller"}))
    assert list(out.items()) == [
        ("Accept", "application/json"),
        ("X-Custom", "a"),
        ("X-Custom", "b"),
    ]


def test_response_headers_keep_end_to_end_fields() -> None:
    """Upstream response headers pass back except the hop-by-hop ones."""
    headers = _headers(
        ("Content-Type", "application/json"),
        ("Content-Encoding", "gzip"),
        ("Connection", "close, X-Hop"),
        ("X-Hop", "1"),
        ("Transfer-Encoding", "chunked"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
    )
    out = response_headers(headers)
    assert list(out.items()) == [
        ("Content-Type", "application/json"),
        ("Content-Encoding", "gzip"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
    ]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("2", 2.0, id="seconds"),
        pytest.param(None, None, id="absent"),
        pytest.param("soon", None, id="garbage"),
        pytest.param("Wed, 21 Oct 2015 07:28:10 GMT", 10.0, id="http-date"),
        pytest.param("Wed, 21 Oct 2015 07:27:00 GMT", 0.0, id="date-in-past"),
    ],
)
def test_retry_after(value: str | None, expected: float | None) -> None:
    """Retry-After is read as delta-seconds or an HTTP-date relative to now."""
    now = 1445412480.0  # 2015-10-21 07:28:00 UTC
    assert retry_after_seconds(value, now) == expected
