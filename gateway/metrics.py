"""Every Prometheus metric the gateway exports, on an injected registry.

Metric names and labels are part of the public interface (dashboards and alerts
depend on them). No label ever carries a raw path or a caller-chosen value: `route` is a
configured prefix ("/" without YAML routes:), or "none" for a request no route took.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator
from itertools import accumulate

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from gateway import __version__

# Methods outside this set share one label value, so callers cannot grow cardinality.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
NO_ROUTE = "none"  # the route label of requests refused before a route was chosen
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """The gateway's metrics; tests build one per test on a fresh registry."""

    def __init__(self, registry: CollectorRegistry, *, caller_label: bool = False) -> None:
        self.registry = registry
        # With caller authentication, request and rate-limit series carry a `caller` label:
        # the allowlist entry matched, so its values are bounded by configuration.
        self.caller_label = caller_label
        # cigw_requests, cigw_request_duration_seconds, cigw_upstream_duration_seconds and
        # cigw_inflight_requests change on every request: see RequestTally.
        self.tally = RequestTally(caller_label=caller_label)
        registry.register(self.tally)
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
            "1 for the subscription key slot sent first, per route.",
            ["slot", "route"],
            registry=registry,
        )
        self.key_fallbacks = Counter(
            "cigw_subscription_key_fallbacks",
            "Switches to the other subscription key after APIM rejected one.",
            ["route"],
            registry=registry,
        )
        self.upstream_auth_rejections = Counter(
            "cigw_upstream_auth_rejections",
            "401 answers from the upstream, by what was rejected (key or token).",
            ["credential", "route"],
            registry=registry,
        )
        self.key_reloads = Counter(
            "cigw_subscription_key_reloads",
            "Subscription key files re-read after a change.",
            ["route"],
            registry=registry,
        )
        self.rate_limited = Counter(
            "cigw_rate_limited",
            "Requests answered 429 locally, by scope.",
            ["scope", "route", "caller"] if caller_label else ["scope", "route"],
            registry=registry,
        )
        self.caller_rejections = Counter(
            "cigw_caller_rejections",
            "Requests refused by caller authentication, by reason.",
            ["reason"],
            registry=registry,
        )
        self.caller_key_fetches = Counter(
            "cigw_caller_key_fetches",
            "Fetches of the caller-token issuer's key set, by outcome.",
            ["outcome"],
            registry=registry,
        )
        self.stripped_headers = Counter(
            "cigw_stripped_headers",
            "Privileged headers removed from callers' requests, by header name.",
            ["header"],
            registry=registry,
        )
        self.upstream_hold = Gauge(
            "cigw_upstream_hold_seconds",
            "Seconds left in the hold the upstream asked for, per route.",
            ["route"],
            registry=registry,
        )
        self.upstream_retries = Counter(
            "cigw_upstream_retries",
            "Requests sent upstream again, by reason.",
            ["reason", "route"],
            registry=registry,
        )
        self.retry_budget_exhausted = Counter(
            "cigw_retry_budget_exhausted",
            "Retries skipped because the retry budget was spent.",
            registry=registry,
        )
        self.tls_reloads = Counter(
            "cigw_tls_reloads",
            "Proxy-listener certificate files re-read after a change, by outcome.",
            ["outcome"],
            registry=registry,
        )
        self.build_info = Gauge(
            "cigw_build_info",
            "Always 1; the version label says which build runs.",
            ["version"],
            registry=registry,
        )
        self.build_info.labels(version=__version__).set(1)
        for outcome in ("success", "failure"):
            self.token_requests.labels(outcome=outcome)
            self.caller_key_fetches.labels(outcome=outcome)
        for reason in ("unauthenticated", "forbidden", "keys_unavailable"):
            self.caller_rejections.labels(reason=reason)
        for outcome in ("success", "failure"):
            self.tls_reloads.labels(outcome=outcome)

    def count_rate_limited(self, scope: str, route: str, caller: str | None) -> None:
        """A local 429, by scope and route, and by caller label with caller authentication."""
        if self.caller_label:
            self.rate_limited.labels(scope=scope, route=route, caller=caller or "").inc()
        else:
            self.rate_limited.labels(scope=scope, route=route).inc()

    def caller_keys_fetched(self, ok: bool) -> None:
        """Count a fetch of the issuer's key set."""
        self.caller_key_fetches.labels(outcome="success" if ok else "failure").inc()

    def caller_rejected(self, reason: str) -> None:
        """Count a request caller authentication refused."""
        self.caller_rejections.labels(reason=reason).inc()

    def add_stripped_headers(self, names: tuple[str, ...]) -> None:
        """Create each stripped header's series at zero (names come from configuration)."""
        for name in names:
            self.stripped_headers.labels(header=name)

    def tls_reloaded(self, ok: bool) -> None:
        """Count a certificate reload: taken, or refused and the previous pair kept."""
        self.tls_reloads.labels(outcome="success" if ok else "failure").inc()

    def add_route(self, route: str) -> None:
        """Create a route's series at zero, so dashboards see them before the first event."""
        for scope in () if self.caller_label else ("global", "caller", "route", "upstream"):
            self.rate_limited.labels(scope=scope, route=route)
        for reason in ("connect_error", "status_502", "status_503", "status_504"):
            self.upstream_retries.labels(reason=reason, route=route)
        for credential in ("key", "token"):
            self.upstream_auth_rejections.labels(credential=credential, route=route)
        self.key_fallbacks.labels(route=route)
        self.key_reloads.labels(route=route)
        self.tally.add_route(route)

    def set_active_key(self, slot: str | None, route: str = "/") -> None:
        """Mark which key slot `route` sends first (none: no key configured)."""
        for name in ("primary", "secondary"):
            self.key_active.labels(slot=name, route=route).set(1 if name == slot else 0)


