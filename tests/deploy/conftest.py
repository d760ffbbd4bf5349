"""Fixtures for the deployment tests: the pinned helm binary and promtool."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from . import helm_binary
from .tools import Helm


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    """The pinned helm 3 binary ($CIGW_HELM, else the virtualenv's bin/helm)."""
    path = Path(os.environ.get("CIGW_HELM") or helm_binary.default_path())
    version = helm_binary.installed_version(path)
    if version != helm_binary.HELM_VERSION:
        pytest.fail(
            f"helm {helm_binary.HELM_VERSION} is needed at {path} (found: {version}). "
            f"Install it with: python tests/deploy/helm_binary.py {path}",
            pytrace=False,
        )
    return Helm(path, tmp_path_factory.mktemp("helm"))


@pytest.fixture(scope="session")
def promtool() -> Path:
    """promtool from the Debian package prometheus."""
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is needed: apt-get install prometheus", pytrace=False)
    return Path(found)
