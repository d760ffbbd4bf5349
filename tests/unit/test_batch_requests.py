"""`$batch` request rewriting held to a reference: Python's `email` package parses the body
before and after; every part must be unchanged but for request-line URLs that name the
gateway, which must name the upstream instead (and a Host header beside them)."""

from __future__ import annotations

import email
import email.policy
from email.message import Message
from urllib.parse import urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from yarl import URL

from gateway.batch_requests import BatchRequestRewriter, is_batch, multipart_boundary

UPSTREAM = URL("https://Contoso.crm.dynamics.com/api/data/v9.2")
REWRITER = BatchRequestRewriter(UPSTREAM, "/dataverse/")
HOST = "gw.example:8443"
GATEWAY = f"https://{HOST}/dataverse"
UPSTREAM_BASE = "https://contoso.crm.dynamics.com/api/data/v9.2"


def reference_url(url: str, scheme: str = "https", host: str = HOST) -> str:
    """The reference: urllib's split says whether the URL names the gateway's route."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    path = parts.path
    names_route = path == "/dataverse" or path.startswith("/dataverse/")
    if parts.scheme.lower() == scheme and parts.netloc.lower() == host.lower() and names_route:
        rest = url[url.index("/dataverse") + len("/dataverse") :]
        return UPSTREAM_BASE + rest
    return url


def part(method: str, url: str, content_id: int, body: str = "", host: str | None = None) -> str:
    """One application/http part holding a request."""
    headers = "Content-Type: application/json\r\n" if body else ""
    if host is not None:
        headers += f"Host: {host}\r\n"
    return (
        "Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n"
        f"Content-ID: {content_id}\r\n\r\n{method} {url} HTTP/1.1\r\n{headers}\r\n{body}\r\n"
    )


def batch(parts: list[str], change_set: list[str] | None = None) -> bytes:
    """A $batch body with boundary `b`, an optional change set (boundary `cs`) after the parts."""
    text = "".join(f"--b\r\n{p}" for p in parts)
    if change_set is not None:
        inner = "".join(f"--cs\r\n{p}" for p in change_set)
        text += f"--b\r\nContent-Type: multipart/mixed; boundary=cs\r\n\r\n{inner}--cs--\r\n"
    return (text + "--b--\r\n").encode()


def parsed(body: bytes) -> list[tuple[list[tuple[str, str]], str, bytes]]:
    """Every leaf part as (its MIME headers, its request line, the rest of its payload)."""
    message = email.message_from_bytes(
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + body, policy=email.policy.HTTP
    )
    assert not message.defects
    leaves: list[tuple[list[tuple[str, str]], str, bytes]] = []

    def walk(node: Message) -> None:
        for child in node.get_payload():
            assert isinstance(child, Message)
            if child.is_multipart():
                walk(child)
                continue
            payload = child.get_payload(decode=True)
            assert isinstance(payload, bytes)
            line, _, rest = payload.partition(b"\r\n")
            leaves.append(([(k, str(v)) for k, v in child.items()], line.decode(), rest))

    walk(message)
    return leaves


def rewrite(body: bytes, host: str = HOST, scheme: str = "https") -> bytes:
    """The body as the gateway forwards it (unchanged when the rewriter changed nothing)."""
    out = REWRITER.rewrite(body, "b", scheme, host)
    return body if out is None else out


# --------------------------------------------------------------------------- examples


def test_sdk_change_set_parts_name_the_upstream() -> None:
    """The SDK's absolute part URLs on the gateway become the upstream's, in a change set."""
    body = batch(
        [part("GET", f"{GATEWAY}/accounts?$select=name", 1)],
        [part("POST", f"{GATEWAY}/accounts", n, '{"name": "x"}') for n in (2, 3)],
    )
    out = rewrite(body)
    lines = [line for _, line, _ in parsed(out)]
    assert lines == [
        f"GET {UPSTREAM_BASE}/accounts?$select=name HTTP/1.1",
        f"POST {UPSTREAM_BASE}/accounts HTTP/1.1",
        f"POST {UPSTREAM_BASE}/accounts HTTP/1.1",
    ]
    assert len(out) == len(body) + 3 * (len(UPSTREAM_BASE) - len(GATEWAY))


@pytest.mark.parametrize(
    ("url", "host"),
    [
        pytest.param("https://evil.example/dataverse/accounts", HOST, id="other-host"),
        pytest.param("https://gw.example:9999/dataverse/accounts", HOST, id="other-port"),
        pytest.param("http://gw.example:8443/dataverse/accounts", HOST, id="other-scheme"),
        pytest.param(f"https://{HOST}/dataverse2/accounts", HOST, id="longer-prefix"),
        pytest.param(f"https://{HOST}/other/accounts", HOST, id="other-route"),
        pytest.param(f"https://{HOST}@evil.example/dataverse/x", HOST, id="userinfo"),
        pytest.param("accounts", HOST, id="relative"),
        pytest.param("$1", HOST, id="content-id"),
        pytest.param("/dataverse/api/data/v9.2/accounts", HOST, id="origin-form"),
        pytest.param(f"{GATEWAY}/accounts", "evil.example/x", id="host-not-plain"),
        pytest.param(f"{UPSTREAM_BASE}/accounts", HOST, id="already-upstream"),
    ],
)
def test_what_does_not_name_the_gateway_passes_byte_exact(url: str, host: str) -> None:
    """A part URL not on the gateway's route as the caller named it (or a Host that is not a
    plain host[:port]) leaves the whole body byte-identical: the rewriter reports no change."""
    body = batch([part("GET", url, 1)], [part("POST", url, 2, "{}")])
    assert REWRITER.rewrite(body, "b", "https", host) is None


def test_case_of_scheme_and_host_does_not_matter_but_the_prefix_does() -> None:
    """Scheme and host compare case-insensitively; the path prefix is compared exactly."""
    upper = batch([part("GET", "HTTPS://GW.Example:8443/dataverse/accounts", 1)])
    assert parsed(rewrite(upper))[0][1] == f"GET {UPSTREAM_BASE}/accounts HTTP/1.1"
    assert (
        REWRITER.rewrite(batch([part("GET", f"https://{HOST}/DataVerse/a", 1)]), "b", "https", HOST)
        is None
    )


def test_host_header_beside_a_rewritten_url_names_the_upstream() -> None:
    """A part's Host naming the gateway beside a rewritten URL names the upstream; a Host
    beside an unrewritten URL, or naming another host, is left alone."""
    body = batch(
        [
            part("GET", f"{GATEWAY}/accounts", 1, host=HOST),
            part("GET", f"{GATEWAY}/contacts", 2, host="other.example"),
        ]
    )
    out = parsed(rewrite(body))
    assert b"Host: contoso.crm.dynamics.com\r\n" in out[0][2]
    assert b"Host: other.example\r\n" in out[1][2]
    untouched = batch([part("GET", "accounts", 1, host=HOST)])
    assert REWRITER.rewrite(untouched, "b", "https", HOST) is None


def test_catch_all_route_and_upstream_port() -> None:
    """On a `/` route the gateway's origin alone is replaced, by an upstream with its port."""
    rewriter = BatchRequestRewriter(URL("http://127.0.0.1:9001/base/"), "/")
    out = rewriter.rewrite(
        batch([part("GET", "http://localhost:8080/x?y=1", 1)]), "b", "http", "localhost:8080"
    )
    assert out is not None
    assert parsed(out)[0][1] == "GET http://127.0.0.1:9001/base/x?y=1 HTTP/1.1"


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("POST", "/dataverse/api/data/v9.2/$batch", True),
        ("POST", "/dataverse/api/data/v9.2/%24batch?x=1", True),
        ("GET", "/dataverse/api/data/v9.2/$batch", False),
        ("POST", "/dataverse/api/data/v9.2/accounts", False),
        ("POST", "/dataverse/x?$batch", False),
    ],
)
def test_only_posts_to_batch_are_considered(method: str, path: str, expected: bool) -> None:
    """The cheap check: POST and a path (not a query) ending in $batch."""
    assert is_batch(method, path) is expected


