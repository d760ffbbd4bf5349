"""Security-suite fixtures: leak ledger, credential-redacting upstream, gateway subprocesses.

The parser-level modules share one issuer, one upstream and one gateway process per
aiohttp parser for the whole module (loop_scope="module"), so a hostile case costs a
connection, not a process start.
"""

from __future__ import annotations

import gc
import io
import ssl
import sys
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
import trustme
from structlog._config import BoundLoggerLazyProxy

from gateway import logging as gateway_logging
from gateway.sandbox.apim import SubscriptionKeyPair
from gateway.sandbox.issuer import TokenIssuer
from tests.conftest import (
    CANARY_PRIMARY,
    CANARY_SECONDARY,
    CANARY_SECRET,
    gateway_environment,
    serving_issuer,
    serving_upstream,
)
from tests.security.support import GatewayProcess, Ledger, SecurityUpstream
from tests.servers.upstream import Upstream
from tests.tls_files import client_context, key_canary, write_pair

# Canaries for the certificate and workload-identity credentials (tests/security/test_secrets.py).
CANARY_CERT_PASSWORD = "canary-cert-password-Kp27vQ"
CANARY_ASSERTION = "canary.federated.assertion-Hm93tY"
# The egress proxy's credentials (tests/security/test_secrets.py).
CANARY_PROXY_USER = "canary-proxy-user-Wd51"
CANARY_PROXY_PASSWORD = "canary-proxy-password-Tq83jL"
# Fleet mode's Redis password (requirepass), given in the URL or in CIGW_REDIS_PASSWORD_FILE.
CANARY_REDIS_PASSWORD = "canary-redis-password-Wd58nR"

_LEDGER = Ledger()


@pytest.fixture(scope="session", autouse=True)
def ledger() -> Iterator[Ledger]:
    """Everything that left a gateway during the suite; at the end, no canary may be in it."""
    _LEDGER.secret(
        CANARY_SECRET,
        CANARY_PRIMARY,
        CANARY_SECONDARY,
        CANARY_CERT_PASSWORD,
        CANARY_ASSERTION,
        CANARY_PROXY_USER,
        CANARY_PROXY_PASSWORD,
        CANARY_REDIS_PASSWORD,
    )
    yield _LEDGER
    leaks = _LEDGER.leaks()
    assert not leaks, "secrets leaked during the security suite:\n" + "\n".join(leaks[:20])


@pytest.fixture(autouse=True)
def no_leak_in_this_test(ledger: Ledger, log_output: io.StringIO) -> Iterator[None]:
    """After each test, nothing it captured (logs, responses, output) holds a canary."""
    start = len(ledger.texts)
    yield
    ledger.record("in-process log", log_output.getvalue())
    leaks = ledger.leaks(ledger.texts[start:])
    assert not leaks, "secrets leaked:\n" + "\n".join(leaks[:20])


@pytest.fixture(autouse=True)
def log_output() -> io.StringIO:
    """Everything the in-process gateway logs during the test, as JSON lines."""
    buffer = io.StringIO()
    gateway_logging.configure("debug", "json", buffer)
    # configure() caches each module's logger on first use, bound to the stream of that
    # moment (an earlier test's buffer): drop those caches so this test's buffer sees all.
    for module in [m for name, m in sys.modules.items() if name.startswith("gateway")]:
        for value in list(vars(module).values()):
            if isinstance(value, BoundLoggerLazyProxy):
                vars(value).pop("bind", None)
    return buffer


@pytest.fixture
async def issuer(server_ssl: ssl.SSLContext, ledger: Ledger) -> AsyncIterator[TokenIssuer]:
    """The TLS token issuer; every token it issued becomes a canary."""
    async with serving_issuer(server_ssl) as token_issuer:
        yield token_issuer
    ledger.secret(*token_issuer.issued)
    # A TLS connection the client dropped mid-answer (timeouts, HTML faults) leaves its
    # server-side socket to the garbage collector; reap it here, not in a later test.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


@pytest.fixture
async def upstream(issuer: TokenIssuer) -> AsyncIterator[Upstream]:
    """The APIM-like upstream, echoing credentials only as fingerprints."""
    keys = SubscriptionKeyPair(CANARY_PRIMARY, CANARY_SECONDARY)
    async with serving_upstream(SecurityUpstream(issuer, keys)) as server:
        yield server


# --------------------------------------------------------------------------- module-wide servers


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_issuer(server_ssl: ssl.SSLContext) -> AsyncIterator[TokenIssuer]:
    """One token issuer for a whole module."""
    async with serving_issuer(server_ssl) as token_issuer:
        yield token_issuer
    _LEDGER.secret(*token_issuer.issued)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_upstream(shared_issuer: TokenIssuer) -> AsyncIterator[SecurityUpstream]:
    """One APIM-like upstream for a whole module."""
    keys = SubscriptionKeyPair(CANARY_PRIMARY, CANARY_SECONDARY)
    async with serving_upstream(SecurityUpstream(shared_issuer, keys)) as server:
        yield server


def process_env(issuer: TokenIssuer, upstream_url: str, ca_file: Path) -> dict[str, str]:
    """The environment of a gateway subprocess wired to `issuer` and `upstream_url`."""
    return {
        **gateway_environment(issuer.base_url, upstream_url, ca_file),
        "CIGW_UPSTREAM_TIMEOUT": "2",
        "CIGW_TOKEN_TIMEOUT": "2",
        "CIGW_CLIENT_TIMEOUT": "2",
        "CIGW_RETRY_ATTEMPTS": "1",
    }


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_session() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session for admin pages and well-formed requests."""
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["c", "python", "c-tls"])
async def gateway_proc(
    *,
    request: pytest.FixtureRequest,
    shared_issuer: TokenIssuer,
    shared_upstream: SecurityUpstream,
    shared_session: aiohttp.ClientSession,
    ca: trustme.CA,
    ca_file: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[GatewayProcess]:
    """A ready gateway subprocess on each aiohttp HTTP parser, and the C one behind HTTPS."""
    parser, _, transport = str(request.param).partition("-")
    env = process_env(shared_issuer, f"{shared_upstream.base_url}/v1", ca_file)
    if transport == "tls":
        cert, key, _ = write_pair(ca, tmp_path_factory.mktemp("listener-tls"))
        env |= {"CIGW_TLS_CERT_FILE": str(cert), "CIGW_TLS_KEY_FILE": str(key)}
        _LEDGER.secret(key_canary(key))  # the listener's private key must never be echoed
    process = await GatewayProcess.start(env, _LEDGER, parser=parser)
    if transport == "tls":
        process.client_tls = client_context(ca)
        assert process.listening.get("tls") is True, process.listening
    try:
        # Asserted at start-up: a module run "under both parsers" must really use both.
        assert process.listening.get("http_parser") == parser, process.listening
        await process.wait_ready(shared_session)
        yield process
    finally:
        await process.stop()
