"""Property tests for the proxy's pure URL and header policy (hypothesis)."""

from __future__ import annotations

import posixpath
import re
from urllib.parse import unquote

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway.errors import BadRequest
from gateway.proxy import (
    HOP_BY_HOP,
    KEY_HEADER,
    build_target,
    climbs_above_root,
    request_headers,
    strip_key_param,
)
from tests.security.support import key_name

BASE = URL("https://apim.example/customerinsights/v1")
PROPERTY = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Path pieces an attacker would combine: dot-segments in every spelling, separators, noise.
_PIECES = [
    "..",
    ".",
    "%2e",
    "%2E",
    "%2e%2e",
    ".%2e",
    "%252e",
    "%25252e",
    "/",
    "\\",
    "%2f",
    "%2F",
    "%5c",
    "%5C",
    "%252f",
    ";",
    "..;",
    ";x",
    "//",
    "%00",
    "a",
    "b",
    "x y",
    "?",
    "#",
    "%",
    "%zz",
    "é",
    "~",
    "@",
    ":",
    "+",
]
paths = st.lists(st.sampled_from(_PIECES), max_size=12).map(lambda parts: "/" + "".join(parts))
any_text = st.text(st.characters(codec="utf-8"), max_size=40)


def _resolve_all_ways(path: str) -> list[str]:
    """The path as upstreams might read it: decoded 0-3 times, \\ as /, ;params dropped."""
    readings, current = [], path
    for _ in range(4):
        for variant in (current, current.replace("\\", "/")):
            readings.append(variant)
            readings.append(re.sub(r";[^/]*", "", variant))
        current = unquote(current)
    return readings


def _normalised(path: str) -> str:
    return posixpath.normpath("/base/" + path.lstrip("/"))


@PROPERTY
@given(path=paths, query=any_text)
def test_forwarded_url_never_leaves_the_base_path(path: str, query: str) -> None:
    """For any path, the target is refused or starts with the base path under every decoding."""
    raw_target = path + ("?" + query if query else "")
    try:
        target = build_target(BASE.raw_path, raw_target)
    except BadRequest:
        return
    # The client is bound to its origin; the target can only be a path below the base.
    target_path = target.partition("?")[0]
    assert target_path.startswith(BASE.raw_path + "/")
    sent_path = raw_target.partition("?")[0]
    assert target_path == BASE.raw_path + sent_path
    for reading in _resolve_all_ways(sent_path):
        assert _normalised(reading).startswith("/base"), (path, reading)


@PROPERTY
@given(path=paths)
def test_climbing_is_detected_in_any_spelling(path: str) -> None:
    """climbs_above_root is True whenever some decoding of the path resolves above the root."""
    path = path.partition("?")[0]
    escapes = any(
        not _normalised(reading).startswith("/base") for reading in _resolve_all_ways(path)
    )
    if escapes:
        assert climbs_above_root(path), path


_KEY_NAMES = st.sampled_from(
    [
        "subscription-key",
        "Subscription-Key",
        "SUBSCRIPTION-KEY",
        "subscription%2Dkey",
        "subscription%2dkey",
        "%73ubscription-key",
        "subscription-key%20",
        "%20subscription-key",
        "subscription-key+",
        "+subscription-key",
        "subscription-key%09",
        "?subscription-key",
        "??subscription-key",
        "a;subscription-key",
        "%3Fsubscription-key",
    ]
)
_OTHER_NAMES = st.sampled_from(["a", "b", "key", "subscription", "sub-key", "subscription_key"])
query_parts = st.lists(
    st.tuples(st.one_of(_KEY_NAMES, _OTHER_NAMES), st.text("abc%=+", max_size=5)), max_size=6
)


@PROPERTY
@given(parts=query_parts)
def test_no_subscription_key_parameter_survives(parts: list[tuple[str, str]]) -> None:
    """For any query, no parameter decoding to subscription-key is forwarded; the rest are kept."""
    query = "&".join(f"{name}={value}" for name, value in parts)
    kept = strip_key_param(query)
    names = [key_name(piece) for part in kept.split("&") for piece in part.split(";")]
    assert "subscription-key" not in names
    others = [
        f"{name}={value}"
        for name, value in parts
        if "subscription-key" not in [key_name(piece) for piece in f"{name}={value}".split(";")]
    ]
    assert (kept.split("&") if kept else []) == others


_CREDENTIAL_NAMES = ["Authorization", KEY_HEADER, "authorization", "OCP-APIM-SUBSCRIPTION-KEY"]
header_names = st.one_of(
    st.sampled_from(
        [
            *_CREDENTIAL_NAMES,
            "Connection",
            "Host",
            "X-Forwarded-For",
            "Forwarded",
            "Accept",
            "X-Custom",
            "Proxy-Authorization",
            "Upgrade",
            "TE",
            "Keep-Alive",
            "Content-Length",
            "Transfer-Encoding",
            "X-Request-ID",
            "Trailer",
        ]
    ),
    st.from_regex(r"\A[A-Za-z][A-Za-z0-9-]{0,15}\Z"),
)
header_values = st.one_of(
    st.sampled_from(
        [
            "close",
            "keep-alive",
            "Authorization",
            "close, Authorization, Ocp-Apim-Subscription-Key",
            "X-Custom",
            "upgrade",
            "value",
        ]
    ),
    st.from_regex(r"\A[ -~]{0,20}\Z"),
)


@PROPERTY
@given(pairs=st.lists(st.tuples(header_names, header_values), max_size=15))
def test_credential_headers_are_only_the_gateways(pairs: list[tuple[str, str]]) -> None:
    """For any caller headers, upstream gets exactly the gateway's credentials and no hop-by-hop."""
    caller = CIMultiDictProxy(CIMultiDict(pairs))
    out = request_headers(caller)
    names = {name.lower() for name in out}
    assert "authorization" not in names
    assert KEY_HEADER.lower() not in names
    assert not names & HOP_BY_HOP
    assert not names & {"host", "forwarded", "x-forwarded-for", "x-request-id", "content-length"}
    named = {
        token.strip().lower()
        for value in caller.getall("Connection", ())
        for token in value.split(",")
    }
    assert not names & named
    # What the gateway then sends: exactly one of each credential, its own.
    out["Authorization"] = "Bearer gateway-token"
    out[KEY_HEADER] = "gateway-key"
    assert out.getall("Authorization") == ["Bearer gateway-token"]
    assert out.getall(KEY_HEADER) == ["gateway-key"]
    kept = [(name, value) for name, value in caller.items() if name.lower() in names]
    assert [
        (n, v) for n, v in out.items() if n.lower() in names - {"authorization", KEY_HEADER.lower()}
    ] == kept
