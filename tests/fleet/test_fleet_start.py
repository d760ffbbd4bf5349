"""Fleet mode at start and on reconnect: refused passwords, unreachable Redis, rotated passwords."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from tests.conftest import StartGateway
from tests.fleet.conftest import fleet_overrides
from tests.fleet.test_fleet import metric
from tests.poll import eventually
from tests.process import run_cli, spawn_gateway
from tests.servers.redis import RedisServer, free_port


async def test_a_refused_password_stops_the_start_with_exit_2(
    gateway_env: dict[str, str], password_redis: RedisServer, tmp_path: Path
) -> None:
    """Redis reachable but refusing the password: exit 2, naming the setting, no secret."""
    wrong = "canary-wrong-redis-password-5k"
    password_file = tmp_path / "redis-password"
    password_file.write_text(wrong + "\n")
    env = {
        **gateway_env,
        **fleet_overrides(password_redis.url, CIGW_REDIS_PASSWORD_FILE=str(password_file)),
    }
    code, out, err = await run_cli(env, "serve")
    assert code == 2, (out, err)
    assert "Redis at redis://127.0.0.1:" in err
    assert "refused the credentials; check CIGW_REDIS_PASSWORD_FILE" in err
    assert "Traceback" not in err
    assert wrong not in out + err
    assert password_redis.password is not None
    assert password_redis.password not in out + err


async def test_a_missing_password_in_the_url_is_refused_too(
    gateway_env: dict[str, str], password_redis: RedisServer
) -> None:
    """No password for a Redis that requires one: exit 2 naming the URL's password."""
    code, _, err = await run_cli({**gateway_env, **fleet_overrides(password_redis.url)}, "serve")
    assert code == 2
    assert "refused the credentials; check the password in CIGW_REDIS_URL" in err


async def test_unreachable_redis_at_start_warns_and_falls_back(
    gateway_env: dict[str, str], closed_port: int, tmp_path: Path
) -> None:
    """Redis down at start: a warning, then serving on the local share, ready, no 5xx."""
    env = {
        **gateway_env,
        **fleet_overrides(f"redis://127.0.0.1:{closed_port}/0", CIGW_RATE_LIMIT_RPS="50"),
    }
    child = await spawn_gateway(env, tmp_path / "gateway.log")
    try:
        await child.wait_ready()
        async with aiohttp.ClientSession() as session:
            for _ in range(5):
                async with session.get(child.url("/v1/x")) as response:
                    assert response.status == 200
            async with session.get(child.admin("/metrics")) as response:
                text = await response.text()
    finally:
        assert await child.stop() == 0
    assert metric(text, "cigw_fleet_redis_up") == 0
    assert metric(text, "cigw_fleet_fallback_active") == 1
    printed = child.printed()
    assert '"fleet_redis_unreachable"' in printed
    assert '"level": "warning"' in printed


async def test_the_password_file_is_read_again_on_reconnect(
    start_gateway: StartGateway, password_redis: RedisServer, tmp_path: Path
) -> None:
    """A rotated password in the file is used when Redis drops the connections."""
    assert password_redis.password is not None
    password_file = tmp_path / "redis-password"
    password_file.write_text(password_redis.password + "\n")
    gateway = await start_gateway(
        fleet_overrides(
            password_redis.url,
            CIGW_REDIS_PASSWORD_FILE=str(password_file),
            CIGW_RATE_LIMIT_RPS="100",
        )
    )
    text = await gateway.metrics_text()
    assert metric(text, "cigw_fleet_redis_up") == 1
    granted = metric(text, "cigw_fleet_lease_requests_total", outcome="granted")
    rotated = password_redis.password + "-rotated"
    await asyncio.to_thread(password_file.write_text, rotated + "\n")
    await asyncio.to_thread(password_redis.command, "CONFIG", "SET", "requirepass", rotated)
    password_redis.password = rotated
    await asyncio.to_thread(password_redis.command, "CLIENT", "KILL", "TYPE", "normal")
    await asyncio.to_thread(password_redis.command, "CLIENT", "KILL", "TYPE", "pubsub")

    async def leased_again() -> bool:
        async with gateway.session.get(gateway.url("/v1/x")) as response:
            assert response.status == 200
        text = await gateway.metrics_text()
        return (
            metric(text, "cigw_fleet_lease_requests_total", outcome="granted") > granted
            and metric(text, "cigw_fleet_redis_up") == 1
        )

    await eventually(leased_again, within=8.0, step=0.2)
    text = await gateway.metrics_text()
    assert metric(text, "cigw_fleet_redis_errors_total", kind="auth") == 0


async def test_each_worker_is_a_member_of_the_fleet(
    gateway_env: dict[str, str], redis_session: RedisServer, tmp_path: Path
) -> None:
    """CIGW_WORKERS=2 with Redis: two members, one budget; /metrics reports them once."""
    env = {
        **gateway_env,
        **fleet_overrides(redis_session.url, CIGW_RATE_LIMIT_RPS="10", CIGW_RATE_LIMIT_BURST="5"),
        "CIGW_WORKERS": "2",
        "CIGW_LISTEN": f"127.0.0.1:{free_port()}",
        "CIGW_ADMIN_LISTEN": f"127.0.0.1:{free_port()}",
    }
    child = await spawn_gateway(env, tmp_path / "gateway.log")
    try:
        await child.wait_ready()

        async def two_members() -> bool:
            async with (
                aiohttp.ClientSession() as session,
                session.get(child.admin("/metrics")) as response,
            ):
                return metric(await response.text(), "cigw_fleet_members") == 2

        await eventually(two_members, within=8.0, step=0.2)
        members = redis_session.command("ZCARD", f"cigw:{{{env['CIGW_FLEET_NAME']}}}:members")
        assert members == "2"
    finally:
        assert await child.stop() == 0
