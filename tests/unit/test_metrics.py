"""The per-request tally: what a scrape of the registry shows after known observations."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.samples import Sample

from gateway.metrics import Metrics


def _samples(metrics: Metrics, name: str) -> list[Sample]:
    return [
        sample
        for family in metrics.registry.collect()
        for sample in family.samples
        if sample.name == name
    ]


def _value(metrics: Metrics, name: str, **labels: str) -> float:
    (sample,) = [s for s in _samples(metrics, name) if s.labels == labels]
    return sample.value


def test_requests_are_counted_by_method_and_code() -> None:
    """Each finished request adds one to its (method, code) series; odd methods share OTHER."""
    metrics = Metrics(CollectorRegistry())
    tally = metrics.tally
    for method, status in [("GET", 200), ("GET", 200), ("POST", 502), ("BREW", 200)]:
        tally.started()
        tally.finished(method, status, 0.01, "/")
    tally.finished("GET", 404, 0.01)  # refused before any route was chosen
    assert _value(metrics, "cigw_requests_total", method="GET", code="200", route="/") == 2
    assert _value(metrics, "cigw_requests_total", method="POST", code="502", route="/") == 1
    assert _value(metrics, "cigw_requests_total", method="OTHER", code="200", route="/") == 1
    assert _value(metrics, "cigw_requests_total", method="GET", code="404", route="none") == 1
    assert len(_samples(metrics, "cigw_requests_created")) == 4


def test_inflight_rises_and_falls() -> None:
    """In-flight requests: started minus finished."""
    metrics = Metrics(CollectorRegistry())
    metrics.tally.started()
    metrics.tally.started()
    metrics.tally.finished("GET", 200, 0.001)
    assert _value(metrics, "cigw_inflight_requests") == 1


def test_histogram_buckets_are_cumulative_and_inclusive() -> None:
    """A duration equal to a bound counts in that bucket ("le"); buckets are cumulative."""
    metrics = Metrics(CollectorRegistry())
    for seconds in (0.0005, 0.001, 0.0011, 0.3, 100.0):
        metrics.tally.finished("GET", 200, seconds)

    def bucket(le: str) -> float:
        return _value(
            metrics, "cigw_request_duration_seconds_bucket", method="GET", route="none", le=le
        )

    assert bucket("0.001") == 2
    assert bucket("0.0025") == 3
    assert bucket("0.5") == 4
    assert bucket("60.0") == 4
    assert bucket("+Inf") == 5
    assert _value(metrics, "cigw_request_duration_seconds_count", method="GET", route="none") == 5
    assert _value(metrics, "cigw_request_duration_seconds_sum", method="GET", route="none") == (
        0.0005 + 0.001 + 0.0011 + 0.3 + 100.0
    )


def test_upstream_histogram_is_exported_before_any_answer() -> None:
    """The upstream latency series exist at zero from the start, then count answers."""
    metrics = Metrics(CollectorRegistry())
    metrics.add_route("/ci/")
    assert _value(metrics, "cigw_upstream_duration_seconds_count", route="/ci/") == 0
    metrics.tally.upstream_answered(0.02, "/ci/")
    assert _value(metrics, "cigw_upstream_duration_seconds_bucket", route="/ci/", le="0.025") == 1
    assert _value(metrics, "cigw_upstream_duration_seconds_bucket", route="/ci/", le="0.01") == 0
