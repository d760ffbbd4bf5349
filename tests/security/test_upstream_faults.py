"""Faults of the upstream (APIM): each ends in an honest answer, no loop, nothing sent astray."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import trustme
from prometheus_client import CollectorRegistry

from gateway import config
from gateway.app import create_app, serve
from gateway.sandbox.issuer import TokenIssuer
from tests.conftest import (
    CANARY_PRIMARY,
    CANARY_SECONDARY,
    RunningGateway,
    StartGateway,
    base_url,
    start_app,
)
from tests.security.support import Ledger, SecurityUpstream
from tests.servers.upstream import Upstream


async def fetch(
    gw: RunningGateway, ledger: Ledger, method: str, path: str, data: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One request through the gateway, the answer recorded for the leak scan."""
    async with gw.session.request(
        method, gw.url(path), data=data, allow_redirects=False
    ) as response:
        body = await response.read()
        ledger.record(f"{method} {path}", f"{list(response.headers.items())}\n")
        ledger.record(f"{method} {path} body", body)
        return response.status, dict(response.headers), body


async def test_connection_refused_is_502(
    start_gateway: StartGateway, ledger: Ledger, closed_port: int
) -> None:
    """An upstream that refuses connections: 502 upstream_unreachable, quickly."""
    gw = await start_gateway({"CIGW_UPSTREAM_URL": f"http://127.0.0.1:{closed_port}/v1"})
    status, _, body = await fetch(gw, ledger, "GET", "/echo/x")
    assert status == 502
    assert b"upstream_unreachable" in body


async def test_reset_before_headers_retries_get_not_post(
    start_gateway: StartGateway, upstream: Upstream, ledger: Ledger
) -> None:
    """A reset before any response byte: GET is retried (bounded), POST goes once; both get 502."""
    gw = await start_gateway({"CIGW_RETRY_ATTEMPTS": "2"})
    status, _, _ = await fetch(gw, ledger, "GET", "/reset")
    assert status == 502
    gets = upstream.count("/v1/reset")
    # Each gateway attempt may cost two: aiohttp resends an idempotent request once when a
    # pooled keep-alive connection breaks (RFC 9112 §9.3.1). Never more than that.
    assert 1 < gets <= 2 * (1 + 2)
    status, _, _ = await fetch(gw, ledger, "POST", "/reset", b"payload")
    assert status == 502
    assert upstream.count("/v1/reset") == gets + 1


async def test_reset_mid_body_aborts_the_answer(
    start_gateway: StartGateway, upstream: Upstream
) -> None:
    """An upstream that dies mid-body: the caller's answer aborts, never a complete-looking 200."""
    gw = await start_gateway()
    async with gw.session.get(gw.url("/reset-mid-body")) as response:
        assert response.status == 200  # the headers were already relayed
        with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError)):
            await response.read()
    assert upstream.count("/v1/reset-mid-body") == 1


async def test_silent_upstream_is_504_at_the_timeout(
    start_gateway: StartGateway, upstream: Upstream, ledger: Ledger
) -> None:
    """An upstream that never answers: 504 upstream_timeout at CIGW_UPSTREAM_TIMEOUT, not later."""
    gw = await start_gateway({"CIGW_UPSTREAM_TIMEOUT": "1", "CIGW_RETRY_ATTEMPTS": "0"})
    started = time.monotonic()
    status, _, body = await fetch(gw, ledger, "GET", "/stall")
    elapsed = time.monotonic() - started
    assert status == 504
    assert b"upstream_timeout" in body
    assert 0.9 <= elapsed < 3.0


