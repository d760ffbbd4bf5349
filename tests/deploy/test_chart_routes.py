"""The chart's `routes` value: the gateway's routes file in a ConfigMap, each route's keys and CA
mounted from their own Secret or ConfigMap, and no single-upstream setting beside them.

That the gateway itself accepts the rendered pod's routes is proved in
test_gateway_accepts_chart.py; these tests pin the objects' shape.
"""

from __future__ import annotations

import json
from pathlib import PurePosixPath
from typing import Any, Final

import pytest
import yaml

from .tools import (
    CHART,
    CI,
    FULLNAME,
    Helm,
    Manifest,
    env_of,
    gateway_containers,
    one,
    pod_template,
    read_yaml,
)

ROUTES_CONFIGMAP: Final = f"{FULLNAME}-routes"
SINGLE_ROUTE_ENV: Final = (
    "CIGW_UPSTREAM_URL",
    "CIGW_SCOPE",
    "CIGW_UPSTREAM_CA_FILE",
    "CIGW_SUBSCRIPTION_KEY",
    "CIGW_SUBSCRIPTION_KEY_FILE",
    "CIGW_SUBSCRIPTION_KEY_SECONDARY",
    "CIGW_SUBSCRIPTION_KEY_SECONDARY_FILE",
)
FILE_KEYS: Final = ("subscription_key_file", "subscription_key_secondary_file", "upstream_ca_file")
TWO_ROUTES: Final = read_yaml(CI["gateway-routes"])["routes"]


def routes_file(docs: list[Manifest]) -> dict[str, Any]:
    """The gateway configuration file the routes ConfigMap holds, parsed."""
    data = one(docs, "ConfigMap", ROUTES_CONFIGMAP)["data"]
    assert set(data) == {"gateway.yaml"}
    parsed: dict[str, Any] = yaml.safe_load(data["gateway.yaml"])
    return parsed


def mounted_file(pod_spec: Manifest, gateway: Manifest, path: str) -> tuple[Manifest, str]:
    """The volume a file path of the gateway container lies in, and the volume item's key.

    An AssertionError if no read-only mount of the container holds the path, or if the volume
    does not project that file.
    """
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    file = PurePosixPath(path)
    holders = [m for m in gateway["volumeMounts"] if PurePosixPath(m["mountPath"]) == file.parent]
    assert len(holders) == 1, f"{path} is in no mount of the gateway container"
    mount = holders[0]
    assert mount.get("readOnly") is True, f"{mount['mountPath']} is writable"
    assert "subPath" not in mount, "a subPath mount never sees a rotated Secret"
    volume = volumes[mount["name"]]
    source = volume.get("secret") or volume.get("configMap")
    assert source is not None, f"{mount['name']} is neither a Secret nor a ConfigMap volume"
    items = [item for item in source["items"] if item["path"] == file.name]
    assert len(items) == 1, f"{mount['name']} does not project {file.name}"
    key: str = items[0]["key"]
    return volume, key


def test_routes_render_the_gateway_configuration_file(helm: Helm) -> None:
    """Each route becomes a `routes:` entry with the gateway's own keys, in the given order."""
    routes = routes_file(helm.template(values_file=CI["gateway-routes"]))["routes"]
    assert [r["prefix"] for r in routes] == ["/ci/", "/dataverse/"]
    ci, dataverse = routes
    assert ci["upstream_url"] == "https://api.ci.ai.dynamics.com/v1"
    assert ci["scope"] == "https://api.ci.ai.microsoft.com/.default"
    assert "rewrite_links" not in ci, "null leaves the gateway's default"
    assert dataverse["scope"] == "https://contoso.crm4.dynamics.com/.default"
    assert dataverse["rate_limit_rps"] == 50
    assert dataverse["rate_limit_burst"] == 100
    assert dataverse["rewrite_links"] is True
    assert dataverse["strip_headers"] == ["MSCRMCallerID", "CallerObjectId"]
    assert not {"subscription_key_file", "subscription_key"} & set(dataverse)
    for route in routes:
        assert not {"subscription_key", "subscription_key_secondary"} & set(route)


