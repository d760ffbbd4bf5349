"""Egress through a real forward proxy (tinyproxy): token endpoint and upstream, or direct.

The environment given to config.load is set explicitly by each test (the machine's own
proxy variables never reach it); tinyproxy's log shows what went through the proxy.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trustme

from gateway.sandbox.apim import SubscriptionKeyPair
from gateway.sandbox.issuer import TokenIssuer
from tests.conftest import (
    CANARY_PRIMARY,
    CANARY_SECONDARY,
    RunningGateway,
    StartGateway,
    base_url,
    start_app,
)
from tests.process import run_cli
from tests.servers.forward_proxy import ForwardProxy, running_tinyproxy
from tests.servers.upstream import Upstream

PROXY_USER = "proxy-user-Tq83"  # unique, so "not in the output" means not leaked
PROXY_PASSWORD = "proxy-password-canary-Rk42"
NO_PROXY_VARIABLES = dict.fromkeys(("NO_PROXY", "no_proxy", "CIGW_EGRESS_PROXY"))


@pytest.fixture
def forward_proxy(tmp_path: Path) -> Iterator[ForwardProxy]:
    """tinyproxy without authentication."""
    with running_tinyproxy(tmp_path) as proxy:
        yield proxy


@pytest.fixture
def auth_proxy(tmp_path: Path) -> Iterator[ForwardProxy]:
    """tinyproxy demanding Basic credentials."""
    with running_tinyproxy(tmp_path, (PROXY_USER, PROXY_PASSWORD)) as proxy:
        yield proxy


def upstream_context(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    """Server-side TLS for the upstream, its certificate naming only `names`."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    return context


@pytest.fixture
async def tls_upstream(issuer: TokenIssuer, ca: trustme.CA) -> AsyncIterator[Upstream]:
    """The APIM-like upstream over TLS, its certificate for `localhost` only (not 127.0.0.1)."""
    server = Upstream(issuer, SubscriptionKeyPair(CANARY_PRIMARY, CANARY_SECONDARY))
    runner = await start_app(server.app(), upstream_context(ca, "localhost"))
    server.base_url = base_url(runner, "https").replace("127.0.0.1", "localhost")
    try:
        yield server
    finally:
        await runner.cleanup()


def port_of(url: str) -> int:
    """The port of a base URL."""
    return int(url.rsplit(":", 1)[1])


async def get(gw: RunningGateway, path: str = "/echo/x") -> tuple[int, dict[str, object]]:
    """GET through the gateway: status and JSON body."""
    async with gw.session.get(gw.url(path)) as response:
        return response.status, await response.json()


def egress_log(log_output: str) -> dict[str, str]:
    """The start-up log's decision per destination."""
    events = [json.loads(line) for line in log_output.splitlines() if '"egress"' in line]
    return {e["destination"]: e["egress"] for e in events if e.get("event") == "egress"}


async def test_environment_proxy_carries_token_requests_and_upstream_traffic(
    *,
    start_gateway: StartGateway,
    forward_proxy: ForwardProxy,
    issuer: TokenIssuer,
    upstream: Upstream,
    log_output: object,
) -> None:
    """HTTPS_PROXY/HTTP_PROXY: MSAL tunnels through the proxy, the upstream gets absolute-form."""
    gw = await start_gateway(
        {
            **NO_PROXY_VARIABLES,
            "HTTPS_PROXY": forward_proxy.url(),
            "HTTP_PROXY": forward_proxy.url(),
        }
    )
    status, body = await get(gw, "/echo/through-proxy")
    assert status == 200
    assert body["raw_path"] == "/v1/echo/through-proxy"
    assert forward_proxy.carried("CONNECT", f"127.0.0.1:{port_of(issuer.base_url)}") >= 1
    assert forward_proxy.carried("GET", f"{upstream.base_url}/v1/echo/through-proxy") == 1
    assert upstream.count() == 1
    decisions = egress_log(log_output.getvalue())  # type: ignore[attr-defined]
    assert decisions == {
        "token endpoint": f"proxy {forward_proxy.address}",
        "upstream": f"proxy {forward_proxy.address}",
    }


async def test_no_proxy_sends_the_listed_destination_direct(
    *,
    start_gateway: StartGateway,
    forward_proxy: ForwardProxy,
    issuer: TokenIssuer,
    upstream: Upstream,
) -> None:
    """NO_PROXY naming the upstream's host:port: the upstream direct, the token endpoint not."""
    gw = await start_gateway(
        {
            **NO_PROXY_VARIABLES,
            "https_proxy": forward_proxy.url(),
            "http_proxy": forward_proxy.url(),
            "no_proxy": f"example.invalid, 127.0.0.1:{port_of(upstream.base_url)}",
        }
    )
    for _ in range(3):
        assert (await get(gw))[0] == 200
    assert upstream.count() == 3
    assert forward_proxy.carried("GET", "http://") == 0
    assert forward_proxy.carried("CONNECT", f"127.0.0.1:{port_of(issuer.base_url)}") >= 1


