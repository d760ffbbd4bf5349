"""Fleet mode: one rate budget and one upstream hold across every gateway sharing a Redis.

Without Redis each gateway (pod or worker process) enforces its own buckets, so 30 pods
admit 30 times the configured rate. Here the budgets live in Redis, but the request path
never waits for it: each gateway leases small batches of a named budget (one Lua script,
Redis `TIME` as the clock) and spends them locally; a refill is asked for in the
background before the lease runs out, one at a time. A hold the upstream asked for is
written to Redis (extend only), announced on pub/sub and carried in every lease and
heartbeat reply. When Redis fails, each gateway enforces `rate / members` with the fleet
size it last saw, until Redis answers again.

Budgets are named (`budget(name, rate, burst)`), so per-route and per-caller budgets plug
in beside the global one: each is a `FleetBudget`, a drop-in for `ratelimit.TokenBucket`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import math
import os
import random
import socket
import ssl
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import redis
import redis.asyncio
import redis.exceptions
from redis.asyncio.connection import Connection, SSLConnection
from redis.backoff import NoBackoff
from redis.credentials import CredentialProvider
from redis.retry import Retry
from yarl import URL

from gateway.config import Settings
from gateway.errors import ConfigError
from gateway.logging import get_logger, redactor
from gateway.metrics import FleetMetrics
from gateway.ratelimit import Clock, TokenBucket, UpstreamHold

log = get_logger("fleet")

LEASE_HORIZON = 0.25  # a lease covers this many seconds of the gateway's recent demand
LEASE_LIFETIME = 0.5  # leased tokens not spent by then go back to the fleet
HEARTBEAT = 2.0  # seconds between membership heartbeats (the issue asks for at most 5)
HEARTBEAT_DOWN = 1.0  # while Redis is down: noticed back within this plus one timeout
MEMBER_TTL = 6.0  # a member missing three heartbeats is no longer counted
FAILURES_TO_FALLBACK = 3  # failed calls in a row before a gateway that had Redis falls back
JITTER = 2.0  # after a hold, each gateway resumes at a random moment within this
POOL_SIZE = 8  # leases, holds and heartbeats in flight at once, plus the pub/sub link

# Both the lease and the heartbeat reply end with the ms left of each shared hold, whose
# keys follow the first key: one piece of Lua, appended to each script.
_HOLDS_LEFT = """
for i = 2, #KEYS do
  local left = redis.call('PTTL', KEYS[i])
  if left < 0 then left = 0 end
  reply[#reply + 1] = left
end
return reply
"""

# KEYS: budget hash, then every shared hold's key. ARGV: rate/s, burst, tokens wanted,
# tokens charged (credit spent, minus unspent leases given back), key lifetime in ms.
# Returns {granted, microseconds until the rest of `wanted` would be there, then the ms
# left of each hold}.
_LEASE = (
    """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local want, charge = tonumber(ARGV[3]), tonumber(ARGV[4])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or burst
local ts = tonumber(state[2]) or now
if now > ts then
  tokens = math.min(burst, tokens + (now - ts) * rate / 1000000)
  ts = now
end
tokens = math.min(burst, tokens - charge)
local granted = 0
if tokens >= 1 then granted = math.min(want, math.floor(tokens)) end
tokens = tokens - granted
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
           'ts', string.format('%.17g', ts))
redis.call('PEXPIRE', KEYS[1], ARGV[5])
local wait = 0
if granted < want then wait = math.ceil((want - granted - tokens) * 1000000 / rate) end
local reply = {granted, wait}
"""
    + _HOLDS_LEFT
)

# KEYS: hold key, announcement channel. ARGV: hold ms, announcement. Extend only.
# The announcement is "<ms> <member> <hold name>".
_HOLD = """
local left = redis.call('PTTL', KEYS[1])
local want = tonumber(ARGV[1])
if left >= want then return 0 end
redis.call('SET', KEYS[1], '1', 'PX', want)
redis.call('PUBLISH', KEYS[2], ARGV[2])
return 1
"""

# KEYS: members sorted set (score: expiry in ms), then every shared hold's key.
# ARGV: member, TTL ms. Returns {members alive, then the ms left of each hold}.
_HEARTBEAT = (
    """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], ttl * 2)
