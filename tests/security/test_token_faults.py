"""Faults of the token endpoint: the gateway says why it cannot serve, leaks nothing, recovers."""

from __future__ import annotations

import asyncio
import io
import json
import time
from dataclasses import dataclass
from typing import Any

import pytest

from gateway.sandbox.issuer import TokenIssuer
from tests.conftest import RunningGateway, StartGateway
from tests.security.support import Ledger
from tests.servers.upstream import Upstream


@dataclass(frozen=True, slots=True)
class Fault:
    """A way the token endpoint fails, and what the caller's 503 must name."""

    id: str
    names: tuple[str, ...]  # one of these must appear in the error message
    status: int | None = None
    error: str = "temporarily_unavailable"
    aadsts: str = "AADSTS50000"
    retry_after: int | None = None
    delay: float = 0.0
    html: bool = False

    def apply(self, issuer: TokenIssuer) -> None:
        """Switch the fault on."""
        faults = issuer.faults
        faults.status, faults.error, faults.aadsts = self.status, self.error, self.aadsts
        faults.retry_after, faults.delay, faults.html = self.retry_after, self.delay, self.html


FAULTS = [
    Fault("http-500", ("AADSTS90033",), status=500, aadsts="AADSTS90033"),
    Fault(
        "http-503-retry-after", ("AADSTS90033",), status=503, retry_after=1, aadsts="AADSTS90033"
    ),
    Fault("timeout", ("timed out", "timeout"), delay=1.5),
    Fault("html-instead-of-json", ("text/html", "JSON", "unreadable"), html=True),
    Fault(
        "invalid-client",
        ("AADSTS7000215",),
        status=401,
        error="invalid_client",
        aadsts="AADSTS7000215",
    ),
]


async def fetch(gw: RunningGateway, ledger: Ledger, path: str) -> tuple[int, dict[str, Any]]:
    """GET through the gateway; the whole answer goes to the leak ledger."""
    async with gw.session.get(gw.url(path)) as response:
        body = await response.read()
        ledger.record(f"GET {path}", f"{response.status} {list(response.headers.items())}\n")
        ledger.record(f"GET {path} body", body)
        try:
            data = json.loads(body)
        except ValueError:
            data = {}
        return response.status, data if isinstance(data, dict) else {}


async def readyz(gw: RunningGateway, ledger: Ledger) -> tuple[int, str]:
    """The readiness probe's status and text."""
    async with gw.session.get(gw.admin("/readyz")) as response:
        text = await response.text()
        ledger.record("readyz", text)
        return response.status, text


async def wait_for(condition: Any, within: float = 10.0) -> None:
    """Poll a zero-argument callable until it is true (bounded)."""
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110 - the state belongs to the gateway under test
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("fault", FAULTS, ids=lambda fault: fault.id)
async def test_start_during_token_outage_then_recover(
    *,
    start_gateway: StartGateway,
    issuer: TokenIssuer,
    upstream: Upstream,
    ledger: Ledger,
    log_output: io.StringIO,
    fault: Fault,
) -> None:
    """Token endpoint down at start: not ready, 503 token_unavailable naming why, then recovers."""
    fault.apply(issuer)
    gw = await start_gateway({"CIGW_TOKEN_TIMEOUT": "1"}, ready=False)
    await wait_for(lambda: gw.gateway.tokens.problem is not None)
    status, _ = await readyz(gw, ledger)
    assert status == 503
    status, body = await fetch(gw, ledger, "/echo/outage")
    assert status == 503, body
    assert body["error"]["code"] == "token_unavailable"
    message = body["error"]["message"]
    assert any(name.lower() in message.lower() for name in fault.names), message
    assert upstream.seen == []
    if fault.retry_after:
        await wait_for(lambda: events(log_output, "token_renewal_retry"))
        (first, *_) = events(log_output, "token_renewal_retry")
        assert first["retry_in_s"] >= fault.retry_after  # Retry-After is honoured
    issuer.faults.clear()
    await gw.wait_ready(within=15)
    status, body = await fetch(gw, ledger, "/echo/recovered")
    assert status == 200, body


