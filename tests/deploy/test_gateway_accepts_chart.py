"""The gateway accepts the configuration the chart renders: `ci-gateway check-config` in a
simulated pod.

For each combination, the gateway container's environment is assembled as the kubelet would
(ConfigMap envFrom, then env; Secret volumes materialised as files under tmp_path, their mount
paths rewritten to match; secretKeyRef values resolved; for workload identity, the variables and
token file its webhook injects), and the image's entry point validates it.
"""

from __future__ import annotations

import base64
import re
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

import pytest
from cryptography.hazmat.primitives import serialization

from tests.certs import client_certificate, self_signed_rsa

from .tools import (
    CI,
    Helm,
    Manifest,
    console_tool,
    gateway_containers,
    of_kind,
    one,
    pod_template,
)

CANARY: Final = "canary-rendered-secret-Vb41"
CERT_PASSWORD: Final = "canary-cert-password-Hn20"
IDS: Final = {
    "auth": {
        "tenantId": "00000000-0000-0000-0000-000000000001",
        "clientId": "00000000-0000-0000-0000-000000000002",
    }
}
# What the Azure Workload Identity webhook adds to a labelled pod's containers.
WEBHOOK_AUTHORITY: Final = "https://login.microsoftonline.com/"


def certificate_pem(password: str | None) -> str:
    """A self-signed RSA certificate with its private key, the key encrypted if `password`."""
    pem, _ = client_certificate(password.encode() if password else None)
    return pem.decode()


def secret_value(docs: list[Manifest], secret: str, key: str, *, encrypted: bool) -> str:
    """A Secret's value: from the rendered Secret if the chart creates it, else a stand-in for
    the operator's existing Secret."""
    for doc in of_kind(docs, "Secret"):
        if doc["metadata"]["name"] == secret:
            return base64.b64decode(doc["data"][key]).decode()
    if key.endswith(".pem"):
        return certificate_pem(CERT_PASSWORD if encrypted else None)
    if "password" in key:
        return CERT_PASSWORD
    return CANARY


def listener_pair() -> tuple[str, str]:
    """A certificate and its key, as a kubernetes.io/tls Secret holds them (PEM)."""
    key, certificate = self_signed_rsa("ci-gateway.example.svc")
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return certificate.public_bytes(serialization.Encoding.PEM).decode(), key_pem.decode()


def volume_files(
    docs: list[Manifest], volume: Manifest, *, encrypted: bool, localise: Callable[[str], str]
) -> dict[str, str]:
    """The files a Secret or ConfigMap volume projects, by path: the chart's own ConfigMaps as
    rendered (mount paths in them `localise`d), stand-ins for what exists outside the release."""
    listener_cert, listener_key = listener_pair()
    files: dict[str, str] = {}
    secret: Manifest = volume.get("secret") or {"items": []}
    for item in secret["items"]:
        if item["key"] in ("tls.crt", "tls.key"):  # the listener's kubernetes.io/tls pair
            value = listener_cert if item["key"] == "tls.crt" else listener_key
        elif item["key"] == "ca.crt":  # a CA bundle, e.g. a route's upstream CA
            value = listener_cert
        else:
            value = secret_value(docs, secret["secretName"], item["key"], encrypted=encrypted)
        files[item["path"]] = value
    config_map: Manifest = volume.get("configMap") or {"items": []}
    rendered = {doc["metadata"]["name"]: doc["data"] for doc in of_kind(docs, "ConfigMap")}
    for item in config_map["items"]:
        if config_map["name"] in rendered:  # the chart's own, e.g. the routes file
            # It names other mounted files by their pod paths: map those too.
            files[item["path"]] = localise(rendered[config_map["name"]][item["key"]])
        else:  # kube-root-ca.crt or a CA ConfigMap: here any CA certificate
            files[item["path"]] = listener_cert
    return files


def pod_environment(docs: list[Manifest], root: Path) -> dict[str, str]:
    """The gateway container's environment as the kubelet (and the identity webhook) build it."""
    ((workload, gateway, _),) = gateway_containers(docs)
    template = pod_template(workload)
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    encrypted = any(e["name"] == "AZURE_CLIENT_CERTIFICATE_PASSWORD" for e in gateway["env"])
    mounts = {m["mountPath"]: root / m["name"] for m in gateway["volumeMounts"]}
    # One pass, longest first, only where a path starts: a replaced path is not replaced again.
    mount_path = re.compile(
        r"(?<![\w./-])("
        + "|".join(re.escape(m) for m in sorted(mounts, key=len, reverse=True))
        + ")/"
    )

    def local_paths(value: str) -> str:
        """`value` with the pod's mount paths replaced by their local stand-ins."""
        return mount_path.sub(lambda m: f"{mounts[m.group(1)]}/", value)

    for mount in gateway["volumeMounts"]:
        local = mounts[mount["mountPath"]]
        local.mkdir()
        volume = volumes[mount["name"]]
        for path, value in volume_files(
            docs, volume, encrypted=encrypted, localise=local_paths
        ).items():
            (local / path).write_text(value, encoding="utf-8")
    env: dict[str, str] = {}
    for source in gateway["envFrom"]:
        env |= one(docs, "ConfigMap", source["configMapRef"]["name"])["data"]
    for entry in gateway["env"]:
        if "value" in entry:
            value = local_paths(entry["value"])
        else:
            ref = entry["valueFrom"]["secretKeyRef"]
            value = secret_value(docs, ref["name"], ref["key"], encrypted=encrypted)
        env[entry["name"]] = value
    if template["metadata"]["labels"].get("azure.workload.identity/use") == "true":
        annotations = one(docs, "ServiceAccount")["metadata"]["annotations"]
        token = root / "azure-identity-token"
        token.write_text("eyJhbGciOiJSUzI1NiJ9.e30.c2lnbmF0dXJl", encoding="utf-8")
        env |= {
            "AZURE_CLIENT_ID": annotations["azure.workload.identity/client-id"],
            "AZURE_TENANT_ID": annotations["azure.workload.identity/tenant-id"],
            "AZURE_FEDERATED_TOKEN_FILE": str(token),
            "AZURE_AUTHORITY_HOST": WEBHOOK_AUTHORITY,
        }
    return env


