"""The chart renders and lints with real Helm engines, and its manifests match Kubernetes' schemas.

Every documented combination is a values file in helm/ci-gateway/ci/ (the chart-testing
convention); each is rendered by the helm 3 binary and by Helm 4's SDK, linted by both, and
every rendered object is validated offline against the Kubernetes OpenAPI schemas
(kubernetes-validate, strict: unknown fields fail) for Kubernetes 1.29 and the newest release
the package ships.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Final

import kubernetes_validate
import pytest

from .tools import (
    CHART,
    CI,
    CI_VALUES,
    FULLNAME,
    KUBE_VERSIONS,
    Helm,
    Manifest,
    helm4_lint,
    helm4_render,
    of_kind,
    one,
    pod_template,
    read_yaml,
)

# Custom resources of the Prometheus Operator: kubernetes-validate has schemas for Kubernetes'
# own kinds only, so these are the only kinds left out of the schema check. Their content is
# checked by the assertions in test_monitoring.py, and the PrometheusRule's rules by promtool.
CRD_KINDS: Final = frozenset({"ServiceMonitor", "PodMonitor", "PrometheusRule", "Certificate"})

COMBINATIONS: Final = [
    pytest.param(None, id="defaults"),
    *[pytest.param(path, id=name) for name, path in CI.items()],
]


def values_of(values_file: Path | None) -> dict[str, Any]:
    """The user-supplied values of a combination ({} for the defaults)."""
    return {} if values_file is None else dict(read_yaml(values_file))


@pytest.mark.parametrize("values_file", COMBINATIONS)
def test_chart_lints_clean(helm: Helm, values_file: Path | None) -> None:
    """`helm lint --strict` passes with no warning for every combination."""
    result = helm.lint(values_file=values_file)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout
    assert "[ERROR]" not in result.stdout


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("values_file", COMBINATIONS)
def test_manifests_match_kubernetes_schemas(
    helm: Helm, values_file: Path | None, kube_version: str
) -> None:
    """Every rendered object of a Kubernetes kind is valid, strictly, for the Kubernetes version."""
    docs = helm.template(values_file=values_file, kube_version=kube_version)
    validated = []
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(
                f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}"
            )
        validated.append(doc["kind"])
    assert "ConfigMap" in validated
    assert "Deployment" in validated


def test_schema_check_rejects_an_unknown_field(helm: Helm) -> None:
    """The strict schema check fails a Deployment carrying a misspelt field."""
    deployment = copy.deepcopy(one(helm.template(), "Deployment"))
    pod_template(deployment)["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[0], strict=True)


@pytest.mark.parametrize("values_file", COMBINATIONS)
def test_helm4_renders_the_same_objects(helm: Helm, values_file: Path | None) -> None:
    """Helm 4 (helm-python-sdk) renders exactly the objects the helm 3 binary renders."""

    def key(doc: Manifest) -> tuple[str, str]:
        return doc["kind"], doc["metadata"]["name"]

    helm3 = sorted(helm.template(values_file=values_file), key=key)
    helm4 = sorted(helm4_render(values_of(values_file)), key=key)
    assert [key(d) for d in helm4] == [key(d) for d in helm3]
    assert helm4 == helm3


@pytest.mark.parametrize("values_file", COMBINATIONS)
def test_helm4_lint_is_clean(values_file: Path | None) -> None:
    """Helm 4's strict lint reports no warning or error for every combination."""
    assert helm4_lint(values_of(values_file)) == []


def test_default_values_render_a_complete_shared_gateway(helm: Helm) -> None:
    """Defaults render the shared gateway with every object its pods refer to."""
    docs = helm.template()
    assert sorted(d["kind"] for d in docs) == [
        "ConfigMap",
        "Deployment",
        "NetworkPolicy",
        "Service",
        "ServiceAccount",
    ]
    spec = pod_template(one(docs, "Deployment"))["spec"]
    assert spec["serviceAccountName"] == one(docs, "ServiceAccount")["metadata"]["name"]
    gateway = spec["containers"][0]
    assert (
        gateway["envFrom"][0]["configMapRef"]["name"] == one(docs, "ConfigMap")["metadata"]["name"]
    )
    service = one(docs, "Service")
    labels = pod_template(one(docs, "Deployment"))["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    ports = {p["name"] for p in gateway["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports
    # What comes from outside the release: the documented credentials and TLS Secrets, and the
    # cluster's own CA ConfigMap for the caller-token issuer.
    secret_volumes = [v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v]
    assert secret_volumes == [f"{FULLNAME}-credentials", f"{FULLNAME}-tls"]
    config_maps = [v["configMap"]["name"] for v in spec["volumes"] if "configMap" in v]
    assert config_maps == ["kube-root-ca.crt"]


def _features(values: dict[str, Any]) -> set[str]:
    merged = read_yaml(CHART / "values.yaml")

    def get(path: str) -> Any:
        node: Any = values
        default: Any = merged
        for part in path.split("."):
            node = node.get(part, {}) if isinstance(node, dict) else {}
            default = default[part]
        return default if node == {} else node

    features = {f"mode={get('mode')}", f"auth={get('auth.method')}"}
    if get("mode") == "sidecar":
        features.add("sidecar=native" if get("sidecar.native") else "sidecar=classic")
    if get("createSecret.enabled"):
        features.add("createSecret")
    if get("subscriptionKeys.enabled"):
        features.add("subscriptionKeys")
    if get("routes"):
        features.add("routes")
    monitors = [get(f"metrics.{m}.enabled") for m in ("serviceMonitor", "podMonitor")]
    features.add("monitors=on" if any(monitors) else "monitors=off")
    if get("metrics.prometheusRule.enabled"):
        features.add("prometheusRule")
    if get("dashboard.enabled"):
        features.add("dashboard")
    if get("gateway.autoscaling.enabled") and get("mode") == "gateway":
        features.add("autoscaling")
    return features


def test_ci_values_cover_every_documented_combination() -> None:
    """helm/ci-gateway/ci/ holds a values file for each documented shape, credential and monitor."""
    covered = set().union(*(_features(dict(read_yaml(path))) for path in CI_VALUES))
    assert {
        "mode=gateway",
        "mode=sidecar",
        "sidecar=native",
        "sidecar=classic",
        "auth=clientSecret",
        "auth=certificate",
        "auth=workloadIdentity",
        "createSecret",
        "subscriptionKeys",
        "routes",
        "monitors=on",
        "monitors=off",
        "prometheusRule",
        "dashboard",
        "autoscaling",
    } <= covered
    sidecar_wi = [
        p for p in CI_VALUES if {"mode=sidecar", "auth=workloadIdentity"} <= _features(read_yaml(p))
    ]
    gateway_wi = [
        p for p in CI_VALUES if {"mode=gateway", "auth=workloadIdentity"} <= _features(read_yaml(p))
    ]
    assert sidecar_wi
    assert gateway_wi


@pytest.mark.parametrize("values_file", [p for p in CI_VALUES if "sidecar" in p.name])
def test_sidecar_combinations_render_a_demo_pod(helm: Helm, values_file: Path) -> None:
    """Each sidecar combination renders a runnable demo pod carrying the gateway."""
    docs = helm.template(values_file=values_file)
    demo = one(docs, "Deployment", f"{FULLNAME}-demo")
    assert of_kind(docs, "Service") == []
    spec = pod_template(demo)["spec"]
    names = [c["name"] for c in [*(spec.get("initContainers") or []), *spec["containers"]]]
    assert sorted(names) == ["app", "ci-gateway"]
