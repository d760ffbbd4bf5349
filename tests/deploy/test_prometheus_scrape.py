"""A real Prometheus scrapes a running gateway; promtool accepts its exposition."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RunningGateway
from tests.deploy.interface import CHART_METRICS, FLEET_METRICS
from tests.poll import eventually


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
async def prometheus(gw: RunningGateway, tmp_path: Path) -> AsyncIterator[str]:
    """A Prometheus server scraping the gateway's admin listener every 200 ms; yields its URL."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is needed: apt-get install prometheus (.ci/run does)")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 200ms\n  scrape_timeout: 150ms\n"
        "scrape_configs:\n  - job_name: ci-gateway\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{gw.gateway.admin_port}']\n"
    )
    port = _free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    log.close()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        await asyncio.wait_for(process.wait(), 15)


async def test_prometheus_scrapes_request_counters(gw: RunningGateway, prometheus: str) -> None:
    """After traffic, a PromQL query over Prometheus' HTTP API returns cigw_requests_total."""
    for _ in range(5):
        async with gw.session.get(gw.url("/echo/scraped")) as response:
            assert response.status == 200

    async def counted() -> bool:
        url = f"{prometheus}/api/v1/query"
        query = 'sum(cigw_requests_total{method="GET",code="200"})'
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(url, params={"query": query}) as response,
            ):
                if response.status != 200:
                    return False
                result = (await response.json())["data"]["result"]
        except aiohttp.ClientConnectionError:
            return False
        return bool(result) and float(result[0]["value"][1]) >= 5

    await eventually(counted, within=30, step=0.2)


async def test_promtool_accepts_the_exposition(gw: RunningGateway, promtool: Path) -> None:
    """`promtool check metrics` finds no problem in the gateway's /metrics page."""
    async with gw.session.get(gw.url("/echo/a")):
        pass
    text = await gw.metrics_text()
    checked = await asyncio.create_subprocess_exec(
        str(promtool),
        "check",
        "metrics",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    output, _ = await checked.communicate(text.encode())
    assert checked.returncode == 0, output.decode()
    assert output.decode().strip() == ""


async def test_chart_metrics_are_all_exported(gw: RunningGateway) -> None:
    """Every metric the chart's alerts and dashboard use is one the gateway really exports."""
    text = await gw.metrics_text()
    exported: set[str] = set()
    for family in text_string_to_metric_families(text):
        exported.update(sample.name for sample in family.samples)
        # A labelled counter with no child yet has no sample; its HELP/TYPE still count.
        exported.add(f"{family.name}_total" if family.type == "counter" else family.name)
    missing = {name for name in set(CHART_METRICS) - FLEET_METRICS if name not in exported}
    assert not missing, f"the chart uses metrics the gateway does not export: {sorted(missing)}"
