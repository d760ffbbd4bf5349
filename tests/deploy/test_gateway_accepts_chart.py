"""The gateway accepts the configuration the chart renders: `ci-gateway check-config` in a
simulated pod.

For each combination, the gateway container's environment is assembled as the kubelet would
(ConfigMap envFrom, then env; Secret volumes materialised as files under tmp_path, their mount
paths rewritten to match; secretKeyRef values resolved; for workload identity, the variables and
token file its webhook injects), and the image's entry point validates it.
"""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Mapping
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


def pod_environment(docs: list[Manifest], root: Path) -> dict[str, str]:
    """The gateway container's environment as the kubelet (and the identity webhook) build it."""
    ((workload, gateway, _),) = gateway_containers(docs)
    template = pod_template(workload)
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    encrypted = any(e["name"] == "AZURE_CLIENT_CERTIFICATE_PASSWORD" for e in gateway["env"])
    mounts: dict[str, Path] = {}
    listener_cert, listener_key = listener_pair()
    for mount in gateway["volumeMounts"]:
        local = root / mount["name"]
        local.mkdir()
        mounts[mount["mountPath"]] = local
        secret = volumes[mount["name"]].get("secret")
        for item in secret["items"] if secret else []:
            if item["key"] in ("tls.crt", "tls.key"):  # the listener's kubernetes.io/tls pair
                value = listener_cert if item["key"] == "tls.crt" else listener_key
            else:
                value = secret_value(docs, secret["secretName"], item["key"], encrypted=encrypted)
            (local / item["path"]).write_text(value, encoding="utf-8")
        config_map = volumes[mount["name"]].get("configMap")
        for item in config_map["items"] if config_map else []:
            # kube-root-ca.crt: the cluster's CA, here any CA certificate.
            (local / item["path"]).write_text(listener_cert, encoding="utf-8")
    env: dict[str, str] = {}
    for source in gateway["envFrom"]:
        env |= one(docs, "ConfigMap", source["configMapRef"]["name"])["data"]
    for entry in gateway["env"]:
        if "value" in entry:
            value = entry["value"]
            for mount_path, local in mounts.items():
                if value.startswith(mount_path + "/"):
                    value = str(local) + value.removeprefix(mount_path)
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
