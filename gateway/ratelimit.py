"""Protecting the shared APIM key: token buckets, the upstream hold, and the retry budget.

Every piece takes an injected monotonic clock so tests move time instead of sleeping.
The buckets sit behind the small `Limiter` protocol: a fleet of sidecars shares one APIM
key, and a shared (Redis-backed) limiter can later stand beside the in-process one.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from cachetools import TTLCache

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request may not go upstream now, and the headers that tell the caller."""

    scope: str  # "global", "caller", "route" (a route's own budget) or "upstream"
    retry_after: float
    quota: int = 0
    window: float = 1.0

    def message(self) -> str:
        """What the caller is told."""
        if self.scope == "upstream":
            return "the upstream asked for a pause; retry later"
        return f"{self.scope} rate limit exceeded; retry later"

    def headers(self) -> dict[str, str]:
        """Retry-After in whole seconds (rounded up) plus IETF RateLimit headers."""
        seconds = max(1, math.ceil(self.retry_after))
        headers = {"Retry-After": str(seconds)}
        if self.quota:
            # draft-ietf-httpapi-ratelimit-headers: structured-field policy and state.
            headers["RateLimit-Policy"] = (
                f'"{self.scope}";q={self.quota};w={math.ceil(self.window)}'
            )
            headers["RateLimit"] = f'"{self.scope}";r=0;t={seconds}'
        return headers