async def test_no_proxy_can_exclude_the_token_endpoint(
    *,
    start_gateway: StartGateway,
    forward_proxy: ForwardProxy,
    issuer: TokenIssuer,
    upstream: Upstream,
) -> None:
    """NO_PROXY as a CIDR range covering the token endpoint: MSAL never touches the proxy."""
    gw = await start_gateway(
        {
            **NO_PROXY_VARIABLES,
            "HTTPS_PROXY": forward_proxy.url(),
            "NO_PROXY": "127.0.0.0/8",
        }
    )
    assert (await get(gw))[0] == 200
    assert issuer.token_calls >= 1
    assert forward_proxy.requests() == []


async def test_https_upstream_through_connect_checks_the_upstreams_name(
    *,
    start_gateway: StartGateway,
    forward_proxy: ForwardProxy,
    tls_upstream: Upstream,
    ca_file: Path,
) -> None:
    """CONNECT tunnel, TLS inside it with SNI and certificate checked for the upstream's name."""
    gw = await start_gateway(
        {
            **NO_PROXY_VARIABLES,
            "CIGW_EGRESS_PROXY": forward_proxy.url(),
            "CIGW_UPSTREAM_URL": f"{tls_upstream.base_url}/v1",
            "CIGW_UPSTREAM_CA_FILE": str(ca_file),
        }
    )
    for _ in range(2):
        status, body = await get(gw, "/echo/tunnelled")
        assert status == 200
        assert body["raw_path"] == "/v1/echo/tunnelled"
    target = f"localhost:{port_of(tls_upstream.base_url)}"
    # Kept alive: two requests, one tunnel (the issuer's tunnels are to 127.0.0.1).
    assert forward_proxy.carried("CONNECT", target) == 1
    assert tls_upstream.count() == 2


async def test_https_upstream_with_a_certificate_for_another_name_is_refused(
    *,
    start_gateway: StartGateway,
    forward_proxy: ForwardProxy,
    issuer: TokenIssuer,
    ca: trustme.CA,
    ca_file: Path,
) -> None:
    """Through the tunnel, a certificate not naming the upstream is a 502, never trusted."""
    server = Upstream(issuer, SubscriptionKeyPair(CANARY_PRIMARY, CANARY_SECONDARY))
    runner = await start_app(server.app(), upstream_context(ca, "someone-else.example"))
    try:
        gw = await start_gateway(
            {
                **NO_PROXY_VARIABLES,
                "CIGW_EGRESS_PROXY": forward_proxy.url(),
                "CIGW_UPSTREAM_URL": f"{base_url(runner, 'https')}/v1",
                "CIGW_UPSTREAM_CA_FILE": str(ca_file),
            }
        )
        status, body = await get(gw)
    finally:
        await runner.cleanup()
    assert status == 502
    error = body["error"]
    assert isinstance(error, dict)
    assert error["code"] == "upstream_unreachable"
    assert "certificate is not trusted" in error["message"]
    assert server.seen == []


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_authenticating_proxy_gets_the_credentials(
    *,
    start_gateway: StartGateway,
    auth_proxy: ForwardProxy,
    issuer: TokenIssuer,
    upstream: Upstream,
    tls_upstream: Upstream,
    ca_file: Path,
    log_output: object,
    scheme: str,
) -> None:
    """Credentials in the proxy URL go as Proxy-Authorization (CONNECT and absolute-form)."""
    target = tls_upstream if scheme == "https" else upstream
    gw = await start_gateway(
        {
            **NO_PROXY_VARIABLES,
            "CIGW_EGRESS_PROXY": auth_proxy.url(),
            "CIGW_UPSTREAM_URL": f"{target.base_url}/v1",
            "CIGW_UPSTREAM_CA_FILE": str(ca_file),
        }
    )
    status, body = await get(gw)
    assert status == 200
    assert target.count() == 1
    # MSAL's token requests went through the same authenticating proxy.
    assert auth_proxy.carried("CONNECT", f"127.0.0.1:{port_of(issuer.base_url)}") >= 1
    # The proxy's credentials are for the proxy: the upstream never sees them.
    headers = {name.lower() for name, _ in body["headers"]}  # type: ignore[attr-defined]
    assert "proxy-authorization" not in headers
    assert PROXY_PASSWORD not in log_output.getvalue()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("scheme", "password", "refusal"),
    [
        pytest.param("https", None, "407 Proxy Authentication Required", id="connect-none"),
        pytest.param("http", None, "407 Proxy Authentication Required", id="absolute-none"),
        # tinyproxy 1.11 answers wrong credentials with 401, not 407: CONNECT names it.
        pytest.param("https", "not-the-password", "401 Unauthorized", id="connect-wrong"),
    ],
)
async def test_a_refusing_proxy_gives_502_naming_its_status(
    *,
    start_gateway: StartGateway,
    auth_proxy: ForwardProxy,
    issuer: TokenIssuer,
    upstream: Upstream,
    tls_upstream: Upstream,
    ca_file: Path,
    scheme: str,
    password: str | None,
    refusal: str,
) -> None:
    """A proxy refusing the credentials: 502 upstream_unreachable naming the proxy's status."""
    target = tls_upstream if scheme == "https" else upstream
    url = auth_proxy.url((PROXY_USER, password)) if password else f"http://{auth_proxy.address}"
    gw = await start_gateway(
        {
            **NO_PROXY_VARIABLES,
            "HTTPS_PROXY": url,
            "HTTP_PROXY": url,
            "NO_PROXY": f"127.0.0.1:{port_of(issuer.base_url)}",  # the token comes direct
            "CIGW_UPSTREAM_URL": f"{target.base_url}/v1",
            "CIGW_UPSTREAM_CA_FILE": str(ca_file),
            "CIGW_RETRY_ATTEMPTS": "0",
        }
    )
    status, body = await get(gw)
    assert status == 502
    error = body["error"]
    assert isinstance(error, dict)
    assert error["code"] == "upstream_unreachable"
    assert f"egress proxy {auth_proxy.address} refused" in error["message"]
    assert error["message"].endswith(refusal)
    assert target.seen == []