# Redis round trips on loopback or in-cluster take well under a millisecond to a few.
_REDIS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1)
REDIS_ERROR_KINDS = ("timeout", "connection", "auth", "response")
LEASE_OUTCOMES = ("granted", "partial", "empty", "error")


class FleetMetrics:
    """Fleet mode's metrics (gateway/fleet.py); registered only when Redis is configured."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.members = Gauge(
            "cigw_fleet_members",
            "Gateways (pods and worker processes) of this fleet seen alive in Redis.",
            registry=registry,
        )
        self.redis_up = Gauge(
            "cigw_fleet_redis_up", "1 while the last Redis call succeeded.", registry=registry
        )
        self.fallback_active = Gauge(
            "cigw_fleet_fallback_active",
            "1 while this gateway enforces its local share (rate / members) without Redis.",
            registry=registry,
        )
        self.redis_duration = Histogram(
            "cigw_fleet_redis_duration_seconds",
            "Time taken by each Redis call (lease, hold, heartbeat).",
            buckets=_REDIS_BUCKETS,
            registry=registry,
        )
        self.redis_errors = Counter(
            "cigw_fleet_redis_errors",
            "Redis calls that failed, by kind.",
            ["kind"],
            registry=registry,
        )
        self.lease_requests = Counter(
            "cigw_fleet_lease_requests",
            "Budget lease requests to Redis, by outcome.",
            ["outcome"],
            registry=registry,
        )
        self.hold_announcements = Counter(
            "cigw_fleet_hold_announcements",
            "Upstream holds announced to the fleet (sent) or learnt from it (received).",
            ["direction"],
            registry=registry,
        )
        for kind in REDIS_ERROR_KINDS:
            self.redis_errors.labels(kind=kind)
        for outcome in LEASE_OUTCOMES:
            self.lease_requests.labels(outcome=outcome)
        for direction in ("sent", "received"):
            self.hold_announcements.labels(direction=direction)


class RequestTally(Collector):
    """The per-request metrics as plain numbers, handed to prometheus-client at each scrape.

    They change on every request, only on the event loop's thread, so they need no lock;
    prometheus-client's own metric objects take one on each update (four per request,
    2.2 µs of the gateway's CPU per request, tests/perf/README.md). Scrapes run on the
    same loop, so a scrape never sees half a request.
    """

    def __init__(self, *, caller_label: bool = False) -> None:
        self.inflight = 0
        self._caller_label = caller_label
        # (method, code, route, caller) -> [count, created]
        self._requests: dict[tuple[str, int, str, str], list[float]] = {}
        self._durations: dict[tuple[str, str], _Histogram] = {}
        self._upstream: dict[str, _Histogram] = {}

    def started(self) -> None:
        """A request arrived on the proxy listener."""
        self.inflight += 1

    def finished(
        self, method: str, status: int, seconds: float, route: str = NO_ROUTE, caller: str = ""
    ) -> None:
        """A request on `route` was answered (or abandoned) after `seconds`; `caller`: its label."""
        self.inflight -= 1
        method = method if method in KNOWN_METHODS else "OTHER"
        counted = self._requests.get((method, status, route, caller))
        if counted is None:
            counted = self._requests[(method, status, route, caller)] = [0, time.time()]
        counted[0] += 1
        histogram = self._durations.get((method, route))
        if histogram is None:
            histogram = self._durations[(method, route)] = _Histogram()
        histogram.observe(seconds)

    def add_route(self, route: str) -> None:
        """Export `route`'s upstream latency series at zero before its first answer."""
        self._upstream.setdefault(route, _Histogram())

    def upstream_answered(self, seconds: float, route: str = "/") -> None:
        """`route`'s upstream answer head arrived `seconds` after the request was sent."""
        histogram = self._upstream.get(route)
        if histogram is None:
            histogram = self._upstream[route] = _Histogram()
        histogram.observe(seconds)

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily | GaugeMetricFamily]:
        """The four metric families, in prometheus-client's exposition types."""
        requests = CounterMetricFamily(
            "cigw_requests",
            "Requests answered on the proxy listener.",
            labels=["method", "code", "route", "caller"][: 4 if self._caller_label else 3],
        )
        width = 4 if self._caller_label else 3
        for (method, status, route, caller), (count, created) in sorted(self._requests.items()):
            values = [method, str(status), route, caller][:width]
            requests.add_metric(values, count, created=created)
        yield requests
        durations = HistogramMetricFamily(
            "cigw_request_duration_seconds",
            "Time from request received to response finished.",
            labels=["method", "route"],
        )
        for (method, route), histogram in sorted(self._durations.items()):
            durations.add_metric([method, route], histogram.buckets(), histogram.sum)
        yield durations
        upstream = HistogramMetricFamily(
            "cigw_upstream_duration_seconds",
            "Time from sending upstream to response headers.",
            labels=["route"],
        )
        for route, histogram in sorted(self._upstream.items()):
            upstream.add_metric([route], histogram.buckets(), histogram.sum)
        yield upstream
        yield GaugeMetricFamily(
            "cigw_inflight_requests",
            "Requests being handled on the proxy listener.",
            value=self.inflight,
        )


# As prometheus-client writes them ("1.0", "0.0025"), so series keep their names.
_BUCKET_NAMES = [repr(float(bound)) for bound in _LATENCY_BUCKETS] + ["+Inf"]


class _Histogram:
    """Counts per latency bucket (not cumulative) and their sum."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(_LATENCY_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        # The first bound >= seconds: Prometheus buckets are "le" (less or equal).
        self.counts[bisect_left(_LATENCY_BUCKETS, seconds)] += 1
        self.sum += seconds

    def buckets(self) -> list[tuple[str, float]]:
        return list(zip(_BUCKET_NAMES, accumulate(self.counts), strict=True))
