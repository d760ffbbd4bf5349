"""Scrape configuration, alert rules (promtool) and the Grafana dashboard, against the metrics."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pytest
import yaml

from .interface import (
    CHART_METRICS,
    LABEL_VALUES,
    METRICS_PATH,
    TARGET_LABELS,
    family_of,
    labels_allowed,
    series_in,
)
from .tools import (
    CHART,
    CI,
    FULLNAME,
    Helm,
    Manifest,
    gateway_containers,
    of_kind,
    one,
    pod_template,
    read_yaml,
)

DASHBOARD: Final = CHART / "dashboards" / "ci-gateway.json"
ALERTS: Final = frozenset(
    {
        "CiGatewayTokenRenewalFailing",
        "CiGatewayNoValidToken",
        "CiGatewaySubscriptionKeyFallback",
        "CiGatewayUpstream5xxRatioHigh",
        "CiGatewayLocal429RatioHigh",
        "CiGatewayFleetRedisDown",
        "CiGatewayFleetKeepsMeetingHolds",
    }
)
SELECTOR: Final = re.compile(r"(cigw_[a-z0-9_]+)\{([^}]*)\}")
MATCHER: Final = re.compile(r'\s*([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"([^"]*)"\s*')
GROUPING: Final = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")


def check_promql(expr: str) -> None:
    """Metric names, label names and selected label values of `expr` match CHART_METRICS."""
    names = series_in(expr)
    assert names, f"no cigw_* metric in {expr!r}"
    for name in names:
        assert family_of(name) is not None, f"{name} is not a gateway metric"
    for name, matchers in SELECTOR.findall(expr):
        for label, op, value in MATCHER.findall(matchers):
            assert label in labels_allowed(name), f"{name} has no label {label!r}"
            known = LABEL_VALUES.get((family_of(name) or "", label))
            if known is not None and op in {"=", "=~"}:
                assert set(value.split("|")) <= known, f"{name}{{{label}}} never is {value!r}"
    allowed = set().union(*(labels_allowed(n) for n in names))
    for grouping in GROUPING.findall(expr):
        labels = {label.strip() for label in grouping.split(",") if label.strip()}
        assert labels <= allowed, f"{labels - allowed} are not labels of {names}"


def rules_of(docs: list[Manifest]) -> dict[str, Any]:
    """The rule groups of the rendered PrometheusRule, as a Prometheus rules file."""
    spec: dict[str, Any] = one(docs, "PrometheusRule")["spec"]
    return spec


def run_promtool(promtool: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """promtool with `args`."""
    return subprocess.run(
        [str(promtool), *args], capture_output=True, text=True, timeout=60, check=False
    )


RULE_COMBINATIONS: Final = [
    pytest.param(CI["gateway-secret"], {}, id="gateway"),
    pytest.param(CI["sidecar-native-secret"], {}, id="sidecar"),
    pytest.param(
        CI["gateway-secret"],
        {"metrics": {"prometheusRule": {"upstream5xxRatio": 0.01, "local429Ratio": 0.5}}},
        id="custom-thresholds",
    ),
]


@pytest.mark.parametrize(("values_file", "values"), RULE_COMBINATIONS)
def test_promtool_accepts_the_alert_rules(
    helm: Helm, promtool: Path, tmp_path: Path, values_file: Path, values: dict[str, Any]
) -> None:
    """`promtool check rules` accepts the PrometheusRule's rules."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        yaml.safe_dump(rules_of(helm.template(values_file=values_file, values=values)))
    )
    result = run_promtool(promtool, "check", "rules", str(rules))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


def test_promtool_rejects_a_broken_rule(promtool: Path, tmp_path: Path) -> None:
    """The promtool check fails on a rule whose expression does not parse."""
    rules = tmp_path / "rules.yaml"
    broken = {"groups": [{"name": "g", "rules": [{"alert": "A", "expr": "sum(rate(x[5m])"}]}]}
    rules.write_text(yaml.safe_dump(broken))
    assert run_promtool(promtool, "check", "rules", str(rules)).returncode != 0


def test_alerts_cover_the_documented_conditions_on_known_metrics(helm: Helm) -> None:
    """The documented alerts exist, on gateway metrics with valid labels, with a severity."""
    rules = rules_of(helm.template(values_file=CI["gateway-secret"]))
    alerts = {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]}
    assert set(alerts) == ALERTS
    for rule in alerts.values():
        check_promql(rule["expr"])
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert {"summary", "description"} <= set(rule["annotations"])


