"""Token buckets, per-caller buckets, the upstream hold and the retry budget, on fake time."""

from __future__ import annotations

import asyncio
import tracemalloc

import pytest

from gateway import config
from gateway.app import worker_limiter
from gateway.ratelimit import (
    ExchangeSlots,
    LocalLimiter,
    Refusal,
    RetryBudget,
    TokenBucket,
    UpstreamHold,
)
from tests.clock import FakeClock


def test_bucket_allows_burst_then_rate() -> None:
    """Exactly BURST requests pass at once, then RPS per second."""
    clock = FakeClock()
    bucket = TokenBucket(rate=5, burst=10, clock=clock)
    assert [bucket.take() for _ in range(10)] == [0.0] * 10
    wait = bucket.take()
    assert wait == pytest.approx(0.2)
    clock.now += 1.0
    granted = sum(1 for _ in range(20) if bucket.take() == 0.0)
    assert granted == 5


def test_bucket_never_stores_more_than_burst() -> None:
    """A long idle period refills only up to BURST."""
    clock = FakeClock()
    bucket = TokenBucket(rate=100, burst=3, clock=clock)
    clock.now += 3600
    assert sum(1 for _ in range(10) if bucket.take() == 0.0) == 3


def test_limiter_off_by_default() -> None:
    """RPS 0 means no limit: the check is skipped entirely."""
    limiter = LocalLimiter(rps=0, burst=0)
    assert not limiter.active
    assert all(limiter.check(None) is None for _ in range(1000))


def test_global_refusal_carries_ratelimit_headers() -> None:
    """Over the limit: Retry-After rounded up to whole seconds, RateLimit-Policy and RateLimit."""
    clock = FakeClock()
    limiter = LocalLimiter(rps=0.5, burst=2, clock=clock)
    assert limiter.check(None) is None
    assert limiter.check(None) is None
    refusal = limiter.check(None)
    assert refusal is not None
    assert refusal.scope == "global"
    headers = refusal.headers()
    assert headers["Retry-After"] == "2"
    assert headers["RateLimit-Policy"] == '"global";q=2;w=1'
    assert headers["RateLimit"] == '"global";r=0;t=2'


def test_retry_after_rounds_up() -> None:
    """A wait of 0.2 s is announced as 1 second, never 0."""
    assert Refusal("global", 0.2, 10).headers()["Retry-After"] == "1"
    assert Refusal("global", 1.01, 10).headers()["Retry-After"] == "2"


def test_caller_buckets_are_independent() -> None:
    """One caller exhausting its bucket does not affect another caller."""
    clock = FakeClock()
    limiter = LocalLimiter(rps=0, burst=0, caller_rps=1, caller_burst=2, clock=clock)
    assert [limiter.check("a") for _ in range(2)] == [None, None]
    refused = limiter.check("a")
    assert refused is not None
    assert refused.scope == "caller"
    assert limiter.check("b") is None
    assert limiter.check(None) is None  # no caller header: only the global bucket applies


def test_caller_buckets_memory_is_bounded() -> None:
    """100 000 distinct caller names keep at most max_callers buckets and bounded memory."""
    clock = FakeClock()
    limiter = LocalLimiter(
        rps=0, burst=0, caller_rps=10, caller_burst=10, max_callers=1000, clock=clock
    )
    tracemalloc.start()
    for index in range(1000):
        limiter.check(f"warmup-{index}")
    baseline, _ = tracemalloc.get_traced_memory()
    for index in range(100_000):
        limiter.check(f"caller-{index}")
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert limiter.caller_buckets() <= 1000
    assert current - baseline < 512 * 1024


def test_idle_caller_buckets_expire() -> None:
    """A bucket idle longer than its refill time is dropped (it would be full anyway)."""
    clock = FakeClock()
    limiter = LocalLimiter(rps=0, burst=0, caller_rps=10, caller_burst=20, clock=clock)
    limiter.check("a")
    assert limiter.caller_buckets() == 1
    clock.now += 2.5
    assert limiter.caller_buckets() == 0


