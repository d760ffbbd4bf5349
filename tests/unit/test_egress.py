"""The egress decision: proxy URLs, NO_PROXY matching, precedence, and how config reads them."""

from __future__ import annotations

import base64

import pytest
from yarl import URL

from gateway import config
from gateway.egress import Egress, NoProxy, ProxyURLError, parse_proxy_url
from gateway.errors import ConfigError, MalformedRequest
from gateway.upstream import UpstreamClient

BASE = {"AZURE_TENANT_ID": "t", "AZURE_CLIENT_ID": "c", "AZURE_CLIENT_SECRET": "s" * 12}
PROXY_SECRET = "proxy-pass-canary-7Yw"


@pytest.mark.parametrize(
    ("raw", "address", "authorization"),
    [
        pytest.param("http://proxy.corp:3128", "proxy.corp:3128", None, id="plain"),
        pytest.param("proxy.corp:3128", "proxy.corp:3128", None, id="no-scheme-means-http"),
        pytest.param("http://Proxy.Corp.", "proxy.corp:80", None, id="default-port-80"),
        pytest.param("http://[::1]:8080/", "[::1]:8080", None, id="ipv6"),
        pytest.param("http://u:p@10.0.0.1:3128", "10.0.0.1:3128", "u:p", id="credentials"),
        pytest.param("http://u%40x:p%3Aq@h:1", "h:1", "u@x:p:q", id="percent-encoded"),
        pytest.param("http://u@h:1", "h:1", "u:", id="user-only"),
    ],
)
def test_proxy_urls_are_read_like_curl_and_requests(
    raw: str, address: str, authorization: str | None
) -> None:
    """A proxy URL gives its host:port and, decoded, its Basic credentials."""
    proxy = parse_proxy_url(raw)
    assert proxy.address == address
    expected = (
        "Basic " + base64.b64encode(authorization.encode()).decode() if authorization else None
    )
    assert proxy.authorization() == expected


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        pytest.param(f"https://u:{PROXY_SECRET}@proxy:443", "https:// proxy", id="https-proxy"),
        pytest.param(f"socks5://u:{PROXY_SECRET}@proxy:1080", "socks5", id="socks"),
        pytest.param(f"http://u:{PROXY_SECRET}@proxy:99999", "bad host or port", id="port"),
        pytest.param(f"http://u:{PROXY_SECRET}@proxy:3128/path", "without a path", id="path"),
        pytest.param("http://:3128", "host", id="no-host"),
        pytest.param("http://us%C3%A9r:pw@proxy:1", "printable ASCII", id="non-ascii"),
    ],
)
def test_unusable_proxy_urls_are_refused_without_quoting_them(raw: str, fragment: str) -> None:
    """An unusable proxy URL is refused with a reason that never repeats its credentials."""
    with pytest.raises(ProxyURLError) as caught:
        parse_proxy_url(raw)
    assert fragment in str(caught.value)
    assert PROXY_SECRET not in str(caught.value)


@pytest.mark.parametrize(
    ("no_proxy", "host", "port", "bypass"),
    [
        ("example.com", "example.com", 443, True),
        ("example.com", "api.example.com", 443, True),
        ("example.com", "notexample.com", 443, False),
        (".example.com", "example.com", 443, True),
        (".example.com", "a.b.example.com", 443, True),
        ("*.example.com", "a.example.com", 443, True),
        ("EXAMPLE.com.", "Api.Example.COM", 443, True),
        ("example.com:8443", "api.example.com", 8443, True),
        ("example.com:8443", "api.example.com", 443, False),
        ("*", "anything.at.all", 1, True),
        ("internal, *", "anything.at.all", 1, True),
        ("10.0.0.0/8", "10.20.30.40", 80, True),
        ("10.0.0.0/8", "11.0.0.1", 80, False),
        ("10.0.0.1", "10.0.0.1", 80, True),
        ("10.0.0.1:8080", "10.0.0.1", 80, False),
        ("0.1", "10.0.0.1", 80, False),  # addresses are not domain suffixes
        ("fd00::/8", "fd12::1", 443, True),
        ("::1", "::1", 443, True),
        ("[::1]:8443", "::1", 8443, True),
        ("[::1]:8443", "::1", 443, False),
        ("10.0.0.0/8", "ten.example", 80, False),  # names are never resolved
        ("", "example.com", 443, False),
        (" , ,", "example.com", 443, False),
        ("exa mple.com,bad:port", "example.com", 443, False),
    ],
)
def test_no_proxy_matching(no_proxy: str, host: str, port: int, bypass: bool) -> None:
    """NO_PROXY entries: suffixes on label boundaries, `*`, addresses, CIDR ranges, ports."""
    assert NoProxy.parse(no_proxy).bypasses(host, port) is bypass


CORP = parse_proxy_url("http://proxy.corp:3128")
LOCAL = parse_proxy_url("http://127.0.0.1:3128")


@pytest.mark.parametrize(
    ("egress", "url", "decision"),
    [
        pytest.param(Egress(), "https://api.example.com", "direct", id="nothing-set"),
        pytest.param(
            Egress(https_proxy=CORP), "https://api.example.com", "proxy proxy.corp:3128", id="https"
        ),
        pytest.param(Egress(https_proxy=CORP), "http://api.example.com", "direct", id="http-only"),
        pytest.param(Egress(all_proxy=CORP), "http://a.example", "proxy proxy.corp:3128", id="all"),
        pytest.param(
            Egress(https_proxy=CORP, no_proxy=NoProxy.parse(".example.com")),
            "https://api.example.com",
            "direct",
            id="no-proxy",
        ),
        pytest.param(
            Egress(https_proxy=CORP), "https://127.0.0.1:8443", "direct", id="loopback-remote-proxy"
        ),
        pytest.param(Egress(https_proxy=CORP), "https://localhost", "direct", id="localhost"),
        pytest.param(
            Egress(https_proxy=LOCAL),
            "https://127.0.0.1:8443",
            "proxy 127.0.0.1:3128",
            id="loopback-local-proxy",
        ),
    ],
)
def test_one_decision_per_destination(egress: Egress, url: str, decision: str) -> None:
    """The scheme picks the variable; NO_PROXY and the loopback rule can make it direct."""
    parsed = URL(url)
    assert egress.describe(parsed.scheme, parsed.host or "", parsed.port) == decision