@pytest.fixture
async def untrusted_upstream(upstream: Upstream) -> AsyncIterator[str]:
    """The test upstream behind TLS signed by a CA the gateway does not trust."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("127.0.0.1").configure_cert(context)
    runner = await start_app(upstream.app(), context)
    yield base_url(runner, "https")
    await runner.cleanup()


async def test_untrusted_upstream_certificate_is_502(
    start_gateway: StartGateway, upstream: Upstream, ledger: Ledger, untrusted_upstream: str
) -> None:
    """An upstream certificate from an unknown CA: 502 naming the certificate; nothing is sent."""
    gw = await start_gateway({"CIGW_UPSTREAM_URL": f"{untrusted_upstream}/v1"})
    status, _, body = await fetch(gw, ledger, "GET", "/echo/x")
    assert status == 502
    assert b"certificate" in body
    assert upstream.seen == []


async def test_redirect_is_passed_back_not_followed(
    start_gateway: StartGateway, upstream: Upstream, ledger: Ledger
) -> None:
    """A 302 to another host goes back to the caller as it is; the gateway sends nothing there."""
    gw = await start_gateway()
    started = time.monotonic()
    status, headers, _ = await fetch(gw, ledger, "GET", "/redirect")
    assert status == 302
    assert headers["Location"] == "http://203.0.113.7/elsewhere"
    assert time.monotonic() - started < 1.0  # 203.0.113.7 (TEST-NET-3) would hang a follower
    assert len(upstream.seen) == 1


async def test_both_keys_rejected_returns_apim_401_without_looping(
    start_gateway: StartGateway, upstream: Upstream, ledger: Ledger
) -> None:
    """Both keys invalid: one retry with the secondary, then APIM's 401 to the caller, counted."""
    gw = await start_gateway()
    upstream.keys.regenerate("primary")
    upstream.keys.regenerate("secondary")
    assert isinstance(upstream, SecurityUpstream)
    status, _, body = await fetch(gw, ledger, "GET", "/echo/keys")
    assert status == 401
    assert b"invalid subscription key" in body
    # Primary, then the secondary once; the set of keys tried is exactly the configured two.
    assert [key for _, _, key in upstream.arrivals] == [CANARY_PRIMARY, CANARY_SECONDARY]
    status, _, _ = await fetch(gw, ledger, "POST", "/echo/keys", b"{}")
    assert status == 401
    assert len(upstream.arrivals) == 4
    assert upstream.seen == []
    rejections = gw.gateway.metrics.registry.get_sample_value(
        "cigw_upstream_auth_rejections_total", {"credential": "key", "route": "/"}
    )
    assert rejections is not None
    assert rejections >= 3
    ledger.record("metrics", await gw.metrics_text())


class _Clock:
    """Wall-clock time plus an offset the test moves."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.fixture
async def clocked_gateway(
    gateway_env: dict[str, str], issuer: TokenIssuer
) -> AsyncIterator[tuple[RunningGateway, _Clock]]:
    """A gateway (and issuer) whose clock the test can move forward."""
    clock = _Clock()
    issuer.clock = clock
    settings = await asyncio.to_thread(config.load, gateway_env)
    gateway = await asyncio.to_thread(
        create_app, settings, registry=CollectorRegistry(), clock=clock
    )
    stop, started = asyncio.Event(), asyncio.Event()
    task = asyncio.ensure_future(serve(gateway, stop, started))
    await asyncio.wait_for(started.wait(), 10)
    async with aiohttp.ClientSession() as session:
        running = RunningGateway(gateway, stop, task, session)
        await running.wait_ready()
        yield running, clock
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)


async def test_token_expiring_during_long_upload(
    clocked_gateway: tuple[RunningGateway, _Clock], upstream: Upstream, ledger: Ledger
) -> None:
    """A token that expires while a long upload streams does not fail the upload."""
    gw, clock = clocked_gateway
    chunk = b"u" * (256 * 1024)
    chunks, pause_at = 12, 8  # 2 MiB in: past the 1 MiB the gateway buffers before sending
    paused, resume = asyncio.Event(), asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        for index in range(chunks):
            if index == pause_at:
                paused.set()
                await resume.wait()
            yield chunk

    async def move_clock() -> None:
        await paused.wait()
        async with asyncio.timeout(10):
            while not upstream.active:  # noqa: ASYNC110 - the upstream's state, polled
                await asyncio.sleep(0.01)
        clock.offset += 7200  # two hours: the token the upload started with has expired
        assert not gw.gateway.tokens.valid
        resume.set()

    mover = asyncio.ensure_future(move_clock())
    async with gw.session.post(gw.url("/upload"), data=body()) as response:
        result: dict[str, Any] = await response.json()
        ledger.record("upload", str(result))
    await mover
    assert response.status == 200, result
    assert result["length"] == chunks * len(chunk)
    assert result["sha256"] == hashlib.sha256(chunk * chunks).hexdigest()
