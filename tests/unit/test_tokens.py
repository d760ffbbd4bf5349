"""TokenManager: single flight, renewal ahead of expiry, real-expiry grace, backoff."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
from prometheus_client import CollectorRegistry

from gateway.errors import TokenUnavailable
from gateway.metrics import Metrics
from gateway.tokens import AccessToken, TokenAcquisitionError, TokenManager
from tests.clock import FakeClock, settle


class ScriptedAcquirer:
    """Stands in for the token endpoint: each call takes the next outcome from a script."""

    def __init__(self, clock: FakeClock, lifetime: float = 3600.0) -> None:
        self.clock, self.lifetime = clock, lifetime
        self.calls = 0
        self.failing: str | None = None
        self.retry_after: float | None = None

    def __call__(self) -> AccessToken:
        self.calls += 1
        if self.failing:
            raise TokenAcquisitionError(self.failing, self.retry_after)
        now = self.clock()
        return AccessToken(f"token-{self.calls}", now + self.lifetime, now)

    def close(self) -> None:
        """Nothing to release."""


async def _inline(function: Callable[[], AccessToken]) -> AccessToken:
    await asyncio.sleep(0)
    return function()


@pytest.fixture
def clock() -> FakeClock:
    """Fake time."""
    return FakeClock()


@pytest.fixture
def acquirer(clock: FakeClock) -> ScriptedAcquirer:
    """A healthy token endpoint with one-hour tokens."""
    return ScriptedAcquirer(clock)


@pytest.fixture
def metrics() -> Metrics:
    """Metrics on a fresh registry."""
    return Metrics(CollectorRegistry())


@pytest.fixture
async def manager(
    clock: FakeClock, acquirer: ScriptedAcquirer, metrics: Metrics
) -> AsyncIterator[TokenManager]:
    """A TokenManager on fake time whose renewal loop runs for the test."""
    tokens = TokenManager(
        acquirer, metrics, clock=clock, sleep=clock.sleep, rng=lambda: 1.0, offload=_inline
    )
    task = asyncio.ensure_future(tokens.run())
    await settle()
    yield tokens
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def _sample(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    value = metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


async def test_first_token_is_acquired_at_start(
    manager: TokenManager, acquirer: ScriptedAcquirer, metrics: Metrics, clock: FakeClock
) -> None:
    """The renewal loop fetches a token immediately and publishes its real expiry."""
    assert acquirer.calls == 1
    assert manager.valid
    assert await manager.token() == "token-1"
    assert _sample(metrics, "cigw_token_expiry_timestamp_seconds") == clock() + 3600
    assert _sample(metrics, "cigw_token_requests_total", {"outcome": "success"}) == 1


async def test_renews_at_half_life_without_requests_waiting(
    manager: TokenManager, acquirer: ScriptedAcquirer, clock: FakeClock
) -> None:
    """A one-hour token is renewed after 30 minutes, long before MSAL's 5-minute margin."""
    await clock.advance(1799)
    assert acquirer.calls == 1
    await clock.advance(2)
    assert acquirer.calls == 2
    assert await manager.token() == "token-2"


async def test_failed_renewal_keeps_token_until_real_expiry(
    manager: TokenManager, acquirer: ScriptedAcquirer, clock: FakeClock, metrics: Metrics
) -> None:
    """During an outage the cached token serves until its real expiry, then 503 with the cause."""
    acquirer.failing = "token endpoint refused: temporarily_unavailable (AADSTS50000: down)"
    await clock.advance(3599)  # inside MSAL's 5-minute margin: still served
    assert await manager.token() == "token-1"
    assert _sample(metrics, "cigw_token_renewal_failures_total") >= 1
    await clock.advance(2)
    assert not manager.valid
    with pytest.raises(TokenUnavailable, match="AADSTS50000"):
        await manager.token()


async def test_backoff_doubles_and_recovers(
    manager: TokenManager, acquirer: ScriptedAcquirer, clock: FakeClock
) -> None:
    """Failures are retried at 1, 2, 4 … seconds (capped), and success resets everything."""
    acquirer.failing = "down"
    await clock.advance(1800)  # renewal attempt fails
    calls = acquirer.calls
    await clock.advance(1.0)
    assert acquirer.calls == calls + 1
    await clock.advance(1.9)
    assert acquirer.calls == calls + 1  # the second wait is 2 s
    await clock.advance(0.1)
    assert acquirer.calls == calls + 2
    acquirer.failing = None
    await clock.advance(4.0)
    assert acquirer.calls == calls + 3
    assert manager.problem is None
    assert manager.valid


async def test_retry_after_from_the_endpoint_is_respected(
    manager: TokenManager, acquirer: ScriptedAcquirer, clock: FakeClock
) -> None:
    """A Retry-After hint longer than the backoff step delays the next attempt that long."""
    acquirer.failing, acquirer.retry_after = "throttled", 30.0
    await clock.advance(1800)
    calls = acquirer.calls
    await clock.advance(29)
    assert acquirer.calls == calls
    await clock.advance(1.5)
    assert acquirer.calls == calls + 1


async def test_cold_start_is_single_flight(
    clock: FakeClock, acquirer: ScriptedAcquirer, metrics: Metrics
) -> None:
    """Many requests arriving before the first token cause exactly one acquisition."""
    release = asyncio.Event()

    async def slow(function: Callable[[], AccessToken]) -> AccessToken:
        await release.wait()
        return function()

    tokens = TokenManager(acquirer, metrics, clock=clock, sleep=clock.sleep, offload=slow)
    runner = asyncio.ensure_future(tokens.run())
    await settle()
    waiters = [asyncio.ensure_future(tokens.token()) for _ in range(100)]
    await settle()
    release.set()
    results = await asyncio.gather(*waiters)
    assert set(results) == {"token-1"}
    assert acquirer.calls == 1
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)


async def test_requests_do_not_trigger_acquisitions_during_outage(
    clock: FakeClock, acquirer: ScriptedAcquirer, metrics: Metrics
) -> None:
    """With no token and no acquisition under way, requests fail at once instead of piling on."""
    acquirer.failing = "AADSTS7000215: Invalid client secret provided."
    tokens = TokenManager(acquirer, metrics, clock=clock, sleep=clock.sleep, offload=_inline)
    runner = asyncio.ensure_future(tokens.run())
    await settle()
    calls = acquirer.calls
    results = await asyncio.gather(*(tokens.token() for _ in range(100)), return_exceptions=True)
    assert all(isinstance(result, TokenUnavailable) for result in results)
    assert "AADSTS7000215" in str(results[0])
    assert acquirer.calls == calls
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)


async def test_replace_gets_a_fresh_token_once(
    manager: TokenManager, acquirer: ScriptedAcquirer
) -> None:
    """A token the upstream rejected is replaced; a second rejection soon after is not refetched."""
    fresh = await manager.replace("token-1")
    assert fresh == "token-2"
    assert await manager.replace("token-1") == "token-2"  # someone else already replaced it
    with pytest.raises(TokenUnavailable):
        await manager.replace("token-2")
    assert acquirer.calls == 2