@pytest.mark.parametrize("mode", ["gateway", "sidecar"])
def test_every_file_a_route_names_is_mounted_from_its_source(helm: Helm, mode: str) -> None:
    """Key and CA files the routes name lie in read-only mounts of the route's own Secret or
    ConfigMap, and CIGW_CONFIG names the mounted routes file."""
    values: dict[str, Any] = {"mode": mode, "routes": TWO_ROUTES}
    if mode == "sidecar":
        values["sidecar"] = {"demo": {"enabled": True}}
    docs = helm.template(values=values)
    ((workload, gateway, _),) = gateway_containers(docs)
    spec = pod_template(workload)["spec"]
    volume, key = mounted_file(spec, gateway, env_of(gateway)["CIGW_CONFIG"]["value"])
    assert volume["configMap"]["name"] == ROUTES_CONFIGMAP
    assert key == "gateway.yaml"
    routes = routes_file(docs)["routes"]
    expected = {
        (0, "subscription_key_file"): ("secret", "apim-ci-keys", "primary"),
        (0, "subscription_key_secondary_file"): ("secret", "apim-ci-keys", "secondary"),
        (0, "upstream_ca_file"): ("secret", "ci-upstream-ca", "ca.crt"),
        (1, "upstream_ca_file"): ("configMap", "dataverse-ca", "ca.crt"),
    }
    named = {(i, k) for i, route in enumerate(routes) for k in FILE_KEYS if k in route}
    assert named == set(expected)
    for (index, setting), (kind, name, source_key) in expected.items():
        volume, key = mounted_file(spec, gateway, routes[index][setting])
        assert kind in volume, f"routes[{index}].{setting} is not from a {kind}"
        assert volume[kind].get("secretName", volume[kind].get("name")) == name
        assert key == source_key
        # Each route's files have a directory of their own.
        assert f"/routes/{index}/" in routes[index][setting]


def test_routes_refuse_only_changed_single_upstream_settings(helm: Helm) -> None:
    """The template's idea of config.upstreamUrl/scope defaults is values.yaml's: leaving them
    as they are is accepted beside routes, while a changed one fails (see below)."""
    defaults = read_yaml(CHART / "values.yaml")["config"]
    template = (CHART / "templates" / "_helpers.tpl").read_text(encoding="utf-8")
    assert f'"upstreamUrl" "{defaults["upstreamUrl"]}" "scope" "{defaults["scope"]}"' in template
    explicit = {"upstreamUrl": defaults["upstreamUrl"], "scope": defaults["scope"]}
    assert helm.template(values={"routes": TWO_ROUTES, "config": explicit})


def test_routes_replace_the_single_upstream_settings(helm: Helm) -> None:
    """With routes, neither the ConfigMap nor the container sets a single-upstream variable."""
    docs = helm.template(values_file=CI["gateway-routes"])
    settings = one(docs, "ConfigMap", FULLNAME)["data"]
    ((_, gateway, _),) = gateway_containers(docs)
    assert not set(SINGLE_ROUTE_ENV) & (set(settings) | set(env_of(gateway)))
    # Without routes nothing changes: no routes ConfigMap, no CIGW_CONFIG.
    plain = helm.template()
    assert not [d for d in plain if d["metadata"]["name"] == ROUTES_CONFIGMAP]
    assert "CIGW_CONFIG" not in env_of(gateway_containers(plain)[0][1])
    assert "CIGW_UPSTREAM_URL" in one(plain, "ConfigMap", FULLNAME)["data"]