async def test_token_endpoint_through_a_refusing_proxy_names_the_proxy(
    start_gateway: StartGateway, auth_proxy: ForwardProxy, issuer: TokenIssuer
) -> None:
    """MSAL through a proxy refusing its credentials: the problem names the proxy and status."""
    gw = await start_gateway(
        {**NO_PROXY_VARIABLES, "HTTPS_PROXY": auth_proxy.url((PROXY_USER, "wrong-password"))},
        ready=False,
    )
    async with asyncio.timeout(10):
        while gw.gateway.tokens.problem is None:  # noqa: ASYNC110 - set by the renewal task
            await asyncio.sleep(0.02)
    problem = gw.gateway.tokens.problem
    assert f"egress proxy {auth_proxy.address} refused the tunnel: 401" in problem
    assert issuer.token_calls == 0
    assert auth_proxy.carried("CONNECT", f"127.0.0.1:{port_of(issuer.base_url)}") >= 1


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_unreachable_proxy_is_named_not_the_upstream(
    *,
    start_gateway: StartGateway,
    issuer: TokenIssuer,
    upstream: Upstream,
    tls_upstream: Upstream,
    ca_file: Path,
    closed_port: int,
    scheme: str,
) -> None:
    """A proxy nobody listens on: 502 naming the proxy's address, not the upstream's."""
    target = tls_upstream if scheme == "https" else upstream
    dead = f"http://127.0.0.1:{closed_port}"
    gw = await start_gateway(
        {
            **NO_PROXY_VARIABLES,
            "ALL_PROXY": dead,
            "NO_PROXY": f"127.0.0.1:{port_of(issuer.base_url)}",
            "CIGW_UPSTREAM_URL": f"{target.base_url}/v1",
            "CIGW_UPSTREAM_CA_FILE": str(ca_file),
            "CIGW_RETRY_ATTEMPTS": "0",
        }
    )
    status, body = await get(gw)
    assert status == 502
    error = body["error"]
    assert isinstance(error, dict)
    assert error["message"] == (
        f"cannot connect to the egress proxy 127.0.0.1:{closed_port} (Connection refused)"
    )
    assert str(port_of(target.base_url)) not in error["message"]


async def test_a_remote_proxy_never_carries_loopback_destinations(
    start_gateway: StartGateway, forward_proxy: ForwardProxy, upstream: Upstream
) -> None:
    """A proxy on another host (TEST-NET, unreachable) is not used for loopback destinations."""
    remote = "http://192.0.2.1:3128"
    gw = await start_gateway({**NO_PROXY_VARIABLES, "HTTPS_PROXY": remote, "HTTP_PROXY": remote})
    assert (await get(gw))[0] == 200
    assert upstream.count() == 1


async def test_a_bad_proxy_variable_stops_the_cli_with_exit_2(gateway_env: dict[str, str]) -> None:
    """check-config and serve with an unusable proxy URL: exit 2, the variable named, no secret."""
    env = {**gateway_env, "HTTPS_PROXY": f"socks5://{PROXY_USER}:{PROXY_PASSWORD}@proxy:1080"}
    for command in ("check-config", "serve"):
        code, out, err = await run_cli(env, command)
        assert code == 2
        assert "HTTPS_PROXY names a socks5 proxy" in err
        assert "Traceback" not in err
        assert PROXY_PASSWORD not in out + err


async def test_check_config_states_each_destinations_egress(
    gateway_env: dict[str, str], issuer: TokenIssuer
) -> None:
    """check-config prints one egress decision per destination, the proxy's credentials hidden."""
    env = {
        **gateway_env,
        "HTTPS_PROXY": f"http://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:3128",
        "no_proxy": "127.0.0.1:1",
    }
    code, out, _ = await run_cli(env, "check-config")
    assert code == 0
    shown = dict(line.strip().split("  ", 1) for line in out.splitlines()[1:])
    assert shown["egress: token endpoint"].strip() == "proxy 127.0.0.1:3128 (from HTTPS_PROXY)"
    assert shown["egress: upstream"].strip() == "direct (no proxy configured)"
    assert "http://(credentials redacted)@127.0.0.1:3128" in out
    assert PROXY_PASSWORD not in out
    assert PROXY_USER not in out
