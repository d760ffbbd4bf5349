"""Our proxy environment reading, held to requests' (urllib's) on generated hosts and lists.

Where the two are meant to agree, hypothesis generates the inputs and any divergence fails.
Where they deliberately differ (SECURITY.md, "Egress proxy"), each difference is pinned by
an example that asserts both answers, so a change on either side is noticed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

import pytest
import requests.utils
from hypothesis import given, settings
from hypothesis import strategies as st
from yarl import URL

from gateway import config
from gateway.egress import NoProxy

LABELS = ("a", "b", "ex", "corp", "svc", "api")
IPV4 = ("10.0.0.1", "10.1.2.3", "192.168.1.10", "172.16.5.4", "8.8.8.8")
CIDRS = ("10.0.0.0/8", "10.1.0.0/16", "192.168.0.0/16", "172.16.0.0/12", "8.8.8.0/24")
PORTS = (80, 443, 3128, 8443)


@contextmanager
def clean_environment() -> Iterator[None]:
    """requests reads os.environ: only what the case sets, nothing from this machine."""
    with mock.patch.dict(os.environ, clear=True):
        os.environ["PATH"] = "/usr/bin:/bin"
        yield


def reference_bypass(url: str, no_proxy: str) -> bool:
    """requests' answer: does `url` go direct under `no_proxy`?"""
    with clean_environment():
        return requests.utils.should_bypass_proxies(url, no_proxy=no_proxy)


def our_bypass(url: str, no_proxy: str) -> bool:
    """Ours, given the effective port as the gateway always knows it."""
    parsed = URL(url)
    return NoProxy.parse(no_proxy).bypasses(parsed.host or "", parsed.port)


domains = st.lists(st.sampled_from(LABELS), min_size=1, max_size=3).map(".".join)


@st.composite
def domain_entries(draw: st.DrawFn) -> str:
    """A NO_PROXY name entry: a suffix, maybe with a leading dot, case, port, spaces."""
    name = draw(domains)
    if draw(st.booleans()):
        name = name.upper()
    prefix = draw(st.sampled_from(("", ".", "..")))
    port = draw(st.sampled_from(("", *tuple(f":{p}" for p in PORTS))))
    pad = draw(st.sampled_from(("", " ", "  ")))
    return f"{pad}{prefix}{name}{port}{pad}"


entries = st.one_of(domain_entries(), st.sampled_from(IPV4), st.sampled_from(CIDRS), st.just(""))
lists = st.lists(entries, max_size=5).map(",".join)
ports = st.sampled_from((None, *PORTS))


def url_for(host: str, port: int | None) -> str:
    """An https URL for `host`, with the port explicit when one is given."""
    return f"https://{host}:{port}/" if port else f"https://{host}/"


@settings(max_examples=400, deadline=None)
@given(host=domains, port=ports, no_proxy=lists)
def test_names_match_as_requests_matches_them(host: str, port: int | None, no_proxy: str) -> None:
    """Host names against generated NO_PROXY lists: same answer as requests."""
    url = url_for(host, port)
    # requests compares `name:port` entries case-sensitively (names are not: RFC 4343);
    # the differences test pins it, and the reference gets the list in lower case.
    lowered = no_proxy.lower()
    # Ours takes the effective port whether the URL writes it or not; requests matches a
    # port entry only against a written port (pinned below): it is asked with 443 written.
    written = url_for(host, port or 443)
    assert our_bypass(url, no_proxy) == reference_bypass(written, lowered), (url, no_proxy)


@settings(max_examples=300, deadline=None)
@given(host=st.sampled_from(IPV4), port=ports, no_proxy=lists)
def test_ipv4_addresses_match_as_requests_matches_them(
    host: str, port: int | None, no_proxy: str
) -> None:
    """IPv4 addresses against exact addresses and CIDR ranges: same answer as requests."""
    url = url_for(host, port)
    assert our_bypass(url, no_proxy) == reference_bypass(url, no_proxy), (url, no_proxy)


def test_star_alone_bypasses_everything_in_both() -> None:
    """NO_PROXY=* sends everything direct, in both."""
    for url in ("https://api.example.com/", "http://10.0.0.1:8080/"):
        assert our_bypass(url, "*")
        assert reference_bypass(url, "*")


@pytest.mark.parametrize(
    ("no_proxy", "url", "ours", "reference"),
    [
        # `*` anywhere in the list means everything (Go's reading); requests only `*` alone.
        pytest.param("internal,*", "https://api.example.com/", True, False, id="star-in-list"),
        # `*.example.com` means example.com's subtree, as `.example.com` does.
        pytest.param("*.ex.com", "https://a.ex.com/", True, False, id="star-dot-prefix"),
        # Addresses are matched as addresses, never as a name's suffix.
        pytest.param("0.0.1", "https://10.0.0.1/", False, True, id="ip-as-suffix"),
        # An address entry may carry a port; requests ignores the entry.
        pytest.param("10.0.0.1:8443", "https://10.0.0.1:8443/", True, False, id="ip-with-port"),
        # IPv6 ranges are ranges; requests compares IPv6 entries as text.
        pytest.param("fd00::/8", "https://[fd00::1]/", True, False, id="ipv6-cidr"),
        # The port is the effective one, written or not.
        pytest.param("api.ex:443", "https://api.ex/", True, False, id="implicit-port"),
        # Names are case-insensitive with a port too; requests compares `name:port` as text.
        pytest.param("API.ex:443", "https://api.ex:443/", True, False, id="port-entry-case"),
        # A trailing dot names the same host.
        pytest.param("api.ex", "https://api.ex./", True, False, id="trailing-dot"),
        # An entry with a space inside is ignored; requests deletes the space.
        pytest.param("api. ex", "https://api.ex/", False, True, id="inner-space"),
    ],
)
def test_deliberate_differences(no_proxy: str, url: str, ours: bool, reference: bool) -> None:
    """Each documented difference from requests, with both answers pinned."""
    assert our_bypass(url, no_proxy) is ours
    assert reference_bypass(url, no_proxy) is reference


PROXY_NAMES = ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY")
values = st.sampled_from(("", "http://p1:3001", "http://p2:3002", "p3:3003"))


@settings(max_examples=300, deadline=None)
@given(env=st.dictionaries(st.sampled_from(PROXY_NAMES), values, max_size=6))
def test_proxy_variables_are_chosen_as_requests_chooses_them(env: dict[str, str]) -> None:
    """Which variable names the proxy for https and http destinations: as requests picks it."""
    settings_ = config.load(
        {"AZURE_TENANT_ID": "t", "AZURE_CLIENT_ID": "c", "AZURE_CLIENT_SECRET": "s" * 12, **env}
    )
    for url in ("https://api.example.com/", "http://api.example.com/"):
        slot = URL(url).scheme
        if any(env.get(lower) == "" and env.get(lower.upper()) for lower in (f"{slot}_proxy",)):
            continue  # an empty lower-case variable: urllib hides the upper-case one (SECURITY.md)
        if env.get("all_proxy") == "" and env.get("ALL_PROXY"):
            continue
        with clean_environment():
            os.environ.update(env)
            chosen = requests.utils.select_proxy(url, requests.utils.get_environ_proxies(url))
        ours = settings_.egress_for(URL(url))
        expected = URL(chosen if "://" in chosen else f"http://{chosen}") if chosen else None
        assert (ours.address if ours else None) == (
            f"{expected.host}:{expected.port}" if expected else None
        ), env