SERIES_LABELS: Final = {"namespace": "apps", "job": "apps/cigw", "pod": "cigw-7d9f-x2k4"}


def _series(name: str, **labels: str) -> str:
    merged = {**SERIES_LABELS, **labels}
    return name + "{" + ", ".join(f'{k}="{v}"' for k, v in merged.items()) + "}"


@dataclass(frozen=True)
class Scenario:
    """Input series for `promtool test rules` and whether `alert` fires at `at`."""

    alert: str
    series: dict[str, str]
    fires: bool
    at: str = "25m"
    grouping: tuple[str, ...] = ("namespace", "job", "pod")
    value: str = field(default="", compare=False)


SCENARIOS: Final = [
    pytest.param(
        Scenario(
            "CiGatewayTokenRenewalFailing",
            {
                _series("cigw_token_renewal_failures_total"): "0+1x40",
                _series("cigw_token_requests_total", outcome="success"): "3x40",
            },
            fires=True,
        ),
        id="renewal-failing",
    ),
    pytest.param(
        Scenario(
            "CiGatewayTokenRenewalFailing",
            {
                _series("cigw_token_renewal_failures_total"): "0+1x40",
                _series("cigw_token_requests_total", outcome="success"): "3+1x40",
            },
            fires=False,
        ),
        id="renewal-recovers",
    ),
    pytest.param(
        Scenario(
            "CiGatewayNoValidToken",
            {
                _series("cigw_ready"): "0x40",
                _series("cigw_token_expiry_timestamp_seconds"): "100000x40",
            },
            fires=True,
        ),
        id="not-ready",
    ),
    pytest.param(
        Scenario(
            "CiGatewayNoValidToken",
            {
                _series("cigw_ready"): "1x40",
                _series("cigw_token_expiry_timestamp_seconds"): "60x40",
            },
            fires=True,
        ),
        id="token-expired",
    ),
    pytest.param(
        Scenario(
            "CiGatewayNoValidToken",
            {
                _series("cigw_ready"): "1 0 0 1x40",
                _series("cigw_token_expiry_timestamp_seconds"): "100000x40",
            },
            fires=False,
        ),
        id="brief-drain",
    ),
    pytest.param(
        Scenario(
            "CiGatewaySubscriptionKeyFallback",
            {_series("cigw_subscription_key_fallbacks_total"): "0 0 0 1x40"},
            fires=True,
            at="10m",
        ),
        id="key-fallback",
    ),
    pytest.param(
        Scenario(
            "CiGatewaySubscriptionKeyFallback",
            {_series("cigw_subscription_key_fallbacks_total"): "0x40"},
            fires=False,
        ),
        id="no-key-fallback",
    ),
    pytest.param(
        Scenario(
            "CiGatewayUpstream5xxRatioHigh",
            {
                _series("cigw_requests_total", method="GET", code="200"): "0+90x40",
                _series("cigw_requests_total", method="GET", code="503"): "0+10x40",
            },
            fires=True,
            grouping=("namespace", "job"),
            value="10%",
        ),
        id="5xx-ratio-high",
    ),
    pytest.param(
        Scenario(
            "CiGatewayUpstream5xxRatioHigh",
            {
                _series("cigw_requests_total", method="GET", code="200"): "0+99x40",
                _series("cigw_requests_total", method="GET", code="502"): "0+1x40",
            },
            fires=False,
        ),
        id="5xx-ratio-low",
    ),
    pytest.param(
        Scenario(
            "CiGatewayLocal429RatioHigh",
            {
                _series("cigw_requests_total", method="GET", code="200"): "0+70x40",
                _series("cigw_requests_total", method="GET", code="429"): "0+30x40",
                _series("cigw_rate_limited_total", scope="caller"): "0+30x40",
            },
            fires=True,
            grouping=("namespace", "job"),
            value="30%",
        ),
        id="local-429-ratio-high",
    ),
    pytest.param(
        Scenario(
            "CiGatewayLocal429RatioHigh",
            {
                _series("cigw_requests_total", method="GET", code="200"): "0+70x40",
                _series("cigw_requests_total", method="GET", code="429"): "0+30x40",
                _series("cigw_rate_limited_total", scope="upstream"): "0+30x40",
            },
            fires=False,
        ),
        id="upstream-hold-is-not-local",
    ),
    pytest.param(
        Scenario(
            "CiGatewayFleetRedisDown",
            {_series("cigw_fleet_fallback_active"): "0 0 1x40"},
            fires=True,
        ),
        id="fleet-redis-down",
    ),
    pytest.param(
        Scenario(
            "CiGatewayFleetRedisDown",
            {_series("cigw_fleet_fallback_active"): "0 1 1 0x40"},
            fires=False,
        ),
        id="fleet-redis-blip",
    ),
    pytest.param(
        Scenario(
            "CiGatewayFleetKeepsMeetingHolds",
            {_series("cigw_fleet_hold_announcements_total", direction="sent"): "0+1x40"},
            fires=True,
            grouping=("namespace", "job"),
        ),
        id="fleet-keeps-meeting-holds",
    ),
    pytest.param(
        Scenario(
            "CiGatewayFleetKeepsMeetingHolds",
            {
                _series("cigw_fleet_hold_announcements_total", direction="sent"): "0 1 2x40",
                _series("cigw_fleet_hold_announcements_total", direction="received"): "0+9x40",
            },
            fires=False,
        ),
        id="fleet-rare-holds",
    ),
]


