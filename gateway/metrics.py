"""Every Prometheus metric the gateway exports, on an injected registry.

Metric names and labels are part of the public interface (dashboards and alerts
depend on them). No label ever carries a raw path or a caller-chosen value.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gateway import __version__

# Methods outside this set share one label value, so callers cannot grow cardinality.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """The gateway's metrics; tests build one per test on a fresh registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "cigw_requests",
            "Requests answered on the proxy listener.",
            ["method", "code"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "cigw_request_duration_seconds",
            "Time from request received to response finished.",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.upstream_duration = Histogram(
            "cigw_upstream_duration_seconds",
            "Time from sending upstream to response headers.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.inflight = Gauge(
            "cigw_inflight_requests",
            "Requests being handled on the proxy listener.",
            registry=registry,
        )
        self.token_requests = Counter(
            "cigw_token_requests",
            "Token requests to Entra ID by outcome.",
            ["outcome"],
            registry=registry,
        )
        self.token_expiry = Gauge(
            "cigw_token_expiry_timestamp_seconds",
            "Unix time at which the current access token expires (0 when there is none).",
            registry=registry,
        )
        self.token_renewal_failures = Counter(
            "cigw_token_renewal_failures",
            "Background token renewals that failed.",
            registry=registry,
        )
        self.ready = Gauge(
            "cigw_ready",
            "1 while the gateway has a valid token and is not draining.",
            registry=registry,
        )
        self.key_active = Gauge(
            "cigw_subscription_key_active",
            "1 for the subscription key slot sent first.",
            ["slot"],
            registry=registry,
        )
        self.key_fallbacks = Counter(
            "cigw_subscription_key_fallbacks",
            "Switches to the other subscription key after APIM rejected one.",
            registry=registry,
        )
        self.upstream_auth_rejections = Counter(
            "cigw_upstream_auth_rejections",
            "401 answers from the upstream, by what was rejected (key or token).",
            ["credential"],
            registry=registry,
        )
        self.key_reloads = Counter(
            "cigw_subscription_key_reloads",
            "Subscription key files re-read after a change.",
            registry=registry,
        )
        self.rate_limited = Counter(
            "cigw_rate_limited",
            "Requests answered 429 locally, by scope.",
            ["scope"],
            registry=registry,
        )
        self.upstream_hold = Gauge(
            "cigw_upstream_hold_seconds",
            "Seconds left in the hold the upstream asked for.",
            registry=registry,
        )
        self.upstream_retries = Counter(
            "cigw_upstream_retries",
            "Requests sent upstream again, by reason.",
            ["reason"],
            registry=registry,
        )
        self.retry_budget_exhausted = Counter(
            "cigw_retry_budget_exhausted",
            "Retries skipped because the retry budget was spent.",
            registry=registry,
        )
        self.build_info = Gauge(
            "cigw_build_info",
            "Always 1; the version label says which build runs.",
            ["version"],
            registry=registry,
        )
        self.build_info.labels(version=__version__).set(1)
        for scope in ("global", "caller", "upstream"):
            self.rate_limited.labels(scope=scope)
        for outcome in ("success", "failure"):
            self.token_requests.labels(outcome=outcome)
        for reason in ("connect_error", "status_502", "status_503", "status_504"):
            self.upstream_retries.labels(reason=reason)
        for credential in ("key", "token"):
            self.upstream_auth_rejections.labels(credential=credential)
        self._requests_by: dict[tuple[str, int], Counter] = {}
        self._duration_by: dict[str, Histogram] = {}

    def observe_request(self, method: str, status: int, seconds: float) -> None:
        """Count one finished request; label children are cached (labels() is slow)."""
        method = method if method in KNOWN_METHODS else "OTHER"
        counter = self._requests_by.get((method, status))
        if counter is None:
            counter = self.requests.labels(method=method, code=str(status))
            self._requests_by[(method, status)] = counter
        counter.inc()
        histogram = self._duration_by.get(method)
        if histogram is None:
            histogram = self._duration_by[method] = self.request_duration.labels(method=method)
        histogram.observe(seconds)

    def set_active_key(self, slot: str | None) -> None:
        """Mark which key slot is sent first (none: no key configured)."""
        for name in ("primary", "secondary"):
            self.key_active.labels(slot=name).set(1 if name == slot else 0)
