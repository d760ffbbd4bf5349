"""CIGW_WORKERS>1: one scrape of /metrics reports the whole process group."""

from __future__ import annotations

import socket
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.poll import eventually
from tests.process import spawn_gateway
from tests.servers.upstream import Upstream


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_a_scrape_of_three_workers_reports_their_sum(
    gateway_env: dict[str, str], upstream: Upstream, tmp_path: Path
) -> None:
    """Whichever worker a scrape reaches, counters and histograms are the sum of all three."""
    env = {
        **gateway_env,
        "CIGW_WORKERS": "3",
        "CIGW_LISTEN": f"127.0.0.1:{_free_port()}",
        "CIGW_ADMIN_LISTEN": f"127.0.0.1:{_free_port()}",
    }
    child = await spawn_gateway(env, tmp_path / "out.log")
    try:
        await child.wait_ready()
        await eventually(lambda: child.printed().count('"token_acquired"') == 3, within=10)
        sent = 45
        async with aiohttp.ClientSession() as session:
            for _ in range(sent):
                # A new connection each time, so the kernel spreads them over the workers.
                headers = {"Connection": "close"}
                async with session.get(child.url("/v1/w"), headers=headers) as response:
                    assert response.status == 200
            pages = []
            for _ in range(8):
                async with session.get(child.admin("/metrics"), headers=headers) as response:
                    assert response.status == 200
                    pages.append(await response.text())
    finally:
        assert await child.stop() == 0
    # Each worker holds its own token: more than one seen means more than one served.
    assert len({seen.header_values("Authorization")[0] for seen in upstream.seen}) >= 2
    get = (("code", "200"), ("method", "GET"), ("route", "/"))
    for page in pages:
        samples = _samples(page)
        assert samples[("cigw_requests_total", get)] == sent
        assert (
            samples[("cigw_request_duration_seconds_count", (("method", "GET"), ("route", "/")))]
            == sent
        )
        bucket = (("le", "+Inf"), ("method", "GET"), ("route", "/"))
        assert samples[("cigw_request_duration_seconds_bucket", bucket)] == sent
        assert samples[("cigw_token_requests_total", (("outcome", "success"),))] == 3
        assert samples[("cigw_ready", ())] == 1  # a gauge: every worker ready, not 3
        assert samples[("cigw_inflight_requests", ())] == 0
        assert "# TYPE cigw_requests_total counter" in page
        assert page.count("cigw_build_info{") == 1