def _expected_annotations(
    rule: dict[str, Any], labels: dict[str, str], value: str
) -> dict[str, str]:
    """The rule's annotations as Prometheus expands them for these labels and value."""

    def expand(text: str) -> str:
        text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], text)
        return text.replace("{{ $value | humanizePercentage }}", value)

    return {key: expand(text) for key, text in rule["annotations"].items()}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_alert_fires_exactly_in_its_scenario(
    helm: Helm, promtool: Path, tmp_path: Path, scenario: Scenario
) -> None:
    """`promtool test rules` shows the alert firing (with its labels and text) or staying quiet."""
    rules = rules_of(helm.template(values_file=CI["gateway-secret"]))
    rule = next(r for g in rules["groups"] for r in g["rules"] if r["alert"] == scenario.alert)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
    expected: list[dict[str, Any]] = []
    if scenario.fires:
        labels = {k: SERIES_LABELS[k] for k in scenario.grouping} | rule["labels"]
        annotations = _expected_annotations(rule, labels, scenario.value)
        expected = [{"exp_labels": labels, "exp_annotations": annotations}]
    unit = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in scenario.series.items()],
                "alert_rule_test": [
                    {"eval_time": scenario.at, "alertname": scenario.alert, "exp_alerts": expected}
                ],
            }
        ],
    }
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(unit))
    result = subprocess.run(
        [str(promtool), "test", "rules", "test.yaml"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in _panels(dashboard)
        for target in panel.get("targets", [])
    ]


def test_dashboard_queries_use_only_gateway_metrics() -> None:
    """Every dashboard query names gateway metrics, with labels and values the gateway exports."""
    exprs = _exprs(_dashboard())
    assert exprs
    for _, expr in exprs:
        check_promql(expr)


def test_dashboard_queries_are_valid_promql(promtool: Path, tmp_path: Path) -> None:
    """promtool parses every dashboard query (Grafana's variables replaced by sample values)."""
    substitutions = {"$__rate_interval": "5m", "$namespace": ".*", "$job": ".*"}
    rules = []
    for number, (_, expr) in enumerate(_exprs(_dashboard())):
        for variable, sample in substitutions.items():
            expr = expr.replace(variable, sample)  # noqa: PLW2901 -- a substituted copy
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query_{number}", "expr": expr})
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run_promtool(promtool, "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("title", "metric"),
    [
        ("Requests by status", "cigw_requests_total"),
        ("Request latency percentiles", "cigw_request_duration_seconds_bucket"),
        ("Token expiry countdown", "cigw_token_expiry_timestamp_seconds"),
        ("Active subscription key slot", "cigw_subscription_key_active"),
        ("Rate-limited requests", "cigw_rate_limited_total"),
        ("Upstream hold", "cigw_upstream_hold_seconds"),
    ],
)
def test_dashboard_has_the_documented_panels(title: str, metric: str) -> None:
    """The dashboard shows each documented view, built on the metric that measures it."""
    exprs = [expr for panel_title, expr in _exprs(_dashboard()) if panel_title == title]
    assert exprs, f"no panel {title!r}"
    assert any(metric in series_in(expr) for expr in exprs)


def test_dashboard_is_portable() -> None:
    """The dashboard picks its data source and scope through variables and has a stable uid."""
    dashboard = _dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert {"namespace", "job"} <= set(variables)
    assert dashboard["uid"] == "ci-gateway"
    ids = [panel["id"] for panel in _panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in _panels(dashboard):
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
    for _, expr in _exprs(dashboard):
        for name, matchers in SELECTOR.findall(expr):
            assert 'namespace=~"$namespace"' in matchers, f"{name} in {expr!r} ignores $namespace"


def test_dashboard_configmap_carries_the_file_for_grafana(helm: Helm) -> None:
    """dashboard.enabled ships the JSON file verbatim in a ConfigMap the Grafana sidecar finds."""
    docs = helm.template(values_file=CI["gateway-secret"])
    configmap = one(docs, "ConfigMap", f"{FULLNAME}-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["ci-gateway.json"]) == _dashboard()
    assert [d for d in helm.template() if d["metadata"]["name"].endswith("-dashboard")] == []


def test_metric_list_is_consistent() -> None:
    """Counter names end in _total, and every listed label value belongs to a listed label."""
    for name, metric in CHART_METRICS.items():
        assert name.startswith("cigw_")
        assert name.endswith("_total") == (metric.kind == "counter"), name
    for family, label in LABEL_VALUES:
        assert label in CHART_METRICS[family].labels
    assert not TARGET_LABELS & {label for m in CHART_METRICS.values() for label in m.labels}


def test_service_monitor_scrapes_the_admin_port(helm: Helm) -> None:
    """The ServiceMonitor selects the gateway Service and scrapes its admin port's /metrics."""
    docs = helm.template(values_file=CI["gateway-secret"])
    monitor = one(docs, "ServiceMonitor")["spec"]
    service = one(docs, "Service")
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["port"] == "cigw-admin"
    assert endpoint["path"] == METRICS_PATH


@pytest.mark.parametrize("combination", ["gateway-workload-identity", "sidecar-native-secret"])
def test_pod_monitor_selects_pods_carrying_the_gateway(helm: Helm, combination: str) -> None:
    """The PodMonitor selects the pods with the gateway container and scrapes its admin port."""
    docs = helm.template(values_file=CI[combination])
    monitor = one(docs, "PodMonitor")["spec"]
    ((workload, gateway, _),) = gateway_containers(docs)
    labels = pod_template(workload)["metadata"]["labels"]
    assert monitor["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = monitor["podMetricsEndpoints"]
    assert endpoint["port"] in {p["name"] for p in gateway["ports"]}
    assert endpoint["path"] == METRICS_PATH


@pytest.mark.parametrize(
    ("values_file", "annotated"),
    [
        pytest.param(None, True, id="gateway"),
        pytest.param(CI["sidecar-native-secret"], True, id="sidecar"),
        pytest.param(CI["sidecar-classic-certificate"], False, id="annotations-off"),
    ],
)
def test_scrape_annotations_point_at_the_admin_port(
    helm: Helm, values_file: Path | None, annotated: bool
) -> None:
    """prometheus.io/* annotations name the admin port and /metrics, unless turned off."""
    docs = helm.template(values_file=values_file)
    ((workload, gateway, _),) = gateway_containers(docs)
    annotations = pod_template(workload)["metadata"]["annotations"]
    if not annotated:
        assert not [key for key in annotations if key.startswith("prometheus.io/")]
        return
    admin = next(p for p in gateway["ports"] if p["name"] == "cigw-admin")
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(admin["containerPort"])
    assert annotations["prometheus.io/path"] == METRICS_PATH


def test_monitoring_objects_are_off_by_default(helm: Helm) -> None:
    """Without opting in, no Prometheus Operator object or dashboard is rendered."""
    kinds = {d["kind"] for d in helm.template()}
    assert not kinds & {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
    assert (
        of_kind(helm.template(values_file=CI["gateway-workload-identity"]), "PrometheusRule") == []
    )
    assert read_yaml(CHART / "values.yaml")["metrics"]["prometheusRule"]["enabled"] is False
