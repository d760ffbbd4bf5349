"""`ci-gateway sandbox`: issuer, Customer Insights stand-in and gateway, driven as a user would."""

from __future__ import annotations

import ast
import asyncio
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from yarl import URL

from gateway.sandbox.apim import INVALID_KEY, INVALID_TOKEN, KEY_HEADER, MISSING_KEY
from gateway.sandbox.run import CI_SCOPE, Sandbox

REPO = Path(__file__).resolve().parents[2]
Headers = Callable[[Sandbox], dict[str, str]]


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    """A sandbox on ephemeral ports whose gateway re-reads its key files every 0.1 s."""
    running = await Sandbox.start(key_reload_interval=0.1)
    yield running
    await running.stop()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain HTTP client: it sends no token and no subscription key."""
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def customers(sandbox: Sandbox, client: aiohttp.ClientSession) -> str:
    """The gateway URL of the production instance's Customer data."""
    instances = await _get_json(client, f"{sandbox.gateway_url}/instances")
    (production,) = [i for i in instances if i["instanceType"] == "production"]
    return f"{sandbox.gateway_url}/instances/{production['instanceId']}/data/Customer"


async def _get_json(
    client: aiohttp.ClientSession, url: str | URL, params: dict[str, str] | None = None
) -> Any:
    async with client.get(url, params=params) as response:
        assert response.status == 200, await response.text()
        return await response.json()


# --------------------------------------------------------------------------- through the gateway


async def test_instances_listed_through_gateway(
    sandbox: Sandbox, client: aiohttp.ClientSession
) -> None:
    """GET /instances on the gateway, sent without credentials, lists the stand-in's instances."""
    instances = await _get_json(client, f"{sandbox.gateway_url}/instances")
    assert {(i["name"], i["instanceType"]) for i in instances} == {
        ("Contoso Retail", "production"),
        ("Contoso Retail (UAT)", "sandbox"),
        ("Fabrikam Trial", "trial"),
    }
    assert sandbox.tally.accepted["primary"] == 1
    assert sum(sandbox.tally.rejected.values()) == 0


def _mentions(term: str) -> Callable[[dict[str, Any]], bool]:
    return lambda row: any(term in str(value).casefold() for value in row.values())


@pytest.mark.parametrize(
    ("params", "holds"),
    [
        pytest.param(
            {"$filter": "Country eq 'Germany'"},
            lambda row: row["Country"] == "Germany",
            id="filter eq",
        ),
        pytest.param(
            {"$filter": "LoyaltyPoints ge 4000 and startswith(City,'M')"},
            lambda row: row["LoyaltyPoints"] >= 4000 and row["City"][0] == "M",
            id="filter and startswith",
        ),
        pytest.param({"$search": "MÜLLER"}, _mentions("müller"), id="search ignores case"),
        pytest.param(
            {"$search": "smith", "$select": "FullName,EMail"},
            lambda row: set(row) == {"FullName", "EMail"} and _mentions("smith")(row),
            id="search with select",
        ),
    ],
)
async def test_odata_query_through_gateway(
    client: aiohttp.ClientSession,
    customers: str,
    params: dict[str, str],
    holds: Callable[[dict[str, Any]], bool],
) -> None:
    """OData $filter, $search and $select pass through the gateway and select the right rows."""
    body = await _get_json(client, customers, params)
    rows = body["value"]
    assert rows, "the seeded data has matches for every case"
    assert all(holds(row) for row in rows)
    assert body["@odata.count"] == len(rows)


async def test_paging_through_gateway(
    sandbox: Sandbox, client: aiohttp.ClientSession, customers: str
) -> None:
    """$skip/$top select windows, and @odata.nextLink's path and query, sent to the gateway,
    walk every customer exactly once."""
    first_ten = (await _get_json(client, customers, {"$top": "10"}))["value"]
    window = (await _get_json(client, customers, {"$skip": "5", "$top": "5"}))["value"]
    assert window == first_ten[5:]

    body = await _get_json(client, customers)
    ids = [row["CustomerId"] for row in body["value"]]
    pages = 1
    while "@odata.nextLink" in body:
        # The link names the API's own host, as the real API's does: a caller of the
        # gateway sends its path below the base path (/v1) to the gateway instead.
        link = URL(body["@odata.nextLink"])
        rest = link.raw_path_qs.removeprefix("/v1")
        body = await _get_json(client, URL(sandbox.gateway_url + rest, encoded=True))
        ids += [row["CustomerId"] for row in body["value"]]
        pages += 1
    assert pages == 3
    assert len(ids) == len(set(ids)) == body["@odata.count"] == 300


