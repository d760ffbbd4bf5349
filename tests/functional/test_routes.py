"""Several APIs behind one gateway: YAML routes, each with its own upstream, scope and keys."""

from __future__ import annotations

import asyncio
import json
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml

from gateway.sandbox.issuer import TokenIssuer
from tests.conftest import (
    CANARY_PRIMARY,
    CANARY_SECONDARY,
    RunningGateway,
    StartGateway,
    base_url,
    serving_upstream,
    start_app,
)
from tests.servers.upstream import Upstream

CI_SCOPE = "https://api.ci.ai.microsoft.com/.default"
SINGLE_ROUTE = {
    "CIGW_UPSTREAM_URL": None,
    "CIGW_SCOPE": None,
    "CIGW_SUBSCRIPTION_KEY": None,
    "CIGW_SUBSCRIPTION_KEY_SECONDARY": None,
}
StartRoutes = Callable[..., Awaitable[RunningGateway]]


@pytest.fixture
async def dataverse(issuer: TokenIssuer) -> AsyncIterator[Upstream]:
    """A second upstream that wants only a bearer token (no APIM key), as Dataverse does."""
    async with serving_upstream(Upstream(issuer, require_key=False)) as server:
        yield server


def dataverse_scope(dataverse: Upstream) -> str:
    """The scope of a Dataverse organization: its own URL + /.default."""
    return f"{dataverse.base_url}/.default"


@pytest.fixture
def start_routes(
    start_gateway: StartGateway, upstream: Upstream, dataverse: Upstream, tmp_path: Path
) -> StartRoutes:
    """Factory: a gateway with /ci/ → the APIM-like upstream and /dataverse/ → the other."""

    async def start(
        extra: list[dict[str, Any]] | None = None,
        ci: dict[str, Any] | None = None,
        dv: dict[str, Any] | None = None,
        ready: bool = True,
    ) -> RunningGateway:
        routes = [
            {
                "prefix": "/ci/",
                "upstream_url": f"{upstream.base_url}/v1",
                "scope": CI_SCOPE,
                "subscription_key": CANARY_PRIMARY,
                **(ci or {}),
            },
            {
                "prefix": "/dataverse/",
                "upstream_url": f"{dataverse.base_url}/v1",
                "scope": dataverse_scope(dataverse),
                **(dv or {}),
            },
            *(extra or []),
        ]
        path = tmp_path / "routes.yaml"
        path.write_text(yaml.safe_dump({"routes": routes}))
        return await start_gateway({**SINGLE_ROUTE, "CIGW_CONFIG": str(path)}, ready=ready)

    return start


def audience(seen_authorization: list[str]) -> str:
    """The `aud` claim of the bearer token an upstream received."""
    (value,) = seen_authorization
    claims = jwt.decode(value.removeprefix("Bearer "), options={"verify_signature": False})
    return str(claims["aud"])


async def get(gw: RunningGateway, path: str, **kwargs: Any) -> tuple[int, bytes]:
    """Status and body of GET `path` through the gateway."""
    async with gw.session.get(gw.url(path), **kwargs) as response:
        return response.status, await response.read()


async def test_both_apis_at_once_with_their_own_scope_and_key(
    start_routes: StartRoutes, upstream: Upstream, dataverse: Upstream, issuer: TokenIssuer
) -> None:
    """Each prefix reaches its upstream, prefix removed, with its scope's token; key only on CI."""
    gw = await start_routes()
    results = await asyncio.gather(
        get(gw, "/ci/echo/profiles?$top=1"), get(gw, "/dataverse/echo/accounts?$top=2")
    )
    assert [status for status, _ in results] == [200, 200]
    (ci_seen,) = upstream.seen
    (dv_seen,) = dataverse.seen
    assert ci_seen.raw_path == "/v1/echo/profiles?$top=1"
    assert dv_seen.raw_path == "/v1/echo/accounts?$top=2"
    assert ci_seen.header_values("Ocp-Apim-Subscription-Key") == [CANARY_PRIMARY]
    assert dv_seen.header_values("Ocp-Apim-Subscription-Key") == []
    assert audience(ci_seen.header_values("Authorization")) == "https://api.ci.ai.microsoft.com"
    assert audience(dv_seen.header_values("Authorization")) == dataverse.base_url
    assert issuer.token_calls == 2  # one per scope, by the one app registration