local reply = {redis.call('ZCARD', KEYS[1])}
"""
    + _HOLDS_LEFT
)


class RedisRefused(ConfigError):
    """Redis is reachable but refuses the configured credentials (exit 2 at start)."""


class _PasswordFile(CredentialProvider):
    """CIGW_REDIS_PASSWORD_FILE, read again whenever a connection authenticates."""

    def __init__(self, path: Path, username: str | None) -> None:
        self._path, self._username = path, username

    def _read(self) -> tuple[str] | tuple[str, str]:
        password = self._path.read_text(encoding="utf-8").strip()
        redactor.register(password)  # whatever error text might quote it
        return (self._username, password) if self._username else (password,)

    def get_credentials(self) -> tuple[str] | tuple[str, str]:
        return self._read()

    async def get_credentials_async(self) -> tuple[str] | tuple[str, str]:
        return await asyncio.to_thread(self._read)  # a file read: off the event loop

    def __repr__(self) -> str:
        return "_PasswordFile(redacted)"


class _TLSConnection(SSLConnection):
    """redis-py's TLS connection with one SSLContext built before the loop runs.

    redis-py builds a context (reading the CA file) on each new connection, which is
    blocking file I/O on the event loop.
    """

    def __init__(self, *, tls_context: ssl.SSLContext, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._tls_context = tls_context

    def _connection_arguments(self) -> Any:
        # Connection's (host, port), not SSLConnection's, which would build a context.
        arguments = dict(Connection._connection_arguments(self))
        arguments["ssl"] = self._tls_context
        return arguments


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | redis.exceptions.TimeoutError):
        return "timeout"
    if isinstance(exc, redis.exceptions.AuthenticationError):
        return "auth"
    if isinstance(exc, redis.exceptions.ResponseError):
        # NOAUTH / WRONGPASS arrive as replies to a command, not at connect time.
        text = str(exc)
        return "auth" if text.startswith(("NOAUTH", "WRONGPASS")) else "response"
    return "connection"


def connection_options(settings: Settings) -> dict[str, Any]:
    """The keyword arguments for redis-py's `from_url`, without the URL itself."""
    assert settings.redis_url is not None  # noqa: S101 - only called in fleet mode
    url = URL(settings.redis_url.reveal())
    options: dict[str, Any] = {
        "socket_timeout": settings.redis_timeout,
        "socket_connect_timeout": max(settings.redis_timeout, 0.01),
        # One attempt per call: the next lease or heartbeat is the retry.
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
        # No CLIENT SETINFO on connect: one round trip fewer, and redis-py would look its
        # own version up in the package metadata (file I/O on the event loop) each time.
        "driver_info": None,
    }
    if settings.redis_password_file is not None:
        options["credential_provider"] = _PasswordFile(settings.redis_password_file, url.user)
    if url.scheme == "rediss":
        trust = settings.redis_ca_file or settings.ca_bundle
        options["ssl_ca_certs"] = str(trust) if trust else None
    return options


def _tls_context(settings: Settings) -> ssl.SSLContext:
    trust = settings.redis_ca_file or settings.ca_bundle
    return ssl.create_default_context(cafile=str(trust) if trust else None)


def preflight(settings: Settings) -> bool:
    """At start, before any worker forks: is Redis there, and does it take our password?

    Raises RedisRefused when Redis answers but refuses the credentials (a configuration
    error: exit 2); returns False, after a warning, when it cannot be reached (the
    gateways start in fallback and join the fleet when Redis comes).
    """
    assert settings.redis_url is not None  # noqa: S101 - only called in fleet mode
    options = connection_options(settings)
    # A first TLS handshake to a remote Redis takes longer than a lease may.
    options["socket_timeout"] = options["socket_connect_timeout"] = max(2.0, settings.redis_timeout)
    client = redis.Redis.from_url(settings.redis_url.reveal(), **options)
    where = _where(settings)
    try:
        client.ping()
    except (redis.exceptions.RedisError, OSError) as exc:
        kind = _error_kind(exc)
        if kind == "auth":
            hint = (
                "CIGW_REDIS_PASSWORD_FILE"
                if settings.redis_password_file
                else "the password in CIGW_REDIS_URL"
            )
            raise RedisRefused(
                [f"CIGW_REDIS_URL: Redis at {where} refused the credentials; check {hint}"]
            ) from None
        log.warning(
            "fleet_redis_unreachable",
            redis=where,
            error=kind,
            hint="starting with the local share of the budget (rate / members) until it answers",
        )
        return False
    finally:
        client.close()
    return True


