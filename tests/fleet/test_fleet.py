"""Fleet mode against a real redis-server: one budget, one hold, and what happens without Redis."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RunningGateway, StartGateway
from tests.deploy.interface import FLEET_METRICS
from tests.fleet.conftest import fleet_overrides
from tests.poll import eventually
from tests.process import GatewayProcess, spawn_gateway
from tests.servers.redis import RedisServer
from tests.servers.upstream import Upstream


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample on a /metrics page (0.0 when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


async def hammer(
    session: aiohttp.ClientSession, urls: list[str], seconds: float, concurrency: int = 4
) -> Counter[int]:
    """Send requests to `urls` in turn, `concurrency` at a time, for `seconds`: statuses seen."""
    statuses: Counter[int] = Counter()
    deadline = time.monotonic() + seconds

    async def worker(offset: int) -> None:
        turn = offset
        while time.monotonic() < deadline:
            async with session.get(urls[turn % len(urls)]) as response:
                await response.read()
                statuses[response.status] += 1
            turn += 1
            await asyncio.sleep(0.002)

    await asyncio.gather(*(worker(index) for index in range(concurrency)))
    return statuses


async def gauge(gateway: RunningGateway, name: str) -> float:
    """One gauge of an in-process gateway's /metrics."""
    return metric(await gateway.metrics_text(), name)


async def test_gateways_in_one_process_share_one_budget(
    start_gateway: StartGateway, redis_session: RedisServer, upstream: Upstream
) -> None:
    """Two gateways on one fleet budget admit about the fleet rate together, not twice it."""
    env = fleet_overrides(redis_session.url, CIGW_RATE_LIMIT_RPS="10", CIGW_RATE_LIMIT_BURST="5")
    first = await start_gateway(env)
    second = await start_gateway(env)
    urls = [str(first.url("/v1/a")), str(second.url("/v1/b"))]
    started = time.monotonic()
    statuses = await hammer(first.session, urls, seconds=3.0)
    elapsed = time.monotonic() - started
    # Fleet-wide: burst + rate x time, plus at most one burst of credit over the fleet.
    # Two local buckets would admit twice the rate; the lower bound shows it is spent.
    ceiling = 5 + 10 * elapsed + 5
    assert statuses[200] <= ceiling * 1.1, (statuses, elapsed)
    assert statuses[200] >= 10 * 3.0 * 0.5, (statuses, elapsed)
    assert set(statuses) <= {200, 429}
    text = await first.metrics_text()
    assert metric(text, "cigw_fleet_members") in (1, 2)  # 2 from the next heartbeat on
    assert metric(text, "cigw_fleet_redis_up") == 1
    assert metric(text, "cigw_fleet_fallback_active") == 0
    leases = [
        metric(text, "cigw_fleet_lease_requests_total", outcome=outcome)
        for outcome in ("granted", "partial")
    ]
    assert sum(leases) >= 1
    assert metric(text, "cigw_rate_limited_total", scope="global") >= 1
    assert upstream.count() == statuses[200]


async def test_refusal_keeps_the_429_shape(
    start_gateway: StartGateway, redis_session: RedisServer
) -> None:
    """A fleet refusal is today's 429: Retry-After and the RateLimit headers."""
    env = fleet_overrides(redis_session.url, CIGW_RATE_LIMIT_RPS="1", CIGW_RATE_LIMIT_BURST="1")
    gateway = await start_gateway(env)
    refused = None
    for _ in range(20):
        async with gateway.session.get(gateway.url("/v1/x")) as response:
            if response.status == 429:
                refused = response
                body = await response.json()
                break
            await response.read()
    assert refused is not None
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.headers["RateLimit-Policy"] == '"global";q=1;w=1'
    assert body["error"]["code"] == "rate_limited"


async def test_three_gateway_processes_share_one_budget(
    redis_session: RedisServer, gateway_env: dict[str, str], upstream: Upstream, tmp_path: Path
) -> None:
    """Three gateway processes admit the fleet rate between them, not three times it."""
    env = {
        **gateway_env,
        **fleet_overrides(redis_session.url, CIGW_RATE_LIMIT_RPS="10", CIGW_RATE_LIMIT_BURST="5"),
    }
    children: list[GatewayProcess] = []
    try:
        for index in range(3):
            children.append(await spawn_gateway(env, tmp_path / f"gateway{index}.log"))
        for child in children:
            await child.wait_ready()
        urls = [str(child.url("/v1/x")) for child in children]
        async with aiohttp.ClientSession() as session:
            started = time.monotonic()
            statuses = await hammer(session, urls, seconds=4.0, concurrency=6)
            elapsed = time.monotonic() - started
            async with session.get(children[0].admin("/metrics")) as response:
                text = await response.text()
    finally:
        codes = [await child.stop() for child in children]
    ceiling = 5 + 10 * elapsed + 5  # burst + rate x time + at most one burst of credit
    # Members are counted at heartbeats; the others joined after the first one's start.
    assert statuses[200] <= ceiling * 1.1, (statuses, elapsed)
    assert statuses[200] >= 10 * 4.0 * 0.5, (statuses, elapsed)
    assert set(statuses) <= {200, 429}
    assert metric(text, "cigw_fleet_members") == 3
    assert codes == [0, 0, 0]


