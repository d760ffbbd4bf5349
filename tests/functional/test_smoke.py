"""First end-to-end check: a request goes through with both credentials."""

from __future__ import annotations

from tests.conftest import CANARY_PRIMARY, RunningGateway
from tests.servers.upstream import Upstream


async def test_forwards_with_token_and_key(gw: RunningGateway, upstream: Upstream) -> None:
    """GET /instances reaches <base>/v1/echo with the gateway's bearer token and primary key."""
    async with gw.session.get(gw.url("/echo/instances?x=1")) as response:
        assert response.status == 200, await response.text()
        body = await response.json()
    assert body["raw_path"] == "/v1/echo/instances?x=1"
    seen = upstream.seen[-1]
    assert seen.header_values("Ocp-Apim-Subscription-Key") == [CANARY_PRIMARY]
    (auth,) = seen.header_values("Authorization")
    assert upstream.issuer.verify(auth.removeprefix("Bearer "))