async def test_longest_prefix_wins_and_catch_all_takes_the_rest(
    start_routes: StartRoutes, upstream: Upstream, dataverse: Upstream
) -> None:
    """/ci/special/ beats /ci/; / takes any other path; /ci without its slash is /ci/'s root."""
    gw = await start_routes(
        extra=[
            {
                "prefix": "/ci/special",
                "upstream_url": f"{dataverse.base_url}/v1/echo/special",
                "scope": dataverse_scope(dataverse),
            },
            {
                "prefix": "/",
                "upstream_url": f"{dataverse.base_url}/v1/echo/rest",
                "scope": dataverse_scope(dataverse),
            },
        ]
    )
    for path in ("/ci/special/x", "/ci/specialty", "/other/y?z=1", "/ci?q=1"):
        assert (await get(gw, path))[0] == 200
    assert [s.raw_path for s in dataverse.seen] == [
        "/v1/echo/special/x",
        "/v1/echo/rest/other/y?z=1",
    ]
    assert [s.raw_path for s in upstream.seen] == ["/v1/specialty", "/v1/?q=1"]


async def test_unrouted_path_is_404_naming_nothing(
    start_routes: StartRoutes, upstream: Upstream, dataverse: Upstream
) -> None:
    """A path under no prefix gets 404 no_route without a word about the configuration."""
    gw = await start_routes()
    status, body = await get(gw, "/dataversex/echo")
    assert status == 404
    error = json.loads(body)["error"]
    assert error["code"] == "no_route"
    assert "/ci" not in error["message"]
    assert "dataverse" not in error["message"]
    assert not upstream.seen
    assert not dataverse.seen


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("/dataverse/../ci/echo/x", id="dot-segments"),
        pytest.param("/dataverse/%2e%2e/ci/echo/x", id="encoded-dots"),
        pytest.param("/ci/..%2f..%2fdataverse/echo", id="encoded-slash"),
    ],
)
async def test_path_cannot_climb_out_of_its_route(
    start_routes: StartRoutes, upstream: Upstream, dataverse: Upstream, path: str
) -> None:
    """The path guards apply per route: nothing climbs above a route's base into another."""
    gw = await start_routes()
    assert (await get(gw, path))[0] == 400
    assert not upstream.seen
    assert not dataverse.seen


async def test_a_429_holds_only_its_own_route(
    start_routes: StartRoutes, upstream: Upstream, dataverse: Upstream
) -> None:
    """Dataverse's 429 holds the Dataverse route; the CI route keeps forwarding."""
    gw = await start_routes()
    dataverse.fail_next, dataverse.retry_after = [429], "30"
    assert (await get(gw, "/dataverse/echo/a"))[0] == 429
    assert (await get(gw, "/dataverse/echo/b"))[0] == 429  # held: never sent
    assert (await get(gw, "/ci/echo/c"))[0] == 200
    assert len(dataverse.seen) == 1
    assert len(upstream.seen) == 1


async def test_route_rate_limit_is_its_own_budget(
    start_routes: StartRoutes, upstream: Upstream, dataverse: Upstream
) -> None:
    """A route's rate_limit_rps refuses its own excess (scope "route") and no other route's."""
    gw = await start_routes(dv={"rate_limit_rps": 0.01, "rate_limit_burst": 1})
    assert (await get(gw, "/dataverse/echo/a"))[0] == 200
    async with gw.session.get(gw.url("/dataverse/echo/b")) as refused:
        assert refused.status == 429
        assert "Retry-After" in refused.headers
    for _ in range(3):
        assert (await get(gw, "/ci/echo/c"))[0] == 200
    assert len(dataverse.seen) == 1
    assert (
        'cigw_rate_limited_total{route="/dataverse/",scope="route"} 1.0' in await gw.metrics_text()
    )


async def test_strip_headers_applies_to_its_route_only(
    start_routes: StartRoutes, upstream: Upstream, dataverse: Upstream
) -> None:
    """Headers named in a route's strip_headers never reach that route's upstream."""
    # Not Dataverse's privileged headers: those are stripped on every route (issue 13).
    gw = await start_routes(dv={"strip_headers": ["X-Tenant-Hint", "X-Debug"]})
    headers = {"X-Tenant-Hint": "someone-else", "X-Debug": "x", "X-Keep": "1"}
    assert (await get(gw, "/dataverse/echo/a", headers=headers))[0] == 200
    assert (await get(gw, "/ci/echo/a", headers=headers))[0] == 200
    (dv_seen,) = dataverse.seen
    assert dv_seen.header_values("X-Tenant-Hint") == []
    assert dv_seen.header_values("X-Debug") == []
    assert dv_seen.header_values("X-Keep") == ["1"]
    assert upstream.seen[0].header_values("X-Tenant-Hint") == ["someone-else"]


