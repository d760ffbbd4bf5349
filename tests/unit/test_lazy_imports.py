"""A sidecar loads only the libraries its configuration uses (each costs resident memory)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Libraries that only fleet mode (redis), caller authentication (PyJWT, cryptography),
# certificate credentials or the sandbox (cryptography) and YAML files (yaml) need.
OPTIONAL = ("redis", "jwt", "cryptography", "yaml")


def _loaded_after(code: str) -> dict[str, bool]:
    probe = (
        f"import sys\n{code}\n"
        "import json\n"
        f"print(json.dumps({{m: any(k == m or k.startswith(m + '.') for k in sys.modules)"
        f" for m in {OPTIONAL!r}}}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    )
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_the_serving_modules_load_no_optional_library() -> None:
    """Importing the app, the handler and the command line loads none of them."""
    loaded = _loaded_after("import gateway.app, gateway.cli, gateway.handler, gateway.config")
    assert not any(loaded.values()), loaded


@pytest.mark.parametrize(
    ("module", "library"),
    [("gateway.fleet", "redis"), ("gateway.callers", "jwt")],
)
def test_the_feature_module_does_load_its_library(module: str, library: str) -> None:
    """The probe sees a library when it is loaded (so the test above can fail)."""
    assert _loaded_after(f"import {module}")[library]
