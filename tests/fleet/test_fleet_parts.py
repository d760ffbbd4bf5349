"""Fleet pieces against a real redis-server, driven directly: extend-only holds, jitter, callers."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable

import pytest
from prometheus_client import CollectorRegistry

from gateway import config
from gateway.fleet import JITTER, Fleet
from gateway.metrics import FleetMetrics
from gateway.ratelimit import UpstreamHold
from tests.conftest import CLIENT, TENANT
from tests.fleet.conftest import fleet_overrides
from tests.servers.redis import RedisServer

FleetFactory = Callable[[str], Fleet]


@pytest.fixture
async def fleets(redis_session: RedisServer) -> AsyncIterator[FleetFactory]:
    """Factory: a Fleet on the session's Redis for the fleet name given (closed afterwards)."""
    made: list[Fleet] = []

    def make(name: str) -> Fleet:
        env = {
            "AZURE_TENANT_ID": TENANT,
            "AZURE_CLIENT_ID": CLIENT,
            "AZURE_CLIENT_SECRET": "canary-fleet-parts-secret",
            **fleet_overrides(redis_session.url, CIGW_FLEET_NAME=name),
        }
        fleet = Fleet(config.load(env), FleetMetrics(CollectorRegistry()))
        made.append(fleet)
        return fleet

    yield make
    for fleet in made:
        await fleet.close()


async def test_a_hold_in_redis_is_only_ever_extended(
    fleets: FleetFactory, redis_session: RedisServer
) -> None:
    """A shorter hold met later never shortens the one in Redis, and is not announced."""
    first, second = fleets("extend-only"), fleets("extend-only")
    long_hold, short_hold = UpstreamHold(), UpstreamHold()
    first.share_hold("/", long_hold)
    second.share_hold("/", short_hold)  # not listening: it misses the announcement
    long_hold.hold(30)
    key = "cigw:{extend-only}:hold:/"
    for _ in range(100):
        if redis_session.command("EXISTS", key) == "1":
            break
        await asyncio.sleep(0.01)
    short_hold.hold(1)
    await asyncio.sleep(0.2)  # the announcement task ran
    assert int(redis_session.command("PTTL", key)) >= 29_000
    sent = "cigw_fleet_hold_announcements_total", {"direction": "sent"}
    assert second.metrics.registry.get_sample_value(*sent) == 0
    assert first.metrics.registry.get_sample_value(*sent) == 1


async def test_holds_end_at_moments_spread_over_at_most_two_seconds(fleets: FleetFactory) -> None:
    """After a hold, gateways resume with jitter within min(2 s, hold), not all at once."""

    def clock() -> float:
        return 0.0  # frozen: only the jitter moves the ends

    fleet = fleets("jitter")
    ends = []
    for _ in range(200):
        hold = UpstreamHold(clock)
        fleet.share_hold("/", hold)
        hold.adopt(10.0)
        ends.append(hold.remaining())
    assert min(ends) >= 10.0
    assert max(ends) <= 10.0 + JITTER
    assert max(ends) - min(ends) > 1.0  # spread, not a synchronized burst
    short = UpstreamHold(clock)
    fleet.share_hold("/", short)
    short.adopt(0.5)
    assert short.remaining() <= 1.0  # never more jitter than the hold itself


async def test_caller_budgets_are_hashed_and_shared(
    fleets: FleetFactory, redis_session: RedisServer
) -> None:
    """A caller's budget is one fleet budget whose key carries a digest, never the name."""
    first, second = fleets("callers"), fleets("callers")
    await first.beat_once()
    await second.beat_once()
    name = "orders-service"
    budgets = [fleet.bucket(f"caller:{name}", 5.0, 5) for fleet in (first, second)]
    admitted = 0
    for _ in range(40):
        for budget in budgets:
            admitted += budget.take() == 0.0
        await asyncio.sleep(0.01)
    # 0.4 s at 5/s on a bucket of 5, plus at most one burst of credit: far from 2 x 40.
    assert admitted <= 5 + 5 * 1.0 + 5
    keys = redis_session.command("KEYS", "cigw:{callers}:*").split()
    digest = hashlib.sha256(name.encode()).hexdigest()[:24]
    assert f"cigw:{{callers}}:budget:caller:{digest}" in keys
    assert not any(name in key for key in keys)