async def test_an_upstream_429_holds_every_gateway(
    start_gateway: StartGateway, redis_session: RedisServer, upstream: Upstream
) -> None:
    """A 429 met by one gateway stops the others at once, through Redis pub/sub."""
    env = fleet_overrides(redis_session.url)
    met, other = await start_gateway(env), await start_gateway(env)
    upstream.fail_next, upstream.retry_after = [429], "30"
    async with met.session.get(met.url("/v1/x")) as response:
        assert response.status == 429
    started = time.monotonic()

    async def other_is_held() -> bool:
        async with other.session.get(other.url("/v1/x")) as response:
            await response.read()
            return response.status == 429 and response.headers.get("Retry-After") is not None

    before = upstream.count()
    await eventually(other_is_held, within=5.0, step=0.005)
    # The hold arrived by announcement (a heartbeat would take up to 2 s).
    assert time.monotonic() - started < 1.5
    assert upstream.count() - before <= 3  # at most the requests sent while it travelled
    async with other.session.get(other.url("/v1/x")) as response:
        assert response.status == 429
        assert 25 <= int(response.headers["Retry-After"]) <= 33  # 30 s plus at most 2 of jitter
        assert (await response.json())["error"]["message"].startswith("the upstream asked")
    met_text, other_text = await met.metrics_text(), await other.metrics_text()
    assert metric(met_text, "cigw_fleet_hold_announcements_total", direction="sent") == 1
    assert metric(other_text, "cigw_fleet_hold_announcements_total", direction="received") == 1
    assert 25 <= metric(other_text, "cigw_upstream_hold_seconds") <= 32
    # Extend only: a shorter hold never shortens the one in Redis.
    assert int(redis_session.command("PTTL", f"cigw:{{{env['CIGW_FLEET_NAME']}}}:hold:/")) >= 25_000


async def test_a_gateway_starting_during_a_hold_learns_it(
    start_gateway: StartGateway, redis_session: RedisServer, upstream: Upstream
) -> None:
    """A gateway that missed the announcement learns the hold from its first heartbeat."""
    env = fleet_overrides(redis_session.url)
    met = await start_gateway(env)
    upstream.fail_next, upstream.retry_after = [429], "20"
    async with met.session.get(met.url("/v1/x")) as response:
        assert response.status == 429
    await eventually(
        lambda: redis_session.command("EXISTS", f"cigw:{{{env['CIGW_FLEET_NAME']}}}:hold:/") == "1"
    )
    late = await start_gateway(env)
    async with late.session.get(late.url("/v1/x")) as response:
        assert response.status == 429
        assert int(response.headers["Retry-After"]) >= 15


async def test_redis_killed_and_restarted_under_load(
    start_gateway: StartGateway, own_redis: RedisServer, upstream: Upstream
) -> None:
    """Redis gone: no 5xx, fallback to rate / members within 5 s, /readyz true; back within 5 s."""
    env = fleet_overrides(own_redis.url, CIGW_RATE_LIMIT_RPS="20", CIGW_RATE_LIMIT_BURST="10")
    first, _second = await start_gateway(env), await start_gateway(env)

    async def two_members() -> bool:
        return await gauge(first, "cigw_fleet_members") == 2

    await eventually(two_members, within=5.0, step=0.1)  # the next heartbeat counts both
    urls = [str(first.url("/v1/a"))]
    statuses = await hammer(first.session, urls, seconds=1.0)

    own_redis.kill()
    killed = time.monotonic()
    load = asyncio.ensure_future(hammer(first.session, urls, seconds=7.0))

    async def fallback_active() -> bool:
        return await gauge(first, "cigw_fleet_fallback_active") == 1

    await eventually(fallback_active, within=6.0, step=0.05)
    assert time.monotonic() - killed < 5.5
    assert await gauge(first, "cigw_fleet_redis_up") == 0
    async with first.session.get(first.admin("/readyz")) as response:
        assert response.status == 200
    # Fallback share: 20 rps / 2 members = 10 rps, burst 5, measured over 3 s.
    counted = upstream.count()
    await asyncio.sleep(3.0)
    admitted = upstream.count() - counted
    assert admitted <= (5 + 10 * 3.0) * 1.2, admitted
    assert admitted >= 10 * 3.0 * 0.5, admitted

    own_redis.start()
    restarted = time.monotonic()

    async def back() -> bool:
        return await gauge(first, "cigw_fleet_fallback_active") == 0

    await eventually(back, within=6.0, step=0.05)
    assert time.monotonic() - restarted < 5.5
    statuses += await load
    assert set(statuses) <= {200, 429}, statuses  # never a 5xx because of Redis
    text = await first.metrics_text()
    assert metric(text, "cigw_fleet_redis_up") == 1
    assert (
        metric(text, "cigw_fleet_redis_errors_total", kind="connection")
        + metric(text, "cigw_fleet_redis_errors_total", kind="timeout")
        >= 1
    )

    def answered(text: str) -> float:
        return sum(
            metric(text, "cigw_fleet_lease_requests_total", outcome=outcome)
            for outcome in ("granted", "partial", "empty")
        )

    before = answered(text)
    await hammer(first.session, urls, seconds=0.5)
    assert answered(await first.metrics_text()) > before  # leases from Redis again


