"""Traffic control through a gateway: local limits, upstream hold, retries, size and time limits."""

from __future__ import annotations

import asyncio
import re
import socket

import pytest

from tests.clock import FakeClock
from tests.conftest import RunningGateway, StartGateway
from tests.poll import eventually
from tests.servers.upstream import Upstream


async def _get(
    gw: RunningGateway, path: str = "/echo/x", **headers: str
) -> tuple[int, dict[str, str], dict[str, object]]:
    async with gw.session.get(gw.url(path), headers=headers) as response:
        return response.status, dict(response.headers), await response.json()


async def test_global_bucket_allows_burst_then_rps(
    start_gateway: StartGateway, upstream: Upstream
) -> None:
    """BURST requests pass at once, the next is 429 without upstream I/O; then RPS per second."""
    clock = FakeClock()
    gw = await start_gateway(
        {"CIGW_RATE_LIMIT_RPS": "2", "CIGW_RATE_LIMIT_BURST": "5"}, monotonic=clock
    )
    statuses = [(await _get(gw))[0] for _ in range(6)]
    assert statuses == [200] * 5 + [429]
    status, headers, body = await _get(gw)
    assert status == 429
    assert body["error"] == {
        "code": "rate_limited",
        "message": "global rate limit exceeded; retry later",
    }
    assert headers["Retry-After"] == "1"
    assert headers["RateLimit-Policy"] == '"global";q=5;w=1'
    assert headers["RateLimit"].startswith('"global";r=0;t=')
    assert len(upstream.seen) == 5
    clock.now += 1.0
    statuses = [(await _get(gw))[0] for _ in range(3)]
    assert statuses == [200, 200, 429]
    metrics = await gw.metrics_text()
    assert 'cigw_rate_limited_total{route="/",scope="global"} 3.0' in metrics


async def test_caller_buckets_are_independent_and_header_not_forwarded(
    start_gateway: StartGateway, upstream: Upstream
) -> None:
    """Each X-Caller has its own bucket, and the caller header never reaches the upstream."""
    clock = FakeClock()
    gw = await start_gateway(
        {
            "CIGW_RATE_LIMIT_CALLER_HEADER": "X-Caller",
            "CIGW_RATE_LIMIT_CALLER_RPS": "1",
            "CIGW_RATE_LIMIT_CALLER_BURST": "2",
        },
        monotonic=clock,
    )
    billing = [(await _get(gw, **{"X-Caller": "billing"}))[0] for _ in range(3)]
    crm = [(await _get(gw, **{"X-Caller": "crm"}))[0] for _ in range(2)]
    assert billing == [200, 200, 429]
    assert crm == [200, 200]
    assert all(not seen.header_values("X-Caller") for seen in upstream.seen)
    assert 'cigw_rate_limited_total{route="/",scope="caller"} 1.0' in await gw.metrics_text()


async def test_upstream_429_holds_the_whole_gateway(
    start_gateway: StartGateway, upstream: Upstream
) -> None:
    """A 429 with Retry-After: 2 goes back as is; for ~2 s all get a local 429; then resume."""
    clock = FakeClock()
    gw = await start_gateway(monotonic=clock)
    upstream.fail_next, upstream.retry_after = [429], "2"
    async with gw.session.get(gw.url("/echo/a")) as response:
        assert response.status == 429
        assert response.headers["Retry-After"] == "2"
        assert await response.json() == {"injected": 429}  # APIM's own answer, unchanged
    seen = len(upstream.seen)
    status, headers, body = await _get(gw, "/echo/other-caller")
    assert status == 429
    assert body["error"]["code"] == "rate_limited"  # type: ignore[index]
    assert headers["Retry-After"] == "2"
    assert len(upstream.seen) == seen
    clock.now += 1.2
    status, headers, _ = await _get(gw)
    assert (status, headers["Retry-After"]) == (429, "1")
    hold = re.search(
        r'^cigw_upstream_hold_seconds{route="/"} (\S+)$', await gw.metrics_text(), re.M
    )
    assert hold is not None
    assert float(hold.group(1)) == pytest.approx(0.8)
    clock.now += 0.9
    assert (await _get(gw))[0] == 200
    metrics = await gw.metrics_text()
    assert 'cigw_rate_limited_total{route="/",scope="upstream"} 2.0' in metrics


async def test_quota_403_with_retry_after_holds(
    start_gateway: StartGateway, upstream: Upstream
) -> None:
    """APIM's quota answer (403 with Retry-After) also starts the hold."""
    clock = FakeClock()
    gw = await start_gateway(monotonic=clock)
    upstream.fail_next, upstream.retry_after = [403], "60"
    assert (await _get(gw))[0] == 403
    status, headers, _ = await _get(gw)
    assert (status, headers["Retry-After"]) == (429, "60")


async def test_get_is_retried_on_503(gw: RunningGateway, upstream: Upstream) -> None:
    """A GET that meets a 503 is retried and succeeds; the retry is counted."""
    upstream.fail_next = [503]
    status, _, _ = await _get(gw)
    assert status == 200
    assert len(upstream.seen) == 2
    assert (
        'cigw_upstream_retries_total{reason="status_503",route="/"} 1.0' in await gw.metrics_text()
    )


