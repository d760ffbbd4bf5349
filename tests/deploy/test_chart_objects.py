"""What the rendered objects say: sidecar shape, probes, security, secrets, identity, shutdown."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any, Final

import pytest

from .interface import GATEWAY_ENV, HEALTH_PATH, READY_PATH, SECRET_ENV
from .tools import (
    CHART,
    CI,
    CI_VALUES,
    FULLNAME,
    Helm,
    Manifest,
    container,
    containers,
    env_of,
    gateway_containers,
    of_kind,
    one,
    pod_template,
    read_yaml,
)

ALL_COMBINATIONS: Final = [None, *CI_VALUES]
IDS: Final = ["defaults", *CI]
TENANT: Final = "00000000-0000-0000-0000-000000000001"
CLIENT: Final = "00000000-0000-0000-0000-000000000002"
IDS_SET: Final = {"tenantId": TENANT, "clientId": CLIENT}
TMP: Final = "/tmp"  # noqa: S108 -- the container's path, not one this test writes to


def demo(helm: Helm, combination: str, **values: Any) -> tuple[list[Manifest], Manifest]:
    """Render a ci/ combination (plus `values`) and return its objects and demo pod spec."""
    docs = helm.template(values_file=CI[combination], values=values or None)
    return docs, pod_template(one(docs, "Deployment", f"{FULLNAME}-demo"))["spec"]


def configmap_data(docs: list[Manifest]) -> dict[str, str]:
    """The gateway's settings ConfigMap."""
    data: dict[str, str] = one(docs, "ConfigMap", FULLNAME)["data"]
    return data


def probe_path(c: Manifest, probe: str) -> str:
    """The HTTP path of one of a container's probes, which must target the admin port."""
    http = c[probe]["httpGet"]
    assert http["port"] == "cigw-admin"
    path: str = http["path"]
    return path


def test_native_sidecar_is_an_always_restarting_init_container(helm: Helm) -> None:
    """The default sidecar is an initContainers entry with restartPolicy Always, not a container."""
    _, spec = demo(helm, "sidecar-native-secret")
    sidecar = container(spec, "ci-gateway", init=True)
    assert sidecar["restartPolicy"] == "Always"
    assert [c["name"] for c in containers(spec)] == ["app"]
    assert probe_path(sidecar, "startupProbe") == READY_PATH
    assert probe_path(sidecar, "livenessProbe") == HEALTH_PATH
    assert probe_path(sidecar, "readinessProbe") == READY_PATH
    # The kubelet stops a native sidecar after the application: no preStop sleep needed.
    assert "lifecycle" not in sidecar


