"""An application chart carrying the sidecar, exactly as helm/ci-gateway/README.md shows it.

The README's example files are extracted, ci-gateway becomes a real dependency through
`helm dependency build` (file:// repository, offline), and the application chart is rendered.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any, Final

import kubernetes_validate
import pytest
import yaml

from .tools import (
    CHART,
    KUBE_VERSIONS,
    RELEASE,
    Helm,
    Manifest,
    container,
    containers,
    env_of,
    one,
    pod_template,
)

EXAMPLE: Final = re.compile(r"<!-- example-app: (\S+) -->\n```yaml\n(.*?)```", re.DOTALL)
INCLUDE_WITH_DOT: Final = re.compile(r'(include "ci-gateway\.[\w.]+") \.(?=[ )])')
APP_DEPLOYMENT: Final = f"{RELEASE}-my-app"
SUBCHART_FULLNAME: Final = f"{RELEASE}-ci-gateway"


def readme_example() -> dict[str, str]:
    """The example application chart's files from the chart README, by path."""
    files = dict(EXAMPLE.findall((CHART / "README.md").read_text(encoding="utf-8")))
    assert set(files) == {"Chart.yaml", "values.yaml", "templates/deployment.yaml"}
    return files


def build_app_chart(
    helm: Helm,
    root: Path,
    *,
    files: dict[str, str] | None = None,
    values: dict[str, Any] | None = None,
) -> Path:
    """Write the example application chart next to a copy of ci-gateway and build its deps."""
    shutil.copytree(CHART, root / "ci-gateway")
    app = root / "my-app"
    for path, text in (files or readme_example()).items():
        target = app / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    if values is not None:
        (app / "values.yaml").write_text(yaml.safe_dump(values), encoding="utf-8")
    result = helm.run("dependency", "build", str(app))
    assert result.returncode == 0, result.stderr
    assert (app / "charts" / "ci-gateway-0.1.0.tgz").is_file()
    return app


def app_pod(docs: list[Manifest]) -> Manifest:
    """The application's pod template."""
    return pod_template(one(docs, "Deployment", APP_DEPLOYMENT))


def test_readme_example_carries_a_native_sidecar(helm: Helm, tmp_path: Path) -> None:
    """The README's application chart renders its pod with ci-gateway as a native sidecar."""
    docs = helm.template(build_app_chart(helm, tmp_path))
    pod = app_pod(docs)
    spec = pod["spec"]
    sidecar = container(spec, "ci-gateway", init=True)
    assert sidecar["restartPolicy"] == "Always"
    assert [c["name"] for c in containers(spec)] == ["app"]
    assert env_of(sidecar)["CIGW_LISTEN"]["value"] == "127.0.0.1:8080"
    assert env_of(container(spec, "app"))["CUSTOMER_INSIGHTS_URL"]["value"] == (
        "http://127.0.0.1:8080"
    )
    # The dependency renders only what the sidecar refers to (mode: sidecar), and the names the
    # application chart computed for it match the objects it rendered.
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "Deployment", "ServiceAccount"]
    assert (
        sidecar["envFrom"][0]["configMapRef"]["name"] == one(docs, "ConfigMap")["metadata"]["name"]
    )
    account = one(docs, "ServiceAccount")
    assert spec["serviceAccountName"] == account["metadata"]["name"] == SUBCHART_FULLNAME
    # Workload identity, as the example's values choose it.
    assert pod["metadata"]["labels"]["azure.workload.identity/use"] == "true"
    assert pod["metadata"]["labels"]["ci-gateway/sidecar"] == SUBCHART_FULLNAME
    assert "azure.workload.identity/client-id" in account["metadata"]["annotations"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "9090"
    assert spec["terminationGracePeriodSeconds"] == 10 + 20 + 5
    mounted = {m["name"] for m in sidecar["volumeMounts"]}
    assert mounted <= {v["name"] for v in spec["volumes"]}


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_readme_example_manifests_are_valid(helm: Helm, tmp_path: Path, kube_version: str) -> None:
    """The application chart's rendered objects pass the strict Kubernetes schema check."""
    for doc in helm.template(build_app_chart(helm, tmp_path), kube_version=kube_version):
        kubernetes_validate.validate(doc, kube_version, strict=True)


def test_readme_example_switches_to_a_classic_sidecar(helm: Helm, tmp_path: Path) -> None:
    """With sidecar.native=false the same templates put the gateway among the containers."""
    values = yaml.safe_load(readme_example()["values.yaml"])
    values["ci-gateway"]["sidecar"] = {"native": False}
    docs = helm.template(build_app_chart(helm, tmp_path, values=values))
    spec = app_pod(docs)["spec"]
    assert containers(spec, init=True) == []
    assert sorted(c["name"] for c in containers(spec)) == ["app", "ci-gateway"]
    assert "restartPolicy" not in container(spec, "ci-gateway")


def test_aliased_dependency_uses_the_dict_form(helm: Helm, tmp_path: Path) -> None:
    """An aliased dependency passes (dict "root" . "values" .Values.<alias>) and still resolves."""
    files = readme_example()
    files["Chart.yaml"] = files["Chart.yaml"].replace(
        "repository: file://../ci-gateway", "repository: file://../ci-gateway\n    alias: gateway"
    )
    files["templates/deployment.yaml"] = INCLUDE_WITH_DOT.sub(
        r'\1 (dict "root" . "values" .Values.gateway)', files["templates/deployment.yaml"]
    )
    assert "(dict" in files["templates/deployment.yaml"]
    assert not re.search(r'"ci-gateway[\w.]*" \.', files["templates/deployment.yaml"])
    values = {
        "gateway": {
            **yaml.safe_load(files["values.yaml"])["ci-gateway"],
            "fullnameOverride": "my-app-gateway",
            "auth": {"method": "clientSecret", "existingSecret": "my-app-credentials"},
        }
    }
    files["values.yaml"] = yaml.safe_dump(values)
    docs = helm.template(build_app_chart(helm, tmp_path, files=files))
    spec = app_pod(docs)["spec"]
    sidecar = container(spec, "ci-gateway", init=True)
    assert sidecar["envFrom"][0]["configMapRef"]["name"] == "my-app-gateway"
    assert one(docs, "ConfigMap")["metadata"]["name"] == "my-app-gateway"
    secrets = [v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v]
    assert secrets == ["my-app-credentials"]


def test_missing_values_fail_with_the_dict_form_advice(helm: Helm, tmp_path: Path) -> None:
    """An aliased dependency included with "." fails, saying how to pass its values."""
    files = readme_example()
    files["Chart.yaml"] = files["Chart.yaml"].replace(
        "repository: file://../ci-gateway", "repository: file://../ci-gateway\n    alias: gateway"
    )
    files["values.yaml"] = files["values.yaml"].replace("ci-gateway:", "gateway:")
    error = helm.template_error(build_app_chart(helm, tmp_path, files=files))
    assert "no ci-gateway values found" in error
    assert '(dict "root" . "values" .Values.<alias>)' in error


def test_public_templates_are_documented() -> None:
    """Every public ci-gateway.sidecar* template is listed in the README's template table."""
    defined = set(
        re.findall(
            r'define "(ci-gateway\.sidecar[\w.]*)"',
            (CHART / "templates" / "_sidecar.tpl").read_text(encoding="utf-8"),
        )
    )
    readme = (CHART / "README.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `(ci-gateway\.sidecar[\w.]*)` \|", readme, re.MULTILINE))
    assert documented == defined - {"ci-gateway.sidecar.context"}