def _egress(env: dict[str, str]) -> config.Settings:
    return config.load({**BASE, **env})


def test_lower_case_wins_and_empty_counts_as_unset() -> None:
    """https_proxy wins over HTTPS_PROXY; an empty https_proxy leaves HTTPS_PROXY in force."""
    both = _egress({"https_proxy": "http://lower:1", "HTTPS_PROXY": "http://upper:2"})
    assert both.egress_for(URL("https://api.example.com")) == parse_proxy_url("http://lower:1")
    empty = _egress({"https_proxy": "", "HTTPS_PROXY": "http://upper:2"})
    assert empty.egress_for(URL("https://api.example.com")) == parse_proxy_url("http://upper:2")
    no_proxy = _egress(
        {"HTTPS_PROXY": "http://p:1", "no_proxy": "other.example", "NO_PROXY": "api.example.com"}
    )
    assert no_proxy.egress_for(URL("https://api.example.com")) is not None


def test_egress_proxy_setting_overrides_the_environment() -> None:
    """CIGW_EGRESS_PROXY replaces every proxy variable and NO_PROXY, for both destinations."""
    env = {
        "HTTPS_PROXY": "socks5://unused:1",  # not even read, so not an error
        "NO_PROXY": "*",
        "CIGW_UPSTREAM_URL": "http://api.example.com/v1",
    }
    settings = _egress({**env, "CIGW_EGRESS_PROXY": "http://explicit:3128"})
    for url in settings.egress_destinations().values():
        assert settings.egress_for(url) == parse_proxy_url("http://explicit:3128")
    direct = _egress({**env, "HTTPS_PROXY": "http://p:1", "CIGW_EGRESS_PROXY": "None"})
    assert all(direct.egress_for(url) is None for url in direct.egress_destinations().values())


def test_bad_proxy_variables_are_named_without_their_credentials() -> None:
    """Each unusable proxy variable is named in the one ConfigError; no credential is shown."""
    with pytest.raises(ConfigError) as caught:
        _egress(
            {
                "HTTPS_PROXY": f"https://u:{PROXY_SECRET}@proxy:443",
                "all_proxy": f"socks5h://u:{PROXY_SECRET}@proxy:1080",
            }
        )
    text = str(caught.value)
    assert "HTTPS_PROXY names an https:// proxy" in text
    assert "all_proxy names a socks5h proxy" in text
    assert PROXY_SECRET not in text
    with pytest.raises(ConfigError) as caught:
        _egress({"CIGW_EGRESS_PROXY": f"ftp://u:{PROXY_SECRET}@proxy:21"})
    assert "CIGW_EGRESS_PROXY names a ftp proxy" in str(caught.value)
    assert PROXY_SECRET not in str(caught.value)


def test_describe_states_each_decision_and_redacts_credentials() -> None:
    """check-config's table: the proxy variables redacted, and one decision per destination."""
    settings = _egress(
        {
            "HTTPS_PROXY": f"http://user:{PROXY_SECRET}@proxy.corp:3128",
            "NO_PROXY": "api.example.com",
            "CIGW_UPSTREAM_URL": "https://api.example.com/v1",
        }
    )
    shown = settings.describe()
    assert shown["HTTPS_PROXY"] == "http://(credentials redacted)@proxy.corp:3128"
    assert shown["NO_PROXY"] == "api.example.com"
    assert shown["egress: token endpoint"] == "proxy proxy.corp:3128 (from HTTPS_PROXY)"
    assert shown["egress: upstream"] == "direct (NO_PROXY lists it)"
    everything = f"{shown} {settings!r} {settings.egress!r}"
    assert PROXY_SECRET not in everything
    assert "user" not in everything
    assert settings.egress.secrets() == ("user", PROXY_SECRET)


def test_absolute_form_heads_carry_the_proxy_credentials_and_stay_checked() -> None:
    """Through a proxy, an http request names the whole URL and authenticates to the proxy;
    the head check still refuses a smuggled line end."""
    proxy = parse_proxy_url(f"http://user:{PROXY_SECRET}@proxy.corp:3128")
    client = UpstreamClient(
        URL("http://api.example:8080"),
        tls=None,
        connect_timeout=1,
        read_timeout=1,
        proxy=proxy,
    )
    head = client._head("GET", "/v1/x?a=1", [("Accept", "*/*")], None, None)
    assert head == (
        b"GET http://api.example:8080/v1/x?a=1 HTTP/1.1\r\nHost: api.example:8080\r\n"
        + f"Proxy-Authorization: {proxy.authorization()}\r\n".encode()
        + b"Accept: */*\r\n\r\n"
    )
    with pytest.raises(MalformedRequest):
        client._head("GET", "/v1/x", [("Accept", "a\r\nX-Smuggled: 1")], None, None)
    # An https origin is only ever tunnelled: never written in absolute form as http.
    with pytest.raises(ValueError, match="needs a TLS context"):
        UpstreamClient(
            URL("https://api.example"), tls=None, connect_timeout=1, read_timeout=1, proxy=proxy
        )
