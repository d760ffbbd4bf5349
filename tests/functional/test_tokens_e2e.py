"""Tokens through the real MSAL against the local TLS issuer: single flight, renewal, outages."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from gateway.sandbox.issuer import ClientRegistration, TokenIssuer
from tests.certs import client_certificate
from tests.conftest import CANARY_SECRET, CLIENT, TENANT, RunningGateway, StartGateway
from tests.servers.upstream import Upstream


async def _get(gw: RunningGateway, path: str = "/echo/x") -> tuple[int, dict[str, object]]:
    async with gw.session.get(gw.url(path)) as response:
        return response.status, await response.json()


async def test_cold_start_is_single_flight(
    start_gateway: StartGateway, issuer: TokenIssuer
) -> None:
    """50 concurrent requests before the first token cause exactly one token request."""
    issuer.faults.delay = 0.5
    gw = await start_gateway(ready=False)
    results = await asyncio.gather(*(_get(gw) for _ in range(50)))
    assert [status for status, _ in results] == [200] * 50
    assert issuer.token_calls == 1


async def test_token_is_renewed_in_the_background(
    start_gateway: StartGateway, issuer: TokenIssuer, upstream: Upstream
) -> None:
    """With 2-second tokens, renewals happen ahead of expiry and no request fails or waits."""
    issuer.lifetime = 2
    gw = await start_gateway()
    slowest = 0.0
    deadline = time.monotonic() + 3.5
    while time.monotonic() < deadline:
        started = time.perf_counter()
        status, _ = await _get(gw)
        slowest = max(slowest, time.perf_counter() - started)
        assert status == 200
        await asyncio.sleep(0.05)
    assert issuer.token_calls >= 3
    tokens_used = {s.header_values("Authorization")[0] for s in upstream.seen}
    assert len(tokens_used) >= 3
    assert slowest < 0.5  # nobody waited for the token endpoint


async def test_outage_keeps_cached_token_until_real_expiry_then_recovers(
    start_gateway: StartGateway, issuer: TokenIssuer
) -> None:
    """Endpoint down: cached token serves until real expiry, then 503 naming the cause; recovers."""
    issuer.lifetime = 3
    gw = await start_gateway()
    issuer.faults.status, issuer.faults.error, issuer.faults.aadsts = (
        503,
        "temporarily_unavailable",
        "AADSTS90033",
    )
    await asyncio.sleep(2.0)  # renewal at ~1.5 s has failed by now
    assert (await _get(gw))[0] == 200  # cached token still valid (MSAL would call it expired)
    await asyncio.sleep(1.3)  # real expiry passed
    status, body = await _get(gw)
    assert status == 503
    error = body["error"]
    assert isinstance(error, dict)
    assert error["code"] == "token_unavailable"
    assert "AADSTS90033" in error["message"]
    assert CANARY_SECRET not in str(body)
    async with gw.session.get(gw.admin("/readyz")) as response:
        assert response.status == 503
        assert "no valid token" in (await response.json())["reason"]
    issuer.faults.clear()
    await gw.wait_ready(within=10)
    assert (await _get(gw))[0] == 200


async def test_no_token_at_start_gives_503_and_not_ready(
    start_gateway: StartGateway, issuer: TokenIssuer
) -> None:
    """A wrong client secret: readiness stays false and requests get 503 with the AADSTS code."""
    gw = await start_gateway({"AZURE_CLIENT_SECRET": "wrong-secret-value"}, ready=False)
    await asyncio.sleep(0.3)
    status, body = await _get(gw)
    assert status == 503
    assert "AADSTS7000215" in str(body)
    assert "wrong-secret-value" not in str(body)
    async with gw.session.get(gw.admin("/readyz")) as response:
        assert response.status == 503
    metrics = await gw.metrics_text()
    assert 'cigw_token_requests_total{outcome="failure"}' in metrics


async def test_upstream_401_for_token_gets_fresh_token_once(
    gw: RunningGateway, issuer: TokenIssuer, upstream: Upstream
) -> None:
    """An upstream 401 invalid_token makes the gateway fetch a fresh token and retry once."""
    calls = issuer.token_calls
    upstream.revoked.add(issuer.issued[-1])
    status, _ = await _get(gw)
    assert status == 200
    assert issuer.token_calls == calls + 1
    assert len(upstream.seen) == 1  # the rejected attempt never reached the handler
    assert upstream.seen[0].header_values("Authorization") == [f"Bearer {issuer.issued[-1]}"]
    metrics = await gw.metrics_text()
    assert 'cigw_upstream_auth_rejections_total{credential="token",route="/"} 1.0' in metrics


async def test_upstream_401_twice_is_passed_back(
    gw: RunningGateway, issuer: TokenIssuer, upstream: Upstream
) -> None:
    """If the fresh token is refused too, the 401 goes back to the caller: no loop."""
    upstream.revoked.update(issuer.issued)
    original = issuer.verify
    issuer.verify = lambda token: False  # type: ignore[method-assign]
    async with gw.session.get(gw.url("/echo/x")) as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    issuer.verify = original  # type: ignore[method-assign]
    assert issuer.token_calls == 2


async def test_certificate_credential(
    start_gateway: StartGateway, issuer: TokenIssuer, tmp_path: Path
) -> None:
    """A PEM certificate credential signs a client assertion the issuer verifies."""
    pem, certificate = client_certificate(b"canary-cert-password")
    path = tmp_path / "client.pem"
    path.write_bytes(pem)
    issuer.registration = ClientRegistration(TENANT, CLIENT, certificate_pem=certificate)
    gw = await start_gateway(
        {
            "AZURE_CLIENT_SECRET": None,
            "AZURE_CLIENT_CERTIFICATE_PATH": str(path),
            "AZURE_CLIENT_CERTIFICATE_PASSWORD": "canary-cert-password",
        }
    )
    assert (await _get(gw))[0] == 200


async def test_workload_identity_reads_the_rotating_assertion_file(
    start_gateway: StartGateway, issuer: TokenIssuer, tmp_path: Path
) -> None:
    """The federated assertion is read from its file at every token request (the file rotates)."""
    token_file = tmp_path / "azure-identity-token"
    token_file.write_text("canary-federated-assertion-1")
    issuer.registration = ClientRegistration(
        TENANT, CLIENT, federated_assertion="canary-federated-assertion-1"
    )
    issuer.lifetime = 2
    gw = await start_gateway(
        {"AZURE_CLIENT_SECRET": None, "AZURE_FEDERATED_TOKEN_FILE": str(token_file)}
    )
    assert (await _get(gw))[0] == 200
    # The kubelet rotates the projected token; Entra accepts only the new one from now on.
    await asyncio.to_thread(token_file.write_text, "canary-federated-assertion-2")
    issuer.registration.federated_assertion = "canary-federated-assertion-2"
    calls = issuer.token_calls
    await asyncio.sleep(2.2)
    assert issuer.token_calls > calls
    assert gw.gateway.tokens.problem is None
    assert (await _get(gw))[0] == 200


async def test_proxy_variables_do_not_capture_a_loopback_token_endpoint(
    start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only config.load's proxy decision counts: requests' own environment reading is off, and
    a proxy on another host never carries a token request for this host's 127.0.0.1."""
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # the process environment: not read
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    remote = "http://192.0.2.1:3128"  # TEST-NET-1: nothing answers there
    gw = await start_gateway({"HTTPS_PROXY": remote, "HTTP_PROXY": remote})
    assert (await _get(gw))[0] == 200