async def test_tls_to_redis_with_a_pinned_ca(
    start_gateway: StartGateway, tls_redis: RedisServer, ca_file: Path
) -> None:
    """rediss:// with CIGW_REDIS_CA_FILE: leases over TLS, verified against the test CA."""
    env = fleet_overrides(
        tls_redis.url,
        CIGW_REDIS_CA_FILE=str(ca_file),
        CIGW_RATE_LIMIT_RPS="50",
    )
    gateway = await start_gateway(env)
    for _ in range(5):
        async with gateway.session.get(gateway.url("/v1/x")) as response:
            assert response.status == 200
    await asyncio.sleep(0.2)
    text = await gateway.metrics_text()
    assert metric(text, "cigw_fleet_redis_up") == 1
    assert metric(text, "cigw_fleet_lease_requests_total", outcome="granted") >= 1


async def test_tls_to_redis_refuses_an_unknown_ca(
    start_gateway: StartGateway, tls_redis: RedisServer, tmp_path: Path
) -> None:
    """A Redis certificate the pinned CA did not sign is refused: fallback, never plaintext."""
    import trustme

    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    gateway = await start_gateway(fleet_overrides(tls_redis.url, CIGW_REDIS_CA_FILE=str(other)))
    text = await gateway.metrics_text()
    assert metric(text, "cigw_fleet_redis_up") == 0
    assert metric(text, "cigw_fleet_fallback_active") == 1


async def test_a_fleet_gateway_exports_the_charts_fleet_metrics(
    start_gateway: StartGateway, redis_session: RedisServer
) -> None:
    """Every fleet metric the chart's alerts use is on a fleet gateway's /metrics page."""
    gateway = await start_gateway(fleet_overrides(redis_session.url))
    exported: set[str] = set()
    for family in text_string_to_metric_families(await gateway.metrics_text()):
        exported.update(sample.name for sample in family.samples)
        exported.add(f"{family.name}_total" if family.type == "counter" else family.name)
    assert FLEET_METRICS
    assert exported >= FLEET_METRICS


async def test_a_stalled_redis_never_holds_a_request(
    start_gateway: StartGateway, own_redis: RedisServer, upstream: Upstream
) -> None:
    """Redis frozen (SIGSTOP): requests keep their pace, then fallback; SIGCONT: fleet again."""
    env = fleet_overrides(
        own_redis.url,
        CIGW_REDIS_TIMEOUT="0.1",
        CIGW_RATE_LIMIT_RPS="50",
        CIGW_RATE_LIMIT_BURST="10",
    )
    gateway = await start_gateway(env)
    assert own_redis.process is not None
    own_redis.process.send_signal(signal.SIGSTOP)
    try:
        slowest, statuses = 0.0, Counter[int]()
        stalled = time.monotonic()
        while time.monotonic() - stalled < 3.0:
            started = time.monotonic()
            async with gateway.session.get(gateway.url("/v1/x")) as response:
                await response.read()
                statuses[response.status] += 1
            slowest = max(slowest, time.monotonic() - started)
            await asyncio.sleep(0.02)
        # Generous for a loaded machine, yet far below what waiting on a frozen Redis
        # would take (the whole 3 s): the request path never calls Redis.
        assert slowest < 0.5, slowest
        assert set(statuses) <= {200, 429}, statuses
        assert statuses[200] >= 10
        assert await gauge(gateway, "cigw_fleet_fallback_active") == 1
        assert (
            metric(await gateway.metrics_text(), "cigw_fleet_redis_errors_total", kind="timeout")
            >= 1
        )
    finally:
        own_redis.process.send_signal(signal.SIGCONT)

    async def back() -> bool:
        return await gauge(gateway, "cigw_fleet_fallback_active") == 0

    await eventually(back, within=6.0, step=0.1)