async def test_untrusted_token_endpoint_certificate(
    start_gateway: StartGateway, issuer: TokenIssuer, ledger: Ledger
) -> None:
    """A token endpoint with an untrusted TLS certificate: no token, 503 naming TLS, not ready."""
    gw = await start_gateway({"CIGW_AUTHORITY_CA_FILE": None}, ready=False)
    await wait_for(lambda: gw.gateway.tokens.problem is not None)
    status, _ = await readyz(gw, ledger)
    assert status == 503
    status, body = await fetch(gw, ledger, "/echo/tls")
    assert status == 503
    assert body["error"]["code"] == "token_unavailable"
    message = body["error"]["message"].lower()
    assert "tls" in message or "certificate" in message, message
    assert issuer.token_calls == 0  # the handshake failed: no credential was ever sent


async def test_wrong_secret_names_aadsts_without_the_secret(
    start_gateway: StartGateway, issuer: TokenIssuer, ledger: Ledger
) -> None:
    """A client secret Entra ID rejects: 503 naming AADSTS7000215; no secret appears anywhere."""
    issuer.registration.client_secret = "the-registered-secret-Qw19"
    ledger.secret("the-registered-secret-Qw19")
    gw = await start_gateway(ready=False)
    await wait_for(lambda: gw.gateway.tokens.problem is not None)
    status, body = await fetch(gw, ledger, "/echo/secret")
    assert status == 503
    assert "AADSTS7000215" in body["error"]["message"]
    assert "invalid_client" in body["error"]["message"]
    ledger.record("metrics", await gw.metrics_text())


async def test_slow_token_endpoint_holds_first_requests(
    start_gateway: StartGateway, issuer: TokenIssuer, ledger: Ledger
) -> None:
    """A slow healthy token endpoint: requests arriving meanwhile wait for the token and pass."""
    issuer.faults.delay = 0.5
    gw = await start_gateway({"CIGW_TOKEN_TIMEOUT": "5"}, ready=False)
    results = await asyncio.gather(*(fetch(gw, ledger, f"/echo/slow{i}") for i in range(5)))
    assert [status for status, _ in results] == [200] * 5
    assert issuer.token_calls == 1


async def test_cached_token_serves_through_outage_until_expiry(
    start_gateway: StartGateway, issuer: TokenIssuer, ledger: Ledger, log_output: io.StringIO
) -> None:
    """Outage after warm-up: cached token serves to expiry; 100 requests then add no token calls."""
    issuer.faults.expires_in = 2
    gw = await start_gateway()
    issuer.faults.status, issuer.faults.aadsts = 503, "AADSTS90033"
    calls_at_outage = issuer.token_calls
    started = time.monotonic()
    status, _ = await fetch(gw, ledger, "/echo/cached")
    assert status == 200  # the cached token serves although the endpoint is down
    expiry = gw.gateway.metrics.registry.get_sample_value("cigw_token_expiry_timestamp_seconds")
    assert expiry is not None
    await wait_for(lambda: not gw.gateway.tokens.valid, within=5)
    assert time.time() >= expiry - 0.05
    served_until = time.monotonic() - started
    assert served_until > 1.0
    log_before = len(events(log_output, "token_renewal_retry"))
    calls_before = issuer.token_calls
    results = await asyncio.gather(*(fetch(gw, ledger, f"/echo/burst{i}") for i in range(100)))
    assert {status for status, _ in results} == {503}
    assert {body["error"]["code"] for _, body in results} == {"token_unavailable"}
    # Every token request during the burst belongs to one background backoff step.
    steps = len(events(log_output, "token_renewal_retry")) - log_before
    assert issuer.token_calls - calls_before <= steps + 1
    assert issuer.token_calls - calls_at_outage >= 1
    issuer.faults.clear()
    await gw.wait_ready(within=15)
    status, _ = await fetch(gw, ledger, "/echo/after")
    assert status == 200


def events(log_output: io.StringIO, name: str) -> list[dict[str, Any]]:
    """The in-process gateway's JSON log events named `name`."""
    found = []
    for line in log_output.getvalue().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == name:
            found.append(event)
    return found