class TokenBucket:
    """Classic token bucket: `burst` at once, then `rate` per second."""

    __slots__ = ("_clock", "_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: int, clock: Clock, tokens: float | None = None) -> None:
        self.rate, self.burst, self._clock = rate, burst, clock
        self._tokens = float(burst if tokens is None else tokens)
        self._last = clock()

    def take(self) -> float:
        """Take one token: 0.0 when granted, else the seconds until one is available."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate


class Bucket(Protocol):
    """What a limiter takes tokens from: a TokenBucket here, a fleet budget in Redis."""

    burst: int

    def take(self) -> float:
        """0.0 when a token was taken, else the seconds until one is likely."""


# (name, rate per second, burst) → a bucket. Names: "global", "caller:<caller>"; further
# scopes (routes) choose their own prefix. Fleet mode (gateway/fleet.py) shares by name.
BucketFactory = Callable[[str, float, int], Bucket]


class Limiter(Protocol):
    """Decides whether one request may proceed; None means yes."""

    def check(self, caller: str | None) -> Refusal | None:
        """Spend capacity for one request from `caller` (None: no caller header)."""


class LocalLimiter:
    """In-process buckets: one global, and one per caller in a bounded TTL cache."""

    def __init__(
        self,
        *,
        rps: float,
        burst: int,
        caller_rps: float = 0.0,
        caller_burst: int = 0,
        caller_rates: Mapping[str, tuple[float, int]] | None = None,
        max_callers: int = 10_000,
        clock: Clock = time.monotonic,
        scope: str = "global",
        buckets: BucketFactory | None = None,
        name: str | None = None,
    ) -> None:
        # `name` is the shared bucket's name for the factory (default: the scope); fleet mode
        # keys its Redis budget by it, so each route gets its own fleet budget.
        self._buckets: BucketFactory = buckets or (
            lambda _name, rate, size: TokenBucket(rate, size, clock)
        )
        self._global = self._buckets(name or scope, rps, burst) if rps > 0 else None
        self._scope = scope  # what a refusal by the shared bucket is counted and shown as
        self._caller_rps, self._caller_burst, self._clock = caller_rps, caller_burst, clock
        # Rates for particular callers ("ns/sa" or "ns/*"), over the default per-caller rate.
        self._caller_rates = dict(caller_rates or {})
        # An idle bucket is full again after burst/rate seconds, so expiring it then loses
        # nothing; maxsize bounds memory against a flood of distinct caller names.
        ttl = max(
            [1.0]
            + [burst / rate for rate, burst in self._caller_rates.values()]
            + ([caller_burst / caller_rps] if caller_rps > 0 else [])
        )
        self._callers: TTLCache[str, Bucket] = TTLCache(max_callers, ttl, timer=clock)

    @property
    def active(self) -> bool:
        """False when no limit is configured, so the request path can skip the check."""
        return self._global is not None or self._caller_rps > 0 or bool(self._caller_rates)

    def caller_buckets(self) -> int:
        """How many per-caller buckets are held now."""
        self._callers.expire()
        return len(self._callers)

    def check(self, caller: str | None) -> Refusal | None:
        """Per-caller bucket first, so one noisy caller does not drain the global bucket."""
        if caller is not None and (self._caller_rps > 0 or self._caller_rates):
            bucket = self._callers.get(caller)
            if bucket is None:
                bucket = self._new_bucket(caller)
            if bucket is not None:
                self._callers[caller] = bucket  # re-inserting refreshes the TTL
                wait = bucket.take()
                if wait:
                    return Refusal("caller", wait, bucket.burst)
        if self._global is not None:
            wait = self._global.take()
            if wait:
                return Refusal(self._scope, wait, self._global.burst)
        return None

    def _new_bucket(self, caller: str) -> Bucket | None:
        """The caller's own rate, its namespace's (`ns/*`), else the default; None: no limit."""
        rate = self._caller_rates.get(caller)
        if rate is None and "/" in caller:
            rate = self._caller_rates.get(caller.partition("/")[0] + "/*")
        if rate is None:
            if self._caller_rps <= 0:
                return None
            rate = (self._caller_rps, self._caller_burst)
        return self._buckets(f"caller:{caller}", rate[0], rate[1])


class UpstreamHold:
    """After APIM says 429 (or 403 with Retry-After), nobody calls it until the time is up.

    In fleet mode (gateway/fleet.py) `announce` tells the other gateways about a hold this
    one met, `adopt` takes one they met, and `jitter` spreads the moment each resumes.
    """

    def __init__(self, clock: Clock = time.monotonic, max_hold: float = 300.0) -> None:
        self._clock = clock
        self._until = 0.0
        self._max_hold = max_hold
        self.announce: Callable[[float], None] | None = None
        self.jitter: Callable[[float], float] | None = None

    def hold(self, seconds: float) -> None:
        """Extend the hold to `seconds` from now (capped; never shortened)."""
        seconds = min(seconds, self._max_hold)
        if self._extend(seconds) and self.announce is not None:
            self.announce(seconds)

    def adopt(self, seconds: float) -> bool:
        """Extend the hold to one another gateway met, without announcing it again."""
        return self._extend(min(seconds, self._max_hold))

    def _extend(self, seconds: float) -> bool:
        until = self._clock() + seconds
        if until <= self._until:
            return False
        if self.jitter is not None:
            until += self.jitter(seconds)
        self._until = until
        return True

    def remaining(self) -> float:
        """Seconds left in the hold, 0.0 when none."""
        return max(0.0, self._until - self._clock())

    def check(self) -> Refusal | None:
        """A refusal while the hold lasts."""
        if not self._until:
            return None  # no hold since the last one ended: no clock reading needed
        left = self.remaining()
        if left > 0:
            return Refusal("upstream", left)
        self._until = 0.0
        return None


class RetryBudget:
    """Retries may be at most `ratio` of recent requests (Envoy's default budget: 20%).

    Counts live in one-second buckets over `window` seconds; `min_retries` lets a quiet
    gateway still retry a lone failure.
    """

    def __init__(
        self,
        *,
        ratio: float = 0.2,
        window: int = 10,
        min_retries: int = 3,
        clock: Clock = time.monotonic,
    ) -> None:
        self._ratio, self._window, self._min, self._clock = ratio, window, min_retries, clock
        self._requests = [0] * window
        self._retries = [0] * window
        self._second = int(clock())

    def record_request(self) -> None:
        """Count one original (non-retry) request."""
        self._requests[self._advance()] += 1

    def try_spend(self) -> bool:
        """Count one retry if the budget allows it."""
        slot = self._advance()
        allowed = max(self._min, self._ratio * sum(self._requests))
        if sum(self._retries) + 1 > allowed:
            return False
        self._retries[slot] += 1
        return True

    def _advance(self) -> int:
        second = int(self._clock())
        if second != self._second:
            for step in range(1, min(second - self._second, self._window) + 1):
                stale = (self._second + step) % self._window
                self._requests[stale] = self._retries[stale] = 0
            self._second = second
        return second % self._window


class ExchangeSlots:
    """At most `limit` upstream exchanges at once; past that, requests wait their turn.

    asyncio.Semaphore did this, at a coroutine call, a scan of its waiters and a wake-up
    pass per request; here a free slot is one decrement, and the waiting machinery runs
    only when every slot is taken (tests/perf/README.md).
    """

    __slots__ = ("_free", "_waiters")

    def __init__(self, limit: int) -> None:
        self._free = limit
        # Waiters exist only while no slot is free: a freed slot goes to the first of them.
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def free(self) -> int:
        """Slots nobody holds."""
        return self._free

    def try_take(self) -> bool:
        """Take a slot if one is free at once."""
        if self._free:
            self._free -= 1
            return True
        return False

    async def take(self, wait: float) -> bool:
        """Take a slot, waiting at most `wait` seconds in line; False when none came."""
        if self.try_take():
            return True
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(wait):
                await waiter
        except TimeoutError:
            return self._leave_line(waiter)
        except BaseException:
            self._leave_line(waiter)
            raise
        return True

    def _leave_line(self, waiter: asyncio.Future[None]) -> bool:
        if waiter.done() and not waiter.cancelled():
            self.give_back()  # handed a slot just as the wait ended: it goes to the next
        else:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
        return False

    def give_back(self) -> None:
        """Free a slot: the first live waiter gets it, else it becomes free."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1