# --------------------------------------------------------------------------- the stand-in's guard


def _forged_token(_: Sandbox) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return jwt.encode({"exp": time.time() + 3600, "aud": "x"}, key, algorithm="RS256")


@pytest.mark.parametrize(
    ("headers", "status", "message"),
    [
        pytest.param(lambda _: {}, 401, MISSING_KEY, id="no credentials"),
        pytest.param(lambda _: {KEY_HEADER: "0" * 32}, 401, INVALID_KEY, id="unknown key"),
        pytest.param(lambda s: {KEY_HEADER: s.keys.primary}, 401, INVALID_TOKEN, id="no token"),
        pytest.param(
            lambda s: {KEY_HEADER: s.keys.secondary, "Authorization": f"Bearer {_forged_token(s)}"},
            401,
            INVALID_TOKEN,
            id="token from another issuer",
        ),
        pytest.param(
            lambda s: {
                KEY_HEADER: s.keys.primary,
                "Authorization": f"Bearer {s.issuer.issued[-1]}",
            },
            200,
            None,
            id="key and issued token (control)",
        ),
    ],
)
async def test_stand_in_called_directly(
    sandbox: Sandbox,
    client: aiohttp.ClientSession,
    headers: Headers,
    status: int,
    message: str | None,
) -> None:
    """Called directly, the stand-in answers APIM's 401 unless both key and token are valid."""
    async with client.get(
        f"{sandbox.stand_in_url}/instances", headers=headers(sandbox)
    ) as response:
        assert response.status == status
        body = await response.json()
    if message is not None:
        assert body == {"statusCode": 401, "message": message}
    if message == INVALID_TOKEN:
        assert response.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'


# --------------------------------------------------------------------------- rotation and renewal


async def test_key_rotation_without_failed_requests(
    sandbox: Sandbox, client: aiohttp.ClientSession
) -> None:
    """During the rotation drill every request through the gateway succeeds, the stand-in
    refuses the old primary, and the gateway ends on the new primary read from its key file."""
    steps: list[str] = []
    drill = asyncio.ensure_future(sandbox.rotate(steps.append, pace=0.01))
    statuses: list[int] = []
    while not drill.done():
        async with client.get(f"{sandbox.gateway_url}/instances") as response:
            await response.read()
            statuses.append(response.status)
    traffic = drill.result()

    assert statuses
    assert set(statuses) == {200}
    assert traffic.sent >= 10
    assert traffic.failed == 0
    assert [step.split(":")[0] for step in steps if "/4" in step] == [
        f"rotation {n}/4" for n in range(1, 5)
    ]
    assert sandbox.tally.rejected["unknown"] >= 1  # the old primary, refused as APIM would
    assert sandbox.tally.accepted["secondary"] >= 1
    new_primary = await asyncio.to_thread(sandbox.files.primary_key.read_text)
    assert new_primary.strip() == sandbox.keys.primary
    before = sandbox.tally.accepted["primary"]
    await _get_json(client, f"{sandbox.gateway_url}/instances")
    assert sandbox.tally.accepted["primary"] == before + 1


async def test_token_renewal_with_short_lifetime(client: aiohttp.ClientSession) -> None:
    """With 2-second tokens the gateway renews ahead of expiry: requests spanning several
    lifetimes all succeed, and the stand-in refuses the first token once it has expired."""
    sandbox = await Sandbox.start(token_lifetime=2.0)

    def ci_tokens() -> list[str]:
        # The issuer mints for both routes' scopes; these are the CI route's.
        return [t for t in sandbox.issuer.issued if _audience(t) == CI_SCOPE[: -len("/.default")]]

    try:
        statuses: list[int] = []
        async with asyncio.timeout(15):
            while len(ci_tokens()) < 4:
                async with client.get(f"{sandbox.gateway_url}/instances") as response:
                    statuses.append(response.status)
                await asyncio.sleep(0.1)  # real time: the tokens really expire
        assert set(statuses) == {200}
        assert sum(sandbox.tally.rejected.values()) == 0  # never sent an expired token

        expired = {
            KEY_HEADER: sandbox.keys.primary,
            "Authorization": f"Bearer {ci_tokens()[0]}",
        }
        async with client.get(f"{sandbox.stand_in_url}/instances", headers=expired) as response:
            assert response.status == 401
            assert response.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    finally:
        await sandbox.stop()