def test_hold_counts_down_and_never_shortens() -> None:
    """The upstream hold lasts as long as asked, and a shorter later hold does not cut it."""
    clock = FakeClock()
    hold = UpstreamHold(clock)
    assert hold.check() is None
    hold.hold(2)
    hold.hold(1)
    refusal = hold.check()
    assert refusal is not None
    assert refusal.scope == "upstream"
    assert refusal.headers()["Retry-After"] == "2"
    clock.now += 1.5
    assert hold.remaining() == pytest.approx(0.5)
    clock.now += 0.5
    assert hold.check() is None


def test_retry_budget_limits_retries_to_a_fifth_of_requests() -> None:
    """With 100 recent requests at most 20 retries are allowed; the window slides."""
    clock = FakeClock()
    budget = RetryBudget(clock=clock)
    for _ in range(100):
        budget.record_request()
    granted = sum(1 for _ in range(100) if budget.try_spend())
    assert granted == 20
    clock.now += 11
    assert sum(1 for _ in range(10) if budget.try_spend()) == 3  # only the floor remains


def test_retry_budget_floor_lets_a_quiet_gateway_retry() -> None:
    """With almost no traffic a few retries are still allowed (min_retries)."""
    budget = RetryBudget(clock=FakeClock(), min_retries=3)
    budget.record_request()
    assert [budget.try_spend() for _ in range(4)] == [True, True, True, False]


def test_workers_share_the_configured_limits() -> None:
    """With CIGW_WORKERS=2 each worker enforces half of every rate and burst."""
    settings = config.load(
        {
            "AZURE_TENANT_ID": "t",
            "AZURE_CLIENT_ID": "c",
            "AZURE_CLIENT_SECRET": "s" * 12,
            "CIGW_WORKERS": "2",
            "CIGW_RATE_LIMIT_RPS": "10",
            "CIGW_RATE_LIMIT_BURST": "5",
        }
    )
    clock = FakeClock()
    limiter = worker_limiter(settings, clock)
    assert [limiter.check(None) is None for _ in range(4)] == [True, True, True, False]
    clock.now += 1.0
    assert sum(1 for _ in range(10) if limiter.check(None) is None) == 3  # 5/s, burst 3


async def test_exchange_slots_are_taken_at_once_until_none_is_free() -> None:
    """Free slots are taken without waiting; the next request must wait."""
    slots = ExchangeSlots(2)
    assert slots.try_take()
    assert await slots.take(wait=0)
    assert slots.free == 0
    assert not slots.try_take()


async def test_a_freed_slot_goes_to_the_first_waiter() -> None:
    """Waiters are served in order, each by a slot given back, never by a slot out of thin air."""
    slots = ExchangeSlots(1)
    assert slots.try_take()
    first = asyncio.ensure_future(slots.take(wait=5))
    second = asyncio.ensure_future(slots.take(wait=5))
    await asyncio.sleep(0)
    slots.give_back()
    assert await first
    assert not second.done()
    assert slots.free == 0
    slots.give_back()
    assert await second
    slots.give_back()
    assert slots.free == 1


async def test_waiting_past_the_limit_gives_up_and_loses_no_slot() -> None:
    """A wait that times out returns False; later the slot count is whole again."""
    slots = ExchangeSlots(1)
    assert slots.try_take()
    assert not await slots.take(wait=0.01)
    slots.give_back()
    assert slots.free == 1


async def test_a_cancelled_waiter_does_not_swallow_a_slot() -> None:
    """A caller that goes away while waiting leaves the line; the slot goes to the next one."""
    slots = ExchangeSlots(1)
    assert slots.try_take()
    leaving = asyncio.ensure_future(slots.take(wait=5))
    staying = asyncio.ensure_future(slots.take(wait=5))
    await asyncio.sleep(0)
    leaving.cancel()
    await asyncio.sleep(0)
    slots.give_back()
    assert await staying
    assert leaving.cancelled()
    slots.give_back()
    assert slots.free == 1


async def test_a_slot_handed_over_as_the_wait_ends_is_passed_on() -> None:
    """Handed a slot and cancelled in the same turn: the slot goes back, none is lost."""
    slots = ExchangeSlots(1)
    assert slots.try_take()
    waiting = asyncio.ensure_future(slots.take(wait=5))
    await asyncio.sleep(0)
    slots.give_back()  # the waiter's future is resolved ...
    waiting.cancel()  # ... and its task cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert slots.free == 1