def _where(settings: Settings) -> str:
    assert settings.redis_url is not None  # noqa: S101 - only called in fleet mode
    url = URL(settings.redis_url.reveal())
    return f"{url.scheme}://{url.host}:{url.port or 6379}"  # never the credentials


class Fleet:
    """This gateway's membership of the fleet: budgets, hold, heartbeat, fallback."""

    def __init__(
        self, settings: Settings, metrics: FleetMetrics, clock: Clock = time.monotonic
    ) -> None:
        assert settings.redis_url is not None  # noqa: S101 - only built in fleet mode
        self.clock = clock
        self.metrics = metrics
        self.settings = settings
        # The holds shared with the fleet, by name (each route's own), in a fixed order:
        # lease and heartbeat replies carry their times left in that order.
        self._holds: dict[str, UpstreamHold] = {}
        self._hold_keys: list[str] = []
        self.member = f"{socket.gethostname()}:{os.getpid()}:{random.getrandbits(32):08x}"
        self.members = max(1, settings.workers)  # until Redis tells
        self.up = False
        self.fallback_active = False
        self._ever_up = False
        self._failures = 0  # timed-out or disconnected calls in a row
        self._prefix = f"cigw:{{{settings.fleet_name}}}:"
        password = URL(settings.redis_url.reveal()).password
        if password:
            redactor.register(password)
        self._tasks: set[asyncio.Task[Any]] = set()
        options = connection_options(settings)
        options.pop("ssl_ca_certs", None)
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            settings.redis_url.reveal(),
            max_connections=POOL_SIZE,
            timeout=settings.redis_timeout,
            **options,
        )
        if URL(settings.redis_url.reveal()).scheme == "rediss":
            pool.connection_class = _TLSConnection
            pool.connection_kwargs["tls_context"] = _tls_context(settings)
        self._pool = pool
        self._redis = redis.asyncio.Redis(connection_pool=pool)
        self._lease = self._redis.register_script(_LEASE)
        self._hold = self._redis.register_script(_HOLD)
        self._heartbeat = self._redis.register_script(_HEARTBEAT)
        metrics.members.set(self.members)
        metrics.fallback_active.set(0)

    @property
    def ever_up(self) -> bool:
        """True once a Redis call has succeeded."""
        return self._ever_up

    def share_hold(self, name: str, hold: UpstreamHold) -> None:
        """Share `hold` with the fleet under `name`: announce it, adopt the others', jitter."""
        self._holds[name] = hold
        self._hold_keys.append(self.key(f"hold:{name}"))
        hold.announce = functools.partial(self._announce, name)
        hold.jitter = lambda seconds: random.uniform(0.0, min(JITTER, seconds))  # noqa: S311

    def key(self, suffix: str) -> str:
        """A Redis key in this fleet's namespace (one hash slot: the fleet name is a tag)."""
        return self._prefix + suffix

    def budget(self, name: str, rate: float, burst: int) -> FleetBudget:
        """The fleet-wide budget called `name` (e.g. "global", "route:orders")."""
        return FleetBudget(self, name, rate, burst)

    def caller_budget(self, caller: str, rate: float, burst: int) -> FleetBudget:
        """A per-caller budget; the caller's name is hashed (it is chosen by the caller)."""
        digest = hashlib.sha256(caller.encode("utf-8", "surrogateescape")).hexdigest()[:24]
        return self.budget(f"caller:{digest}", rate, burst)

    def bucket(self, name: str, rate: float, burst: int) -> FleetBudget:
        """A `ratelimit.BucketFactory`: "caller:<name>" budgets are hashed, others named as is."""
        scope, _, caller = name.partition(":")
        if scope == "caller":
            return self.caller_budget(caller, rate, burst)
        return self.budget(name, rate, burst)

    # ------------------------------------------------------------------ background

    async def run(self) -> None:
        """Heartbeat and hold announcements until cancelled."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._beat())
            group.create_task(self._listen())

    async def close(self) -> None:
        """Leave the fleet (best effort) and close the connections."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(redis.exceptions.RedisError, OSError, TimeoutError):
            async with asyncio.timeout(max(self.settings.redis_timeout, 0.1)):
                await self._redis.zrem(self.key("members"), self.member)
        await self._redis.aclose()
        await self._pool.disconnect()  # a pool given to the client is not closed by it

    async def beat_once(self) -> None:
        """One heartbeat: count the members alive, learn any hold."""
        reply = await self._call(
            self._heartbeat,
            [self.key("members"), *self._hold_keys],
            [self.member, int(MEMBER_TTL * 1000)],
        )
        if reply is not None:
            self.members = max(1, int(reply[0]))
            self.metrics.members.set(self.members)
            self._learn_holds(reply[1:])

    async def _beat(self) -> None:
        while True:
            await self.beat_once()
            await asyncio.sleep(HEARTBEAT if self.up else HEARTBEAT_DOWN)

    async def _listen(self) -> None:
        channel = self.key("holds")
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(channel)
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None:
                        self._heard(message["data"])
            except (redis.exceptions.RedisError, OSError, TimeoutError):
                await asyncio.sleep(HEARTBEAT_DOWN)  # the heartbeat reports the outage
            finally:
                with contextlib.suppress(redis.exceptions.RedisError, OSError, TimeoutError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _heard(self, data: bytes) -> None:
        milliseconds, _, rest = data.decode("utf-8", "replace").partition(" ")
        sender, _, name = rest.partition(" ")
        hold = self._holds.get(name)
        if sender == self.member or not milliseconds.isdigit() or hold is None:
            return  # our own, malformed, or a route this gateway does not have
        self.metrics.hold_announcements.labels(direction="received").inc()
        hold.adopt(int(milliseconds) / 1000)

    def _learn_holds(self, left: list[Any]) -> None:
        for hold, milliseconds in zip(self._holds.values(), left, strict=False):
            if int(milliseconds) > 0:
                hold.adopt(int(milliseconds) / 1000)

    def _announce(self, name: str, seconds: float) -> None:
        milliseconds = max(1, math.ceil(seconds * 1000))
        self.spawn(self._write_hold(name, milliseconds))

    async def _write_hold(self, name: str, milliseconds: int) -> None:
        reply = await self._call(
            self._hold,
            [self.key(f"hold:{name}"), self.key("holds")],
            [milliseconds, f"{milliseconds} {self.member} {name}"],
        )
        if reply:
            self.metrics.hold_announcements.labels(direction="sent").inc()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` in the background, keeping a reference until it ends."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def lease(
        self, key: str, rate: float, burst: int, want: int, charge: int
    ) -> tuple[int, float] | None:
        """Ask Redis for `want` tokens of a budget: (granted, seconds until the rest), or None."""
        lifetime_ms = int(max(60.0, 2 * burst / rate) * 1000)
        reply = await self._call(
            self._lease, [key, *self._hold_keys], [rate, burst, want, charge, lifetime_ms]
        )
        metrics = self.metrics.lease_requests
        if reply is None:
            metrics.labels(outcome="error").inc()
            return None
        granted, wait_us = int(reply[0]), int(reply[1])
        outcome = "granted" if granted >= want else "partial" if granted else "empty"
        metrics.labels(outcome=outcome).inc()
        self._learn_holds(reply[2:])
        return granted, wait_us / 1_000_000

    async def _call(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """One script call within the Redis timeout; None (and fallback) when it fails."""
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.settings.redis_timeout * 2):
                reply = await script(keys=keys, args=args)
        except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
            self._down(_error_kind(exc))
            return None
        finally:
            self.metrics.redis_duration.observe(time.perf_counter() - started)
        self._failures = 0
        if not self.up or self.fallback_active:
            self.up = self._ever_up = True
            self.fallback_active = False
            self.metrics.redis_up.set(1)
            self.metrics.fallback_active.set(0)
            log.info("fleet_redis_up", members=self.members, fleet=self.settings.fleet_name)
        return reply

    def _down(self, kind: str) -> None:
        self.metrics.redis_errors.labels(kind=kind).inc()
        self.up = False
        self.metrics.redis_up.set(0)
        if kind in {"timeout", "connection"} and self._ever_up:
            # One slow call or one dropped connection is not an outage (a loaded node, a GC
            # pause, a proxy closing idle connections): falling back and returning at each
            # would hand out a fresh local share every time. Down for real, three failures
            # come within a second under load and within 4 s when idle (heartbeats).
            self._failures += 1
            if self._failures < FAILURES_TO_FALLBACK:
                return
        if not self.fallback_active:
            log.warning(
                "fleet_redis_down",
                error=kind,
                members=self.members,
                hint="enforcing rate / members locally until Redis answers",
            )
        self.fallback_active = True
        self.metrics.fallback_active.set(1)


class FleetBudget:
    """One named budget of the fleet, spent from local leases: a drop-in for TokenBucket.

    `take()` never waits for Redis: it spends a leased token, or credit while a lease is
    on its way, and otherwise refuses with the time the last lease reply gave. While
    Redis is down it is a local bucket of `rate / members`.
    """

    __slots__ = (
        "_credit",
        "_debt",
        "_demand",
        "_demand_rate",
        "_expires",
        "_fallback",
        "_fleet",
        "_key",
        "_leased",
        "_next_refill",
        "_refilling",
        "_returned",
        "_since",
        "_want",
        "burst",
        "name",
        "rate",
    )

    def __init__(self, fleet: Fleet, name: str, rate: float, burst: int) -> None:
        self.name, self.rate, self.burst = name, rate, burst
        self._fleet = fleet
        self._key = fleet.key(f"budget:{name}")
        self._leased = 0
        self._expires = 0.0
        self._debt = 0  # requests admitted on credit, charged by the next lease
        self._returned = 0  # leased tokens that expired unspent, given back by the next lease
        self._credit = True  # the last lease was granted in full: the budget is not spent
        self._demand = 0
        self._demand_rate = 0.0
        self._since = fleet.clock()
        self._want = 1
        self._refilling = False
        self._next_refill = 0.0
        self._fallback: tuple[int, TokenBucket] | None = None

    def take(self) -> float:
        """Take one token: 0.0 when granted, else the seconds until one is likely."""
        fleet = self._fleet
        self._demand += 1
        if fleet.fallback_active:
            return self._local(fleet.members).take()
        if self._fallback is not None:
            self._fallback = None  # Redis is back: credit again until a lease says otherwise
            self._credit = True
        now = fleet.clock()
        if self._leased:
            if now < self._expires:
                self._leased -= 1
                if self._leased <= self._want // 2:
                    self._refill(now)
                return 0.0
            self._returned += self._leased
            self._leased = 0
        # Credit: while the budget is not spent, a gateway whose lease ran out (or expired
        # while idle) admits up to its share of the burst at once and charges it to the
        # refill asked for now. Across the fleet that is at most one burst of overdraft,
        # paid back from the bucket (it goes below zero), so a burst after a quiet spell
        # is not refused only because the lease was small.
        if self._credit and self._debt < max(1, self.burst // fleet.members):
            self._debt += 1
            self._refill(now)
            return 0.0
        self._refill(now)
        return max(self._next_refill - now, 1.0 / self.rate)

    def _local(self, members: int) -> TokenBucket:
        if self._fallback is None or self._fallback[0] != members:
            # After an outage, starting empty: the fleet's bucket may have been spent when
            # Redis went, and N gateways each starting with a full share would admit one
            # more burst (again at each flap). At a start without Redis, the full share.
            share = TokenBucket(
                self.rate / members,
                math.ceil(self.burst / members),
                self._fleet.clock,
                tokens=0 if self._fleet.ever_up else None,
            )
            self._fallback = (members, share)
            # What was admitted on credit is not charged any more: the local share rules.
            self._debt = self._returned = self._leased = 0
        return self._fallback[1]

    def _refill(self, now: float) -> None:
        if self._refilling or now < self._next_refill:
            return
        self._refilling = True
        self._fleet.spawn(self._lease(now))

    async def _lease(self, now: float) -> None:
        try:
            elapsed = max(now - self._since, 0.05)
            seen = self._demand / elapsed
            self._demand, self._since = 0, now
            # Sized from recent demand (halved weight per refill), so a lease lasts about
            # LEASE_HORIZON and a busy gateway calls Redis a few times per second.
            self._demand_rate = seen if not self._demand_rate else (self._demand_rate + seen) / 2
            want = min(max(1, math.ceil(self._demand_rate * LEASE_HORIZON)), max(1, self.burst))
            debt, returned = self._debt, self._returned
            reply = await self._fleet.lease(self._key, self.rate, self.burst, want, debt - returned)
        finally:
            self._refilling = False
        if reply is None:
            return  # charged by the next lease, or forgiven if the fleet falls back
        self._debt -= debt
        self._returned -= returned
        granted, wait = reply
        now = self._fleet.clock()
        self._want = want
        self._credit = granted >= want
        if granted:
            self._leased += granted
            self._expires = now + LEASE_LIFETIME
        # An empty or short budget said when the rest would be there: not asked again before.
        self._next_refill = now + min(wait, 1.0) if granted < want else 0.0
