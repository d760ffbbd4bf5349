"""The gateway as a process: CLI, bad configuration, SIGTERM drain, SIGHUP, secrets in output."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path

import aiohttp
import pytest

from gateway.sandbox.issuer import TokenIssuer
from tests.conftest import CANARY_PRIMARY, CANARY_SECONDARY, CANARY_SECRET
from tests.poll import eventually
from tests.process import GatewayProcess, run_cli, spawn_gateway
from tests.servers.upstream import Upstream


async def test_bad_configuration_exits_2_naming_every_setting() -> None:
    """Invalid configuration: exit code 2, one message naming every problem, no traceback."""
    code, out, err = await run_cli(
        {
            "CIGW_LISTEN": "nowhere",
            "CIGW_UPSTREAM_TIMEOUT": "-5",
            "CIGW_SUBSCRIPTION_KEY_SECONDARY": "canary-secondary-should-not-print",
            "AZURE_CLIENT_SECRET": "canary-secret-should-not-print",
        },
        "serve",
    )
    assert code == 2
    for name in (
        "AZURE_TENANT_ID is required",
        "AZURE_CLIENT_ID is required",
        "CIGW_LISTEN",
        "CIGW_UPSTREAM_TIMEOUT",
        "CIGW_SUBSCRIPTION_KEY_SECONDARY is set without a primary key",
    ):
        assert name in err
    assert "Traceback" not in out + err
    assert "should-not-print" not in out + err


async def test_check_config_prints_redacted_settings(gateway_env: dict[str, str]) -> None:
    """check-config exits 0 for a valid configuration and prints it with secrets redacted."""
    code, out, err = await run_cli(gateway_env, "check-config")
    assert code == 0, err
    assert "configuration is valid" in out
    assert "CIGW_UPSTREAM_URL" in out
    for canary in (CANARY_SECRET, CANARY_PRIMARY, CANARY_SECONDARY):
        assert canary not in out + err
    assert "(set, redacted)" in out


async def test_check_config_exits_2_when_invalid() -> None:
    """check-config on an invalid configuration exits 2."""
    code, _, err = await run_cli({}, "check-config")
    assert code == 2
    assert "AZURE_TENANT_ID is required" in err


async def test_sigterm_drains_in_flight_requests(
    gateway_env: dict[str, str], upstream: Upstream, tmp_path: Path
) -> None:
    """SIGTERM: not ready at once, new connections refused, in-flight requests finish, exit 0."""
    child = await spawn_gateway(gateway_env, tmp_path / "out.log")
    async with aiohttp.ClientSession() as session:
        await child.wait_ready()
        in_flight = asyncio.ensure_future(session.get(child.url("/delay?s=1.5")))
        await eventually(lambda: upstream.active > 0)
        child.signal(signal.SIGTERM)
        async with asyncio.timeout(5):
            while True:
                async with session.get(child.admin("/readyz")) as response:
                    if response.status == 503:
                        assert "draining" in (await response.json())["reason"]
                        break
                await asyncio.sleep(0.02)
        with pytest.raises(aiohttp.ClientConnectorError):
            async with aiohttp.ClientSession() as fresh:
                await fresh.get(child.url("/echo/late"))
        response = await in_flight
        assert response.status == 200
        response.release()
    # Sent once above: a second SIGTERM from stop() could arrive after the event loop has
    # removed its handlers and end the process with the default action (-15).
    assert await child.exit_code() == 0
    assert "shutdown_complete" in child.printed()


async def test_sighup_reloads_key_files(
    gateway_env: dict[str, str], upstream: Upstream, tmp_path: Path
) -> None:
    """SIGHUP re-reads the key files at once (no waiting for the poll interval)."""
    primary = tmp_path / "primary"
    primary.write_text(CANARY_PRIMARY)
    env = {
        **gateway_env,
        "CIGW_SUBSCRIPTION_KEY_FILE": str(primary),
        "CIGW_KEY_RELOAD_INTERVAL": "300",
    }
    env.pop("CIGW_SUBSCRIPTION_KEY")
    child = await spawn_gateway(env, tmp_path / "out.log")
    new_key = upstream.keys.regenerate("primary")
    await asyncio.to_thread(primary.write_text, new_key)
    child.signal(signal.SIGHUP)
    async with aiohttp.ClientSession() as session:
        await eventually(lambda: "subscription_keys_reloaded" in child.printed())
        async with session.get(child.url("/echo/after-hup")) as response:
            assert response.status == 200
    assert upstream.seen[-1].header_values("Ocp-Apim-Subscription-Key") == [new_key]
    assert await child.stop() == 0


async def test_secrets_never_appear_in_output(
    gateway_env: dict[str, str], upstream: Upstream, issuer: TokenIssuer, tmp_path: Path
) -> None:
    """After traffic, fallback, failures and shutdown no secret, key or token was printed."""
    env = {**gateway_env, "CIGW_LOG_LEVEL": "debug"}
    child = await spawn_gateway(env, tmp_path / "out.log")
    served: list[str] = []
    async with aiohttp.ClientSession() as session:
        await child.wait_ready()
        upstream.keys.regenerate("primary")  # forces a fallback and its warning
        # No /echo here: it reflects request headers, as no real upstream would.
        for path in ("/status/200", "/download?size=10", "/../x", "/status/500", "/redirect"):
            async with session.get(child.url(path), headers={"Authorization": "Bearer x"}) as r:
                served.append(str(r.headers) + await r.text())
                assert r.status != 401
        issuer.faults.status = 500  # a failing renewal is logged too
        async with session.get(child.admin("/metrics")) as response:
            served.append(await response.text())
    assert await child.stop() == 0
    printed = child.printed()
    assert "token_acquired" in printed
    assert "subscription_key_fallback" in printed
    canaries = [CANARY_SECRET, CANARY_PRIMARY, CANARY_SECONDARY, *issuer.issued]
    for canary in canaries:
        assert canary not in printed
        for text in served:
            assert canary not in text


async def test_python_dash_m_gateway_is_the_console_script() -> None:
    """`python -m gateway --version` works like the `ci-gateway` script."""
    code, out, _ = await run_cli({}, "--version")
    assert code == 0
    assert out.startswith("ci-gateway ")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()]


async def _spawn_two_workers(
    gateway_env: dict[str, str], tmp_path: Path
) -> tuple[GatewayProcess, int]:
    # Fixed ports: with port 0 each process would bind a port of its own.
    env = {
        **gateway_env,
        "CIGW_WORKERS": "2",
        "CIGW_LISTEN": f"127.0.0.1:{_free_port()}",
        "CIGW_ADMIN_LISTEN": f"127.0.0.1:{_free_port()}",
    }
    child = await spawn_gateway(env, tmp_path / "out.log")
    await child.wait_ready()
    (worker,) = _children(child.process.pid)
    return child, worker


async def test_workers_share_the_port_and_stop_together(
    gateway_env: dict[str, str], upstream: Upstream, tmp_path: Path
) -> None:
    """CIGW_WORKERS=2: two processes serve one port, each with its own token; SIGTERM stops both."""
    child, worker = await _spawn_two_workers(gateway_env, tmp_path)
    await eventually(lambda: child.printed().count('"token_acquired"') == 2)
    async with aiohttp.ClientSession() as session:
        for _ in range(20):
            # A new connection each time, so the kernel spreads them over both processes.
            async with session.get(child.url("/echo/w"), headers={"Connection": "close"}) as r:
                assert r.status == 200
    # Each worker holds its own token: two tokens seen means both processes served.
    assert len({seen.header_values("Authorization")[0] for seen in upstream.seen}) == 2
    assert await child.stop() == 0
    assert not await asyncio.to_thread(Path(f"/proc/{worker}").exists)  # reaped by the parent


async def test_a_dead_worker_stops_all_so_the_pod_restarts(
    gateway_env: dict[str, str], tmp_path: Path
) -> None:
    """When a worker dies unasked, the others stop and the process exits 1."""
    child, worker = await _spawn_two_workers(gateway_env, tmp_path)
    os.kill(worker, signal.SIGKILL)
    async with asyncio.timeout(30):
        assert await child.process.wait() == 1
    assert "worker_exited" in child.printed()
