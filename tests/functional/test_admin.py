"""Admin listener, metric names, and the one access-log line per request."""

from __future__ import annotations

import io
import json

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RunningGateway
from tests.servers.upstream import Upstream

INTERFACE_METRICS = {
    "cigw_requests",
    "cigw_request_duration_seconds",
    "cigw_upstream_duration_seconds",
    "cigw_inflight_requests",
    "cigw_token_requests",
    "cigw_token_expiry_timestamp_seconds",
    "cigw_subscription_key_active",
    "cigw_subscription_key_fallbacks",
    "cigw_build_info",
    "cigw_rate_limited",
    "cigw_upstream_hold_seconds",
    "cigw_upstream_retries",
    "cigw_retry_budget_exhausted",
}


async def test_health_and_readiness(gw: RunningGateway) -> None:
    """/healthz is 200 while serving; /readyz is 200 once a token is held."""
    async with gw.session.get(gw.admin("/healthz")) as response:
        assert response.status == 200
    async with gw.session.get(gw.admin("/readyz")) as response:
        assert response.status == 200
        assert (await response.json())["status"] == "ready"


async def test_metrics_expose_the_documented_names(gw: RunningGateway) -> None:
    """/metrics is Prometheus text with every metric name of the interface."""
    async with gw.session.get(gw.url("/echo/a")) as response:
        assert response.status == 200
    async with gw.session.get(gw.admin("/metrics")) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert families.keys() >= INTERFACE_METRICS
    requests = families["cigw_requests"]
    assert any(
        s.labels == {"method": "GET", "code": "200", "route": "/"} and s.value == 1
        for s in requests.samples
    )
    expiry = families["cigw_token_expiry_timestamp_seconds"].samples[0].value
    assert expiry > 0
    assert 'cigw_build_info{version="' in text


async def test_metric_labels_carry_no_raw_path(gw: RunningGateway) -> None:
    """Distinct paths and odd methods do not create new label values (bounded cardinality)."""
    for index in range(20):
        async with gw.session.request("PROPFIND" if index % 2 else "GET", gw.url(f"/echo/{index}")):
            pass
    text = await gw.metrics_text()
    assert "/echo/" not in text
    assert 'method="PROPFIND"' not in text
    assert 'method="OTHER"' in text


async def test_one_access_log_line_per_request(
    gw: RunningGateway, upstream: Upstream, log_output: io.StringIO
) -> None:
    """Each request logs one JSON line with method, path without query, status, timing, key slot."""
    async with gw.session.get(
        gw.url("/echo/logged?secret-ish=1"), headers={"X-Request-ID": "rid-1"}
    ):
        pass
    lines = [json.loads(line) for line in log_output.getvalue().splitlines()]
    access = [line for line in lines if line.get("event") == "request"]
    assert len(access) == 1
    entry = access[0]
    assert entry["method"] == "GET"
    assert entry["path"] == "/echo/logged"
    assert entry["status"] == 200
    assert entry["upstream_status"] == 200
    assert entry["request_id"] == "rid-1"
    assert entry["key_slot"] == "primary"
    assert isinstance(entry["duration_ms"], float)
    assert any(line.get("event") == "token_acquired" for line in lines)