def test_boundary_only_for_multipart_mixed() -> None:
    """A boundary is taken only from multipart/mixed."""
    assert multipart_boundary('multipart/mixed; boundary="batch_1"') == "batch_1"
    assert multipart_boundary("multipart/form-data; boundary=x") is None
    assert multipart_boundary(None) is None


# --------------------------------------------------------------------------- the reference

_URLS = st.sampled_from(
    [
        f"{GATEWAY}/accounts",
        f"{GATEWAY}/accounts(00000000-0000-0000-0000-000000000001)?$select=name",
        f"{GATEWAY}",
        f"{GATEWAY}?x=1",
        "HTTPS://gw.EXAMPLE:8443/dataverse/contacts",
        "https://evil.example/dataverse/accounts",
        f"https://{HOST}/dataversex/accounts",
        "https://gw.example/dataverse/accounts",
        "accounts",
        "$1",
        f"{UPSTREAM_BASE}/accounts",
    ]
)
# Part bodies, some holding a boundary and a request line that are content, not structure.
_BODIES = st.text(st.characters(codec="ascii", exclude_characters="\r\n-"), max_size=40) | (
    st.sampled_from(
        [
            f"x--b\r\nContent-Type: application/http\r\n\r\nGET {GATEWAY}/x HTTP/1.1\r\n",
            f'{{"note": "--cs --b"}}\r\nGET {GATEWAY}/y HTTP/1.1',
            "--bx\r\n",
        ]
    )
)
_PART = st.tuples(
    st.sampled_from(["GET", "POST", "PATCH", "DELETE"]),
    _URLS,
    _BODIES,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_PART, min_size=1, max_size=5), st.none() | st.lists(_PART, min_size=1, max_size=4))
def test_rewrite_matches_the_email_reference(
    outer: list[tuple[str, str, str]], change_set: list[tuple[str, str, str]] | None
) -> None:
    """Parsed before and after, every part's headers and payload are the same except the
    request line, whose URL is what the reference (urllib's split) says; when no URL names
    the gateway the body is byte-identical."""
    parts = [part(m, u, n, b) for n, (m, u, b) in enumerate(outer)]
    cs = (
        None
        if change_set is None
        else [part(m, u, 100 + n, b) for n, (m, u, b) in enumerate(change_set)]
    )
    body = batch(parts, cs)
    out = rewrite(body)
    before, after = parsed(body), parsed(out)
    assert len(before) == len(after)
    for (head_b, line_b, rest_b), (head_a, line_a, rest_a) in zip(before, after, strict=True):
        assert head_a == head_b
        assert rest_a == rest_b
        method, url, version = line_b.split(" ")
        assert line_a == f"{method} {reference_url(url)} {version}"
    urls = [u for _, u, _ in outer + (change_set or [])]
    if all(reference_url(u) == u for u in urls):
        assert out == body