def test_routes_configmap_holds_no_secret(helm: Helm) -> None:
    """The routes ConfigMap names key files but holds no key: the schema refuses an inline key."""
    docs = helm.template(values_file=CI["gateway-routes"])
    text = json.dumps(one(docs, "ConfigMap", ROUTES_CONFIGMAP))
    assert "subscription_key:" not in text
    inline = [{**TWO_ROUTES[0], "subscriptionKey": "literal-key-Qz81"}]
    error = helm.template_error(values={"routes": inline})
    assert "subscriptionKey" in error
    assert "literal-key-Qz81" not in error


def test_routes_change_restarts_the_pods(helm: Helm) -> None:
    """A change to a route changes the pod template's config checksum."""

    def checksum(routes: list[dict[str, Any]]) -> str:
        annotations = pod_template(one(helm.template(values={"routes": routes}), "Deployment"))
        value: str = annotations["metadata"]["annotations"]["checksum/ci-gateway-config"]
        return value

    changed = [TWO_ROUTES[0], {**TWO_ROUTES[1], "scope": "https://other.crm.dynamics.com/.default"}]
    assert checksum(TWO_ROUTES) == checksum(TWO_ROUTES)
    assert checksum(TWO_ROUTES) != checksum(changed)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        pytest.param(
            {"routes": TWO_ROUTES, "subscriptionKeys": {"enabled": True}},
            "subscriptionKeys.enabled=true configures the single upstream's keys",
            id="single-upstream-keys",
        ),
        pytest.param(
            {"routes": TWO_ROUTES, "config": {"upstreamUrl": "https://contoso.crm.dynamics.com"}},
            "config.upstreamUrl configures the single upstream",
            id="single-upstream-url",
        ),
        pytest.param(
            {
                "routes": TWO_ROUTES,
                "config": {"scope": "https://contoso.crm.dynamics.com/.default"},
            },
            "config.scope configures the single upstream",
            id="single-upstream-scope",
        ),
        pytest.param(
            {"routes": TWO_ROUTES, "extraEnv": [{"name": "CIGW_SCOPE", "value": "x/.default"}]},
            "extraEnv: CIGW_SCOPE cannot be set together with routes",
            id="single-upstream-scope-in-extra-env",
        ),
        pytest.param(
            {"routes": [TWO_ROUTES[1], {**TWO_ROUTES[0], "prefix": "/dataverse"}]},
            'routes[1].prefix "/dataverse" is also routes[0]\'s',
            id="duplicate-prefix",
        ),
        pytest.param(
            {
                "routes": [
                    {**TWO_ROUTES[1], "upstreamCaSecret": {"name": "ca", "key": "ca.crt"}},
                ]
            },
            "routes[0]: set upstreamCaSecret or upstreamCaConfigMap, not both",
            id="two-ca-sources",
        ),
    ],
)
def test_routes_beside_single_upstream_settings_fail_with_a_fix(
    helm: Helm, values: dict[str, Any], message: str
) -> None:
    """Settings the gateway refuses together with routes fail the render, saying what to use."""
    assert message in helm.template_error(values=values)


@pytest.mark.parametrize(
    ("route", "message"),
    [
        pytest.param({"prefix": "/ci/", "upstreamUrl": "https://x"}, "scope", id="no-scope"),
        pytest.param({**TWO_ROUTES[1], "upstreamURL": "https://x"}, "upstreamURL", id="typo"),
        pytest.param({**TWO_ROUTES[1], "prefix": "ci/"}, "prefix", id="relative-prefix"),
        pytest.param(
            {**TWO_ROUTES[0], "subscriptionKeySecret": {"name": "apim"}}, "key", id="no-key-name"
        ),
    ],
)
def test_schema_rejects_an_invalid_route_by_name(
    helm: Helm, route: dict[str, Any], message: str
) -> None:
    """A route missing a required key, or with an unknown or invalid one, fails the schema."""
    error = helm.template_error(values={"routes": [route]})
    assert "values don't meet the specifications of the schema" in error
    assert message in error