async def test_post_is_never_retried(gw: RunningGateway, upstream: Upstream) -> None:
    """A POST that meets a 503 is answered 503: the upstream sees exactly one POST."""
    upstream.fail_next = [503]
    async with gw.session.post(gw.url("/echo/x"), data=b"{}") as response:
        assert response.status == 503
    assert [seen.method for seen in upstream.seen] == ["POST"]


async def test_retry_after_on_503_is_respected(gw: RunningGateway, upstream: Upstream) -> None:
    """A 503 whose Retry-After exceeds the upstream timeout is passed back, not retried."""
    upstream.fail_next, upstream.retry_after = [503], "3600"
    status, headers, _ = await _get(gw)
    assert (status, headers["Retry-After"]) == (503, "3600")
    assert len(upstream.seen) == 1


async def test_retry_budget_stops_retry_storms(
    start_gateway: StartGateway, upstream: Upstream
) -> None:
    """Against an upstream that always fails, retries stay near 20% of requests, not 2x."""
    gw = await start_gateway({"CIGW_RETRY_ATTEMPTS": "2"})
    upstream.fail_next = [502] * 1000
    for _ in range(50):
        assert (await _get(gw))[0] == 502
    assert len(upstream.seen) <= 50 + 10 + 3  # requests + 20% budget + the floor
    assert len(upstream.seen) > 50  # some retries did happen
    metrics = await gw.metrics_text()
    assert "cigw_retry_budget_exhausted_total 0.0" not in metrics


async def test_oversize_body_with_content_length_is_413_without_upstream(
    start_gateway: StartGateway, upstream: Upstream
) -> None:
    """Content-Length over CIGW_MAX_BODY_BYTES is refused with 413 before any upstream request."""
    gw = await start_gateway({"CIGW_MAX_BODY_BYTES": "1000"})
    async with gw.session.post(gw.url("/upload"), data=b"x" * 1001) as response:
        assert response.status == 413
        assert (await response.json())["error"]["code"] == "payload_too_large"
    assert upstream.seen == []


async def test_oversize_chunked_body_is_cut_off(
    start_gateway: StartGateway, upstream: Upstream
) -> None:
    """A chunked body is cut off at the cap with 413; the upstream never receives a whole body."""
    gw = await start_gateway({"CIGW_MAX_BODY_BYTES": str(3 * 1024 * 1024)})

    async def body() -> object:
        for _ in range(64):
            yield b"y" * 65536

    async with gw.session.post(gw.url("/upload"), data=body()) as response:
        assert response.status == 413
    assert upstream.seen == []  # /upload records only a body it received completely


async def test_caller_disconnect_cancels_the_upstream_exchange(
    gw: RunningGateway, upstream: Upstream
) -> None:
    """A caller hanging up mid-request leaves no upstream request running after a second."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.proxy_port)
    writer.write(b"GET /stall HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    await eventually(lambda: upstream.active > 0)
    writer.close()
    await writer.wait_closed()
    await eventually(lambda: upstream.active == 0, within=1.0)
    assert upstream.active == 0
    del reader


async def test_connection_cap_waits_then_503(
    start_gateway: StartGateway, upstream: Upstream
) -> None:
    """With every upstream slot busy, a caller waits CIGW_CONNECTION_WAIT, then gets 503."""
    gw = await start_gateway({"CIGW_MAX_CONNECTIONS": "1", "CIGW_CONNECTION_WAIT": "0.2"})
    slow = asyncio.ensure_future(_get(gw, "/delay?s=1"))
    await eventually(lambda: upstream.active > 0)
    status, _, body = await _get(gw)
    assert status == 503
    assert body["error"]["code"] == "overloaded"  # type: ignore[index]
    assert (await slow)[0] == 200


async def test_dribbling_headers_are_cut_off(
    start_gateway: StartGateway, upstream: Upstream
) -> None:
    """A client sending headers a byte at a time is disconnected after CIGW_CLIENT_TIMEOUT."""
    gw = await start_gateway({"CIGW_CLIENT_TIMEOUT": "0.5"})
    loop = asyncio.get_running_loop()
    sock = socket.create_connection(("127.0.0.1", gw.gateway.proxy_port))
    sock.setblocking(False)
    started = loop.time()
    closed_after = None
    try:
        for byte in b"GET /echo/x HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
            try:
                await loop.sock_sendall(sock, bytes([byte]))
            except OSError:
                closed_after = loop.time() - started
                break
            await asyncio.sleep(0.05)
            try:
                if await asyncio.wait_for(loop.sock_recv(sock, 1), 0.001) == b"":
                    closed_after = loop.time() - started
                    break
            except TimeoutError:
                pass
    finally:
        sock.close()
    assert closed_after is not None
    assert closed_after < 2.0
    assert upstream.seen == []


async def test_stalled_body_is_refused_without_holding_upstream(
    start_gateway: StartGateway, upstream: Upstream
) -> None:
    """A body that stops arriving gets a 4xx after CIGW_CLIENT_TIMEOUT and no upstream request."""
    gw = await start_gateway({"CIGW_CLIENT_TIMEOUT": "0.3"})
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.proxy_port)
    writer.write(b"POST /echo/x HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
    await writer.drain()
    async with asyncio.timeout(3):
        status_line = await reader.readline()
    writer.close()
    assert status_line.split()[1].startswith(b"4")
    assert upstream.seen == []