def check_config(env: Mapping[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """The image's entry point, `ci-gateway check-config`, with exactly `env`."""
    entry_point = console_tool("ci-gateway")
    assert entry_point is not None, "the project is not installed: make install"
    return subprocess.run(
        [str(entry_point), "check-config"],
        env={**env, "HOME": str(cwd)},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("values_file", "values"),
    [
        pytest.param(None, IDS, id="defaults-with-ids"),
        *[pytest.param(path, None, id=name) for name, path in CI.items()],
    ],
)
def test_gateway_accepts_the_rendered_configuration(
    helm: Helm, tmp_path: Path, values_file: Path | None, values: dict[str, Any] | None
) -> None:
    """`ci-gateway check-config` accepts the environment and files a rendered pod gives it."""
    docs = helm.template(values_file=values_file, values=values)
    result = check_config(pod_environment(docs, tmp_path), tmp_path)
    assert result.returncode == 0, result.stderr
    assert "configuration is valid" in result.stdout
    for secret in (CANARY, CERT_PASSWORD):
        assert secret not in result.stdout + result.stderr


def test_defaults_lack_only_the_application_ids(helm: Helm, tmp_path: Path) -> None:
    """With bare defaults, the gateway's only complaint is the missing tenant and client IDs."""
    result = check_config(pod_environment(helm.template(), tmp_path), tmp_path)
    assert result.returncode != 0
    problems = result.stderr
    assert "AZURE_TENANT_ID is required" in problems
    assert "AZURE_CLIENT_ID is required" in problems
    assert "credential" not in problems


def test_gateway_loads_the_rendered_routes(helm: Helm, tmp_path: Path) -> None:
    """The pod's routes file reaches the gateway: check-config shows both routes, key redacted."""
    result = check_config(
        pod_environment(helm.template(values_file=CI["gateway-routes"]), tmp_path), tmp_path
    )
    assert result.returncode == 0, result.stderr
    # check-config prints "  name  value" lines.
    shown = dict(
        line.split(maxsplit=1)
        for line in (raw.strip() for raw in result.stdout.splitlines())
        if line.startswith("routes[")
    )
    assert shown["routes[0].prefix"] == "/ci/"
    assert shown["routes[1].prefix"] == "/dataverse/"
    assert shown["routes[1].scope"] == "https://contoso.crm4.dynamics.com/.default"
    assert shown["routes[1].rate_limit_rps"] == "50"
    assert shown["routes[1].strip_headers"] == "callerobjectid, mscrmcallerid"
    assert shown["routes[0].upstream_ca_file"] == str(tmp_path / "cigw-route-0-ca" / "ca.crt")
    assert shown["routes[1].upstream_ca_file"] == str(tmp_path / "cigw-route-1-ca" / "ca.crt")
    keys = tmp_path / "cigw-route-0-keys"
    assert shown["routes[0].subscription_key_file"] == str(keys / "primary")
    assert shown["routes[0].subscription_key_secondary_file"] == str(keys / "secondary")
    assert shown["routes[1].subscription_key_file"] == "(unset)"
    assert "CIGW_UPSTREAM_URL" not in result.stdout
    assert CANARY not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("volume", "setting"),
    [
        pytest.param("cigw-route-0-keys", "routes[0].subscription_key_file", id="keys"),
        pytest.param("cigw-route-1-ca", "routes[1].upstream_ca_file", id="ca"),
    ],
)
def test_a_route_file_the_pod_does_not_mount_is_refused(
    helm: Helm, tmp_path: Path, volume: str, setting: str
) -> None:
    """Without a route's mount, the file its route names is missing and the gateway says which."""
    docs = helm.template(values_file=CI["gateway-routes"])
    ((_, gateway, _),) = gateway_containers(docs)
    gateway["volumeMounts"] = [m for m in gateway["volumeMounts"] if m["name"] != volume]
    result = check_config(pod_environment(docs, tmp_path), tmp_path)
    assert result.returncode == 2
    assert setting in result.stderr