def test_startup_probe_allows_time_for_the_first_token(helm: Helm) -> None:
    """The startup probe (which holds the application back) tolerates a slow first token."""
    _, spec = demo(helm, "sidecar-native-secret")
    startup = container(spec, "ci-gateway", init=True)["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60
    assert startup["timeoutSeconds"] <= startup["periodSeconds"]


def test_classic_sidecar_is_a_plain_container(helm: Helm) -> None:
    """sidecar.native=false renders the gateway as an extra container with a preStop sleep."""
    _, spec = demo(helm, "sidecar-classic-certificate")
    sidecar = container(spec, "ci-gateway")
    assert "restartPolicy" not in sidecar
    assert containers(spec, init=True) == []
    assert sidecar["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    assert probe_path(sidecar, "startupProbe") == READY_PATH


@pytest.mark.parametrize("combination", ["sidecar-native-secret", "sidecar-classic-certificate"])
def test_sidecar_proxy_listens_on_loopback_only(helm: Helm, combination: str) -> None:
    """In a sidecar the proxy binds 127.0.0.1 and only the admin port is declared on the pod IP."""
    docs, spec = demo(helm, combination)
    [(_, sidecar, _)] = gateway_containers(docs)
    env = env_of(sidecar)
    assert env["CIGW_LISTEN"]["value"] == "127.0.0.1:8080"
    assert env["CIGW_ADMIN_LISTEN"]["value"] == "0.0.0.0:9090"
    assert [(p["name"], p["containerPort"]) for p in sidecar["ports"]] == [("cigw-admin", 9090)]
    assert spec.get("hostNetwork") is not True


def test_shared_gateway_listens_on_the_pod_ip_behind_a_network_policy(helm: Helm) -> None:
    """The shared gateway exposes its proxy on the pod IP, and only labelled clients may call."""
    docs = helm.template()
    deployment = one(docs, "Deployment", FULLNAME)
    gateway = container(pod_template(deployment)["spec"], "ci-gateway")
    assert env_of(gateway)["CIGW_LISTEN"]["value"] == "0.0.0.0:8080"
    assert {p["name"] for p in gateway["ports"]} == {"cigw-proxy", "cigw-admin"}
    policy = one(docs, "NetworkPolicy")["spec"]
    assert (
        policy["podSelector"]["matchLabels"].items()
        <= pod_template(deployment)["metadata"]["labels"].items()
    )
    assert policy["policyTypes"] == ["Ingress"]
    proxy_rule, admin_rule = policy["ingress"]
    assert proxy_rule["ports"] == [{"port": "cigw-proxy", "protocol": "TCP"}]
    assert proxy_rule["from"] == [{"podSelector": {"matchLabels": {"ci-gateway/client": FULLNAME}}}]
    assert admin_rule["ports"] == [{"port": "cigw-admin", "protocol": "TCP"}]


def test_network_policy_clients_are_configurable(helm: Helm) -> None:
    """gateway.networkPolicy.clients replaces the default peer list for the proxy port."""
    docs = helm.template(values_file=CI["gateway-secret"])
    proxy_rule = one(docs, "NetworkPolicy")["spec"]["ingress"][0]
    assert (
        proxy_rule["from"] == read_yaml(CI["gateway-secret"])["gateway"]["networkPolicy"]["clients"]
    )


@pytest.mark.parametrize("values_file", ALL_COMBINATIONS, ids=IDS)
def test_gateway_containers_are_locked_down(helm: Helm, values_file: Path | None) -> None:
    """Every gateway container runs non-root, read-only, unprivileged, without capabilities."""
    docs = helm.template(values_file=values_file)
    found = gateway_containers(docs)
    assert found
    for workload, c, _ in found:
        security = c["securityContext"]
        assert security["runAsNonRoot"] is True
        assert security["runAsUser"] != 0
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        assert "add" not in security["capabilities"]
        assert security["seccompProfile"]["type"] == "RuntimeDefault"
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        assert TMP in mounts, "the read-only root needs a writable /tmp"
        for mount in mounts.values():
            assert "subPath" not in mount, "subPath mounts never see a rotated Secret"
            assert mount["mountPath"] == TMP or mount["readOnly"] is True
        pod = pod_template(workload)["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["automountServiceAccountToken"] is False


def test_resources_follow_the_benchmark_figures(helm: Helm) -> None:
    """Requests fit 1000 requests/s at the measured 0.25 vCPU and 54 MB RSS."""
    _, gateway, _ = gateway_containers(helm.template())[0]
    resources = gateway["resources"]
    assert resources["requests"]["cpu"] == "250m"
    mebibyte = 1024 * 1024
    request = int(resources["requests"]["memory"].removesuffix("Mi")) * mebibyte
    limit = int(resources["limits"]["memory"].removesuffix("Mi")) * mebibyte
    assert request >= 54_000_000
    assert limit >= request
    values_text = (CHART / "values.yaml").read_text(encoding="utf-8")
    assert "make bench" in values_text
    assert "tests/perf/RESULTS.md" in values_text


@pytest.mark.parametrize(
    ("shutdown_grace", "pre_stop"),
    [pytest.param(20, 5, id="defaults"), pytest.param(45, 10, id="long-drain"), (0, 0)],
)
def test_shared_gateway_grace_period_covers_pre_stop_and_drain(
    helm: Helm, shutdown_grace: int, pre_stop: int
) -> None:
    """terminationGracePeriodSeconds = preStop sleep + CIGW_SHUTDOWN_GRACE + 5 s of margin."""
    docs = helm.template(
        values={"config": {"shutdownGraceSeconds": shutdown_grace}, "preStopSleepSeconds": pre_stop}
    )
    spec = pod_template(one(docs, "Deployment"))["spec"]
    gateway = container(spec, "ci-gateway")
    assert configmap_data(docs)["CIGW_SHUTDOWN_GRACE"] == str(shutdown_grace)
    assert spec["terminationGracePeriodSeconds"] == pre_stop + shutdown_grace + 5
    if pre_stop:
        assert gateway["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(pre_stop)]
    else:
        assert "lifecycle" not in gateway


def test_sidecar_pod_grace_period_adds_the_drain_to_the_application_time(helm: Helm) -> None:
    """The demo pod's grace period is its application's 5 s plus the native sidecar's drain."""
    _, spec = demo(helm, "sidecar-native-secret", config={"shutdownGraceSeconds": 40})
    assert spec["terminationGracePeriodSeconds"] == 5 + 40 + 5


def test_too_short_grace_period_is_rejected(helm: Helm) -> None:
    """An explicit terminationGracePeriodSeconds shorter than preStop + drain fails the render."""
    error = helm.template_error(values={"terminationGracePeriodSeconds": 10})
    assert "terminationGracePeriodSeconds=10 is shorter than the 30 s" in error


CANARIES: Final = {
    "clientSecret": "canary-client-secret-Qx7v2P",
    "subscriptionKey": "canary-primary-key-8d1e0c",
    "subscriptionKeySecondary": "canary-secondary-key-5b9f3a",
    "certificate": "-----BEGIN CERTIFICATE-----canary-cert-R4k2-----END CERTIFICATE-----",
    "certificatePassword": "canary-cert-password-M2s8",
}


def _spellings(secret: str) -> list[str]:
    return [secret, base64.b64encode(secret.encode()).decode()]


@pytest.mark.parametrize(
    ("method", "used"),
    [
        ("clientSecret", ["clientSecret", "subscriptionKey", "subscriptionKeySecondary"]),
        ("certificate", ["certificate", "certificatePassword", "subscriptionKey"]),
    ],
)
def test_secret_values_land_only_in_the_secret(helm: Helm, method: str, used: list[str]) -> None:
    """Canary secret values appear in the chart-created Secret only, never in another object."""
    values = {
        "mode": "gateway",
        "auth": {"method": method, **IDS_SET, "certificatePassword": method == "certificate"},
        "subscriptionKeys": {"enabled": True, "secondary": "subscriptionKeySecondary" in used},
        "createSecret": {"enabled": True, **{k: CANARIES[k] for k in used}},
        "metrics": {"prometheusRule": {"enabled": True}, "serviceMonitor": {"enabled": True}},
        "dashboard": {"enabled": True},
    }
    docs = helm.template(values=values)
    secret = one(docs, "Secret", f"{FULLNAME}-credentials")
    decoded = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert sorted(decoded.values()) == sorted(CANARIES[k] for k in used)
    assert "annotations" not in secret["metadata"]
    for doc in docs:
        if doc is secret:
            continue
        text = json.dumps(doc)
        for name in used:
            for spelling in _spellings(CANARIES[name]):
                assert spelling not in text, f"{name} leaked into {doc['kind']}"


@pytest.mark.parametrize("values_file", ALL_COMBINATIONS, ids=IDS)
def test_environment_is_the_gateway_interface_without_literal_secrets(
    helm: Helm, values_file: Path | None
) -> None:
    """The chart sets only documented variables, and secret ones never as ConfigMap or literal."""
    docs = helm.template(values_file=values_file)
    data = configmap_data(docs)
    assert set(data) <= GATEWAY_ENV
    assert not set(data) & SECRET_ENV
    for _, c, _ in gateway_containers(docs):
        env = env_of(c)
        assert set(env) <= GATEWAY_ENV
        for name in set(env) & SECRET_ENV:
            assert "value" not in env[name]
            assert "secretKeyRef" in env[name]["valueFrom"]


def test_credential_files_come_from_the_mounted_secret(helm: Helm) -> None:
    """Client secret and both key files point into read-only mounts of the configured Secret."""
    docs, spec = demo(helm, "sidecar-native-secret")
    sidecar = container(spec, "ci-gateway", init=True)
    env = {name: entry["value"] for name, entry in env_of(sidecar).items() if "value" in entry}
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in sidecar["volumeMounts"]}
    expected = {
        "CIGW_CLIENT_SECRET_FILE": "client-secret",
        "CIGW_SUBSCRIPTION_KEY_FILE": "subscription-key",
        "CIGW_SUBSCRIPTION_KEY_SECONDARY_FILE": "subscription-key-secondary",
    }
    for variable, key in expected.items():
        directory, _, file_name = env[variable].rpartition("/")
        assert file_name == key
        volume = volumes[mounts[directory]]["secret"]
        assert volume["secretName"] == "ci-gateway-credentials"
        assert {"key": key, "path": key} in volume["items"]
    assert of_kind(docs, "Secret") == [], "an existing Secret is referenced, not created"


def test_certificate_password_comes_from_a_secret_key_reference(helm: Helm) -> None:
    """The certificate is a mounted file and its password a secretKeyRef to the same Secret."""
    _, spec = demo(helm, "sidecar-classic-certificate")
    env = env_of(container(spec, "ci-gateway"))
    assert env["AZURE_CLIENT_CERTIFICATE_PATH"]["value"].endswith("/client-certificate.pem")
    assert env["AZURE_CLIENT_CERTIFICATE_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "ci-gateway-certificate",
        "key": "client-certificate-password",
    }
    key_volume = next(v for v in spec["volumes"] if v["name"] == "cigw-subscription-keys")
    assert key_volume["secret"]["secretName"] == "apim-subscription-keys"


@pytest.mark.parametrize("combination", ["sidecar-workload-identity", "gateway-workload-identity"])
def test_workload_identity_needs_no_secret(helm: Helm, combination: str) -> None:
    """Workload identity annotates the ServiceAccount, labels the pod, and uses no Secret at all."""
    docs = helm.template(values_file=CI[combination])
    account = one(docs, "ServiceAccount")
    assert account["metadata"]["annotations"] == {
        "azure.workload.identity/client-id": CLIENT,
        "azure.workload.identity/tenant-id": TENANT,
    }
    (workload, gateway, _) = gateway_containers(docs)[0]
    template = pod_template(workload)
    assert template["metadata"]["labels"]["azure.workload.identity/use"] == "true"
    assert template["spec"]["serviceAccountName"] == account["metadata"]["name"]
    assert of_kind(docs, "Secret") == []
    # A shared gateway's only Secret volume is its listener's TLS pair: no Entra ID credential.
    volumes = pod_template(workload)["spec"]["volumes"]
    shared = combination.startswith("gateway")
    tls_only = [f"{FULLNAME}-tls"] if shared else []
    assert [v["secret"]["secretName"] for v in volumes if "secret" in v] == tls_only
    text = json.dumps(docs)
    assert "secretKeyRef" not in text
    credential_env = {"CIGW_CLIENT_SECRET_FILE", "AZURE_CLIENT_CERTIFICATE_PATH"}
    assert not set(env_of(gateway)) & credential_env


@pytest.mark.parametrize("values_file", [CI["gateway-secret"], CI["sidecar-native-secret"]])
def test_secret_credentials_carry_no_workload_identity_label(helm: Helm, values_file: Path) -> None:
    """Without workload identity, neither its pod label nor its annotation is rendered."""
    docs = helm.template(values_file=values_file)
    assert "azure.workload.identity" not in json.dumps(docs)


def test_workload_identity_without_client_id_is_rejected(helm: Helm) -> None:
    """auth.method=workloadIdentity without auth.clientId fails with a message naming the fix."""
    error = helm.template_error(values={"auth": {"method": "workloadIdentity"}})
    assert "auth.method=workloadIdentity needs auth.clientId" in error


@pytest.mark.parametrize(
    ("values", "message"),
    [
        pytest.param({"replicaCount": 3}, "replicaCount", id="root-typo"),
        pytest.param({"gateway": {"replica": 3}}, "replica", id="nested-typo"),
        pytest.param({"auth": {"metod": "certificate"}}, "metod", id="auth-typo"),
        pytest.param({"auth": {"method": "password"}}, "auth.method", id="bad-enum"),
        pytest.param({"config": {"logLevel": "verbose"}}, "config.logLevel", id="bad-log-level"),
        pytest.param({"ports": {"proxy": "8080"}}, "ports.proxy", id="wrong-type"),
    ],
)
def test_schema_rejects_invalid_values_by_name(
    helm: Helm, values: dict[str, Any], message: str
) -> None:
    """A misspelt or invalid value fails helm template and helm lint, naming the offending key."""
    error = helm.template_error(values=values)
    assert "values don't meet the specifications of the schema" in error
    assert message in error
    lint = helm.lint(values=values)
    assert lint.returncode != 0
    assert message in lint.stdout + lint.stderr


@pytest.mark.parametrize(
    ("values", "message"),
    [
        pytest.param(
            {"mode": "sidecar", "metrics": {"serviceMonitor": {"enabled": True}}},
            "metrics.serviceMonitor needs mode=gateway",
            id="servicemonitor-in-sidecar-mode",
        ),
        pytest.param(
            {"subscriptionKeys": {"secondary": True}},
            "subscriptionKeys.secondary=true needs subscriptionKeys.enabled=true",
            id="secondary-without-primary",
        ),
        pytest.param(
            {"createSecret": {"enabled": True}},
            "needs createSecret.clientSecret",
            id="empty-created-secret",
        ),
        pytest.param(
            {
                "createSecret": {"enabled": True, "clientSecret": "x"},
                "auth": {"existingSecret": "y"},
            },
            "leave auth.existingSecret and subscriptionKeys.existingSecret empty",
            id="created-and-existing-secret",
        ),
        pytest.param(
            {"extraEnv": [{"name": "CIGW_SUBSCRIPTION_KEY", "value": "literal"}]},
            "extraEnv: CIGW_SUBSCRIPTION_KEY must not have a literal value",
            id="literal-secret-in-extra-env",
        ),
        pytest.param(
            {"extraEnv": [{"name": "https_proxy", "value": "http://u:pw@proxy.corp:3128"}]},
            "extraEnv: https_proxy holds proxy credentials in a literal value",
            id="literal-proxy-credentials-in-extra-env",
        ),
        pytest.param(
            {"auth": {"certificatePassword": True}},
            "auth.certificatePassword=true only applies to auth.method=certificate",
            id="password-without-certificate",
        ),
        pytest.param(
            {"sidecar": {"demo": {"enabled": True}}},
            "sidecar.demo.enabled=true needs mode=sidecar",
            id="demo-in-gateway-mode",
        ),
    ],
)
def test_inconsistent_values_fail_with_a_fix(
    helm: Helm, values: dict[str, Any], message: str
) -> None:
    """Combinations the gateway could not use fail the render with a message saying what to do."""
    assert message in helm.template_error(values=values)


def test_secret_extra_env_through_a_secret_reference_is_accepted(helm: Helm) -> None:
    """extraEnv may bring a secret variable from a Secret through valueFrom.secretKeyRef."""
    reference = {"secretKeyRef": {"name": "apim", "key": "primary"}}
    docs = helm.template(
        values={"extraEnv": [{"name": "CIGW_SUBSCRIPTION_KEY", "valueFrom": reference}]}
    )
    env = env_of(gateway_containers(docs)[0][1])
    assert env["CIGW_SUBSCRIPTION_KEY"]["valueFrom"] == reference


def test_proxy_without_credentials_is_a_plain_extra_env(helm: Helm) -> None:
    """A proxy URL without credentials, and NO_PROXY, may be literal extraEnv values."""
    extra = [
        {"name": "HTTPS_PROXY", "value": "http://proxy.corp:3128"},
        {"name": "NO_PROXY", "value": ".svc,.cluster.local,10.0.0.0/8"},
    ]
    env = env_of(gateway_containers(helm.template(values={"extraEnv": extra}))[0][1])
    assert env["HTTPS_PROXY"]["value"] == "http://proxy.corp:3128"
    assert env["NO_PROXY"]["value"] == ".svc,.cluster.local,10.0.0.0/8"


def test_native_sidecar_needs_kubernetes_1_29(helm: Helm) -> None:
    """On Kubernetes 1.28 the native sidecar fails with advice; the classic one renders."""
    error = helm.template_error(values_file=CI["sidecar-native-secret"], kube_version="1.28.0")
    assert "a native sidecar needs Kubernetes >= 1.29" in error
    assert "sidecar.native=false" in error
    docs = helm.template(values_file=CI["sidecar-classic-certificate"], kube_version="1.28.0")
    assert gateway_containers(docs)


def test_shared_gateway_optional_objects(helm: Helm) -> None:
    """HPA and PDB are off by default; when on, the HPA owns the replica count."""
    defaults = helm.template()
    assert of_kind(defaults, "HorizontalPodAutoscaler") == []
    assert of_kind(defaults, "PodDisruptionBudget") == []
    assert one(defaults, "Deployment")["spec"]["replicas"] == 2
    docs = helm.template(values_file=CI["gateway-secret"])
    deployment = one(docs, "Deployment")
    assert "replicas" not in deployment["spec"]
    hpa = one(docs, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 6)
    pdb = one(docs, "PodDisruptionBudget")["spec"]
    assert pdb["minAvailable"] == 1
    assert pdb["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_settings_render_as_exact_strings(helm: Helm) -> None:
    """Numbers reach the ConfigMap as the gateway parses them (no 1e+07 for large integers)."""
    data = configmap_data(helm.template(values_file=CI["gateway-secret"]))
    assert data["CIGW_MAX_BODY_BYTES"] == "10485760"
    assert data["CIGW_RATE_LIMIT_RPS"] == "500"
    assert data["CIGW_RATE_LIMIT_CALLER_HEADER"] == "X-Caller-Id"
    assert data["CIGW_RETRY_ATTEMPTS"] == "2"
    assert data["AZURE_TENANT_ID"] == TENANT
    defaults = configmap_data(helm.template())
    assert "CIGW_RETRY_ATTEMPTS" not in defaults, "null leaves the gateway's default"
    assert defaults["CIGW_UPSTREAM_URL"] == "https://api.ci.ai.dynamics.com/v1"
    assert defaults["CIGW_SCOPE"] == "https://api.ci.ai.microsoft.com/.default"


def test_config_change_restarts_the_pods(helm: Helm) -> None:
    """The pod template carries a checksum of the settings, so a change rolls the pods."""

    def checksum(values: dict[str, Any]) -> str:
        docs = helm.template(values=values)
        annotations = pod_template(one(docs, "Deployment"))["metadata"]["annotations"]
        value: str = annotations["checksum/ci-gateway-config"]
        return value

    assert checksum({}) == checksum({})
    assert checksum({}) != checksum({"config": {"logLevel": "debug"}})


def test_image_tag_follows_the_app_version(helm: Helm) -> None:
    """The image tag equals the chart's appVersion, and a digest pins the image when given."""
    chart = read_yaml(CHART / "Chart.yaml")
    assert read_yaml(CHART / "values.yaml")["image"]["tag"] == chart["appVersion"]
    digest = "sha256:" + "ab" * 32
    docs = helm.template(
        values={"image": {"repository": "registry.example.com/cigw", "digest": digest}}
    )
    image = gateway_containers(docs)[0][1]["image"]
    assert image == f"registry.example.com/cigw:{chart['appVersion']}@{digest}"