async def test_readyz_names_the_route_without_a_token(
    start_routes: StartRoutes, upstream: Upstream
) -> None:
    """/readyz is 503 while one route has no token, and says which route it is."""
    gw = await start_routes(dv={"scope": "api://not-a-default-scope"}, ready=False)
    for _ in range(200):
        async with gw.session.get(gw.admin("/readyz")) as response:
            reason = (await response.json()).get("reason", "")
            if "invalid_scope" in reason:
                break
        await asyncio.sleep(0.02)
    assert response.status == 503
    assert reason.startswith("route /dataverse/: no valid token")
    assert "/ci/" not in reason
    assert (await get(gw, "/ci/echo/x"))[0] == 200
    assert (await get(gw, "/dataverse/echo/x"))[0] == 503


async def test_metrics_carry_the_route_label(
    start_routes: StartRoutes, upstream: Upstream, dataverse: Upstream
) -> None:
    """Requests, upstream latency and the hold are counted per route; unrouted as "none"."""
    gw = await start_routes()
    dataverse.fail_next, dataverse.retry_after = [429], "30"
    for path in ("/ci/echo/a", "/ci/echo/b", "/dataverse/echo/c", "/nowhere"):
        await get(gw, path)
    text = await gw.metrics_text()
    assert 'cigw_requests_total{code="200",method="GET",route="/ci/"} 2.0' in text
    assert 'cigw_requests_total{code="429",method="GET",route="/dataverse/"} 1.0' in text
    assert 'cigw_requests_total{code="404",method="GET",route="none"} 1.0' in text
    assert 'cigw_upstream_duration_seconds_count{route="/ci/"} 2.0' in text
    assert 'cigw_upstream_hold_seconds{route="/ci/"} 0.0' in text
    hold = re.search(r'^cigw_upstream_hold_seconds\{route="/dataverse/"\} (\S+)$', text, re.M)
    assert hold is not None
    assert 25 < float(hold.group(1)) <= 30


async def test_each_route_trusts_its_own_upstream_ca(
    start_gateway: StartGateway,
    issuer: TokenIssuer,
    server_ssl: ssl.SSLContext,
    ca_file: Path,
    tmp_path: Path,
) -> None:
    """upstream_ca_file applies to its route only: the route without it refuses the test CA."""
    tls_upstream = Upstream(issuer, require_key=False)
    runner = await start_app(tls_upstream.app(), server_ssl)
    try:
        origin = base_url(runner, "https")
        routes = [
            {
                "prefix": "/trusted/",
                "upstream_url": f"{origin}/v1",
                "scope": CI_SCOPE,
                "upstream_ca_file": str(ca_file),
            },
            {"prefix": "/untrusted/", "upstream_url": f"{origin}/v1", "scope": CI_SCOPE},
        ]
        path = tmp_path / "routes.yaml"
        path.write_text(yaml.safe_dump({"routes": routes}))
        gw = await start_gateway({**SINGLE_ROUTE, "CIGW_CONFIG": str(path)})
        assert (await get(gw, "/trusted/echo/x"))[0] == 200
        assert (await get(gw, "/untrusted/echo/x"))[0] == 502
        assert [seen.raw_path for seen in tls_upstream.seen] == ["/v1/echo/x"]
    finally:
        await runner.cleanup()


async def test_key_fallback_is_per_route(
    start_routes: StartRoutes, upstream: Upstream, dataverse: Upstream
) -> None:
    """A route whose primary key APIM refuses falls back to its secondary; another route that
    sends its own primary to the same APIM keeps sending it."""
    gw = await start_routes(
        ci={
            "subscription_key": "revoked0key0000000000000000000",
            "subscription_key_secondary": CANARY_SECONDARY,
        },
        extra=[
            {
                "prefix": "/ci2/",
                "upstream_url": f"{upstream.base_url}/v1",
                "scope": CI_SCOPE,
                "subscription_key": CANARY_PRIMARY,
                "subscription_key_secondary": CANARY_SECONDARY,
            }
        ],
    )
    assert (await get(gw, "/ci/echo/a"))[0] == 200
    assert (await get(gw, "/ci2/echo/b"))[0] == 200
    assert (await get(gw, "/ci/echo/c"))[0] == 200
    # APIM refused the revoked key before the upstream saw the request: not in `seen`.
    sent = [
        (seen.raw_path, seen.header_values("Ocp-Apim-Subscription-Key")) for seen in upstream.seen
    ]
    assert sent == [
        ("/v1/echo/a", [CANARY_SECONDARY]),
        ("/v1/echo/b", [CANARY_PRIMARY]),
        ("/v1/echo/c", [CANARY_SECONDARY]),
    ]
    text = await gw.metrics_text()
    assert 'cigw_subscription_key_fallbacks_total{route="/ci/"} 1.0' in text
    assert 'cigw_subscription_key_fallbacks_total{route="/ci2/"} 0.0' in text
