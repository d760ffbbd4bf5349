"""Merging workers' metric pages: names and labels unchanged, each kind aggregated as documented."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.group_metrics import merge


def _page(requests: int, ready: int, hold: float, inflight: int, latency: float) -> str:
    registry = CollectorRegistry()
    Counter("cigw_rate_limited", "h", ["scope"], registry=registry).labels("global").inc(requests)
    Gauge("cigw_ready", "h", registry=registry).set(ready)
    Gauge("cigw_upstream_hold_seconds", "h", registry=registry).set(hold)
    Gauge("cigw_inflight_requests", "h", registry=registry).set(inflight)
    Histogram("cigw_fleet_redis_duration_seconds", "h", registry=registry).observe(latency)
    return generate_latest(registry).decode()


def test_counters_and_histograms_sum_gauges_follow_their_aggregation() -> None:
    """Counters and histograms add up; ready takes the minimum, the hold the maximum."""
    merged = merge([_page(3, 1, 0.0, 2, 0.001), _page(4, 0, 7.5, 1, 0.2)]).decode()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(merged)
        for sample in family.samples
    }
    assert samples[("cigw_rate_limited_total", (("scope", "global"),))] == 7
    assert samples[("cigw_ready", ())] == 0
    assert samples[("cigw_upstream_hold_seconds", ())] == 7.5
    assert samples[("cigw_inflight_requests", ())] == 3
    assert samples[("cigw_fleet_redis_duration_seconds_count", ())] == 2
    assert samples[("cigw_fleet_redis_duration_seconds_bucket", (("le", "0.005"),))] == 1
    assert samples[("cigw_fleet_redis_duration_seconds_bucket", (("le", "+Inf"),))] == 2
    assert "# TYPE cigw_rate_limited_total counter" in merged
    assert "# TYPE cigw_fleet_redis_duration_seconds histogram" in merged


def test_one_page_comes_back_unchanged() -> None:
    """A group of one reads exactly as the worker's own page."""
    page = _page(1, 1, 0.0, 0, 0.01)
    assert merge([page]).decode() == page