def _audience(token: str) -> str:
    """The audience a sandbox token was minted for (read, not verified)."""
    audience: str = jwt.decode(token, options={"verify_signature": False})["aud"]
    return audience


# --------------------------------------------------------------------------- the command


class _Command:
    """`python -m gateway sandbox` in a child process, its output collected as it arrives."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "sandbox", "--port", "0", "--admin-port", "0", *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.output = ""

    def until(self, marker: str, within: float = 30.0) -> str:
        """The output so far, once it contains `marker`."""
        assert self.process.stdout is not None
        deadline = time.monotonic() + within
        while marker not in self.output:
            left = deadline - time.monotonic()
            assert left > 0, f"{marker!r} not printed within {within} s:\n{self.output}"
            if select.select([self.process.stdout], [], [], left)[0]:
                chunk = os.read(self.process.stdout.fileno(), 65536)
                assert chunk, f"exited before printing {marker!r}:\n{self.output}"
                self.output += chunk.decode()
        return self.output

    def stop(self) -> int:
        """Ctrl-C, then the exit status."""
        self.process.send_signal(signal.SIGINT)
        rest, _ = self.process.communicate(timeout=30)
        self.output += rest.decode()
        return self.process.returncode


@pytest.fixture
def command_env(ca_file: Path) -> dict[str, str]:
    """No gateway settings at all, and trust-store variables naming an unrelated CA."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "REQUESTS_CA_BUNDLE": str(ca_file),
        "SSL_CERT_FILE": str(ca_file),
    }


def test_command_serves_prints_and_stops_on_ctrl_c(command_env: dict[str, str]) -> None:
    """The command prints each listener, the secret's location and five curl commands, serves
    /instances through the gateway, never prints a secret, and Ctrl-C exits 0 leaving no files."""
    command = _Command(command_env)
    try:
        banner = command.until("Stop: Ctrl-C")
        gateway = re.search(r"^  gateway +(http://127\.0\.0\.1:\d+)$", banner, re.MULTILINE)
        directory = re.search(r"private files .*: (/\S+)/$", banner, re.MULTILINE)
        assert gateway, banner
        assert directory, banner
        files = Path(directory[1])
        secrets = [
            (files / name).read_text().strip()
            for name in ("client-secret", "primary.key", "secondary.key")
        ]
        assert len([line for line in banner.splitlines() if line.startswith("  curl -s ")]) == 5
        for listener in ("token issuer", "Customer Insights API", "Dataverse", "gateway admin"):
            assert re.search(rf"^  {listener}.* https?://127\.0\.0\.1:\d+", banner, re.MULTILINE)
        with urllib.request.urlopen(f"{gateway[1]}/instances", timeout=10) as response:  # noqa: S310 - loopback
            assert len(json.load(response)) == 3
    finally:
        status = command.stop()
    assert status == 0, command.output
    assert "stopped" in command.output
    assert "Traceback" not in command.output
    assert not any(secret in command.output for secret in secrets)
    assert not files.exists()


@pytest.mark.parametrize("trigger", ["--rotate-keys", "SIGUSR1"])
def test_command_runs_the_rotation_drill(command_env: dict[str, str], trigger: str) -> None:
    """--rotate-keys at start, or SIGUSR1 at any time, runs the drill with zero failed requests."""
    command = _Command(command_env, *[trigger] if trigger.startswith("--") else [])
    try:
        command.until("Stop: Ctrl-C")
        if trigger == "SIGUSR1":
            command.process.send_signal(signal.SIGUSR1)
        output = command.until("rotation done")
    finally:
        command.stop()
    assert re.search(r"rotation done: \d+ requests via the gateway, 0 failed", output), output
    assert "rotation 4/4" in output


def test_core_never_imports_the_sandbox() -> None:
    """No gateway module outside gateway/sandbox imports it, except cli.py lazily in a function."""
    offenders = []
    for path in (REPO / "gateway").rglob("*.py"):
        if "sandbox" in path.relative_to(REPO / "gateway").parts:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            lazy = path.name == "cli.py" and node not in tree.body
            if not lazy and any(name.startswith("gateway.sandbox") for name in names):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []
