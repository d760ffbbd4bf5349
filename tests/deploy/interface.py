"""What the Dockerfile, the chart, its alerts and its dashboard rely on from the gateway.

The single place that lists the gateway's metric names and environment variables as the
deployment artefacts use them. Deployment tests check the artefacts against these lists; a test
of the running gateway can check the lists against what it really exports and reads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, Literal

MetricKind = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True)
class Metric:
    """One metric family as PromQL names it (counters with their _total suffix)."""

    kind: MetricKind
    labels: frozenset[str] = frozenset()


def _metric(kind: MetricKind, *labels: str) -> Metric:
    return Metric(kind, frozenset(labels))


# Names as they appear in PromQL and in the text exposition.
CHART_METRICS: Final = MappingProxyType(
    {
        "cigw_requests_total": _metric("counter", "method", "code", "route"),
        "cigw_request_duration_seconds": _metric("histogram", "method", "route"),
        "cigw_upstream_duration_seconds": _metric("histogram", "route"),
        "cigw_inflight_requests": _metric("gauge"),
        "cigw_token_requests_total": _metric("counter", "outcome"),
        "cigw_token_expiry_timestamp_seconds": _metric("gauge"),
        "cigw_subscription_key_active": _metric("gauge", "slot", "route"),
        "cigw_subscription_key_fallbacks_total": _metric("counter", "route"),
        "cigw_build_info": _metric("gauge", "version"),
        "cigw_rate_limited_total": _metric("counter", "scope", "route"),
        "cigw_upstream_hold_seconds": _metric("gauge", "route"),
        "cigw_upstream_retries_total": _metric("counter", "reason", "route"),
        "cigw_retry_budget_exhausted_total": _metric("counter"),
        "cigw_ready": _metric("gauge"),
        "cigw_token_renewal_failures_total": _metric("counter"),
        # Fleet mode (gateway/fleet.py), registered only with CIGW_REDIS_URL.
        "cigw_fleet_members": _metric("gauge"),
        "cigw_fleet_redis_up": _metric("gauge"),
        "cigw_fleet_fallback_active": _metric("gauge"),
        "cigw_fleet_redis_duration_seconds": _metric("histogram"),
        "cigw_fleet_redis_errors_total": _metric("counter", "kind"),
        "cigw_fleet_lease_requests_total": _metric("counter", "outcome"),
        "cigw_fleet_hold_announcements_total": _metric("counter", "direction"),
    }
)

# Exported only in fleet mode (CIGW_REDIS_URL): tests/fleet checks a fleet gateway has them.
FLEET_METRICS: Final = frozenset(name for name in CHART_METRICS if name.startswith("cigw_fleet_"))

# Values some labels take, where alerts and panels select on them.
LABEL_VALUES: Final = MappingProxyType(
    {
        ("cigw_token_requests_total", "outcome"): frozenset({"success", "failure"}),
        ("cigw_subscription_key_active", "slot"): frozenset({"primary", "secondary"}),
        ("cigw_fleet_hold_announcements_total", "direction"): frozenset({"sent", "received"}),
        ("cigw_rate_limited_total", "scope"): frozenset({"global", "caller", "route", "upstream"}),
    }
)

# Labels that Prometheus (or the Prometheus Operator's relabelling) adds to every scraped series.
TARGET_LABELS: Final = frozenset(
    {"namespace", "job", "pod", "instance", "container", "service", "endpoint"}
)

_HISTOGRAM_SUFFIXES: Final = ("_bucket", "_sum", "_count")
_SERIES_NAME: Final = re.compile(r"\bcigw_[a-z0-9_]+")


def family_of(series: str) -> str | None:
    """The CHART_METRICS family a series name belongs to (histogram suffixes resolved), or None."""
    if series in CHART_METRICS:
        return series
    for suffix in _HISTOGRAM_SUFFIXES:
        base = series.removesuffix(suffix)
        if base != series and CHART_METRICS.get(base, Metric("gauge")).kind == "histogram":
            return base
    return None


def series_in(promql: str) -> set[str]:
    """Every cigw_* series name a PromQL expression mentions."""
    return set(_SERIES_NAME.findall(promql))


def labels_allowed(series: str) -> frozenset[str]:
    """Label names a selector on `series` may use."""
    family = family_of(series)
    if family is None:
        return frozenset()
    extra = {"le"} if series.endswith("_bucket") else set()
    return CHART_METRICS[family].labels | TARGET_LABELS | extra


# Every environment variable the gateway reads, as documented in its public interface.
GATEWAY_ENV: Final = frozenset(
    {
        "CIGW_LISTEN",
        "CIGW_ADMIN_LISTEN",
        "CIGW_CONFIG",
        "CIGW_UPSTREAM_URL",
        "CIGW_SCOPE",
        "AZURE_TENANT_ID",
        "AZURE_CLIENT_ID",
        "AZURE_CLIENT_SECRET",
        "CIGW_CLIENT_SECRET_FILE",
        "AZURE_CLIENT_CERTIFICATE_PATH",
        "AZURE_CLIENT_CERTIFICATE_PASSWORD",
        "AZURE_FEDERATED_TOKEN_FILE",
        "AZURE_AUTHORITY_HOST",
        "CIGW_INSTANCE_DISCOVERY",
        "CIGW_SUBSCRIPTION_KEY",
        "CIGW_SUBSCRIPTION_KEY_FILE",
        "CIGW_SUBSCRIPTION_KEY_SECONDARY",
        "CIGW_SUBSCRIPTION_KEY_SECONDARY_FILE",
        "CIGW_UPSTREAM_TIMEOUT",
        "CIGW_SHUTDOWN_GRACE",
        "CIGW_LOG_LEVEL",
        "CIGW_LOG_FORMAT",
        "CIGW_RATE_LIMIT_RPS",
        "CIGW_RATE_LIMIT_BURST",
        "CIGW_RATE_LIMIT_CALLER_HEADER",
        "CIGW_RATE_LIMIT_CALLER_RPS",
        "CIGW_RATE_LIMIT_CALLER_BURST",
        "CIGW_RETRY_ATTEMPTS",
        "CIGW_MAX_BODY_BYTES",
        "CIGW_MAX_CONNECTIONS",
        "CIGW_WORKERS",
        "CIGW_REDIS_URL",
        "CIGW_REDIS_PASSWORD_FILE",
        "CIGW_REDIS_CA_FILE",
        "CIGW_REDIS_TIMEOUT",
        "CIGW_FLEET_NAME",
        "CIGW_TLS_CERT_FILE",
        "CIGW_TLS_KEY_FILE",
        "CIGW_CALLER_AUTH",
        "CIGW_CALLER_ISSUER",
        "CIGW_CALLER_JWKS_URL",
        "CIGW_CALLER_CA_FILE",
        "CIGW_CALLER_AUDIENCE",
        "CIGW_CALLER_ALLOW",
        "CIGW_ALLOW_UNAUTHENTICATED_CALLERS",
        "CIGW_RATE_LIMIT_CALLERS",
        "CIGW_PRIVILEGED_HEADERS_ALLOW",
    }
)

# Variables whose value is itself a secret: never in a ConfigMap, never a literal env value.
SECRET_ENV: Final = frozenset(
    {
        "AZURE_CLIENT_SECRET",
        "AZURE_CLIENT_CERTIFICATE_PASSWORD",
        "CIGW_SUBSCRIPTION_KEY",
        "CIGW_SUBSCRIPTION_KEY_SECONDARY",
    }
)

# The admin listener's endpoints the probes and scrapes use.
HEALTH_PATH: Final = "/healthz"
READY_PATH: Final = "/readyz"
METRICS_PATH: Final = "/metrics"
