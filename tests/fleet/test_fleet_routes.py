"""Fleet mode with several routes: each route's hold and budget are its own, fleet-wide."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from gateway.sandbox.issuer import TokenIssuer
from tests.conftest import CANARY_PRIMARY, StartGateway, serving_upstream
from tests.fleet.conftest import fleet_overrides
from tests.fleet.test_fleet import hammer
from tests.poll import eventually
from tests.servers.redis import RedisServer
from tests.servers.upstream import Upstream

SINGLE_ROUTE = {
    "CIGW_UPSTREAM_URL": None,
    "CIGW_SCOPE": None,
    "CIGW_SUBSCRIPTION_KEY": None,
    "CIGW_SUBSCRIPTION_KEY_SECONDARY": None,
}


@pytest.fixture
async def second_api(issuer: TokenIssuer) -> AsyncIterator[Upstream]:
    """Another upstream, wanting only a bearer token (as Dataverse does)."""
    async with serving_upstream(Upstream(issuer, require_key=False)) as server:
        yield server


def routes_file(tmp_path: Path, upstream: Upstream, second_api: Upstream) -> Path:
    """/ci/ to the APIM-like upstream; /dv/ to the other, with a route budget of 5 req/s."""
    routes = [
        {
            "prefix": "/ci/",
            "upstream_url": f"{upstream.base_url}/v1",
            "scope": "https://api.ci.ai.microsoft.com/.default",
            "subscription_key": CANARY_PRIMARY,
        },
        {
            "prefix": "/dv/",
            "upstream_url": f"{second_api.base_url}/v1",
            "scope": f"{second_api.base_url}/.default",
            "rate_limit_rps": 5,
            "rate_limit_burst": 5,
        },
    ]
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump({"routes": routes}))
    return path


async def test_a_route_hold_crosses_gateways_and_stays_on_its_route(
    start_gateway: StartGateway,
    redis_session: RedisServer,
    upstream: Upstream,
    second_api: Upstream,
    tmp_path: Path,
) -> None:
    """A 429 on /ci/ at one gateway holds /ci/ at the other; /dv/ keeps flowing."""
    env = {
        **SINGLE_ROUTE,
        **fleet_overrides(redis_session.url),
        "CIGW_CONFIG": str(routes_file(tmp_path, upstream, second_api)),
    }
    met, other = await start_gateway(env), await start_gateway(env)
    upstream.fail_next, upstream.retry_after = [429], "30"
    async with met.session.get(met.url("/ci/x")) as response:
        assert response.status == 429

    async def held() -> bool:
        async with other.session.get(other.url("/ci/x")) as response:
            await response.read()
            return response.status == 429

    await eventually(held, within=5.0, step=0.01)
    async with other.session.get(other.url("/dv/x")) as response:
        assert response.status == 200
    name = env["CIGW_FLEET_NAME"]
    assert int(redis_session.command("PTTL", f"cigw:{{{name}}}:hold:/ci/")) >= 25_000
    assert redis_session.command("EXISTS", f"cigw:{{{name}}}:hold:/dv/") == "0"


async def test_a_route_budget_is_shared_by_the_fleet(
    start_gateway: StartGateway,
    redis_session: RedisServer,
    upstream: Upstream,
    second_api: Upstream,
    tmp_path: Path,
) -> None:
    """A route's rate limit is one fleet budget named after the route, not one per gateway."""
    env = {
        **SINGLE_ROUTE,
        **fleet_overrides(redis_session.url),
        "CIGW_CONFIG": str(routes_file(tmp_path, upstream, second_api)),
    }
    first, second = await start_gateway(env), await start_gateway(env)
    urls = [str(first.url("/dv/a")), str(second.url("/dv/b"))]
    started = time.monotonic()
    statuses = await hammer(first.session, urls, seconds=2.0)
    elapsed = time.monotonic() - started
    assert statuses[200] <= (5 + 5 * elapsed + 5) * 1.1, statuses  # burst, rate, credit
    assert statuses[200] >= 5
    assert second_api.count() == statuses[200]
    name = env["CIGW_FLEET_NAME"]
    assert redis_session.command("EXISTS", f"cigw:{{{name}}}:budget:route:/dv/") == "1"
