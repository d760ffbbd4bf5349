"""Shared fixtures: trustme CA, the TLS token issuer, the APIM-like upstream, a gateway."""

from __future__ import annotations

import asyncio
import contextlib
import io
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import aiohttp
import pytest
import trustme
from aiohttp import web
from blockbuster import BlockBuster, blockbuster_ctx
from prometheus_client import CollectorRegistry
from yarl import URL

from gateway import config
from gateway import logging as gateway_logging
from gateway.app import Gateway, create_app, serve
from gateway.sandbox.apim import SubscriptionKeyPair
from gateway.sandbox.issuer import ClientRegistration, TokenIssuer
from tests.process import SPAWNED
from tests.servers.upstream import Upstream

UpstreamT = TypeVar("UpstreamT", bound=Upstream)
TENANT = "72f988bf-0000-4000-8000-00000000cafe"
CLIENT = "5b1f8f1c-0000-4000-8000-00000000beef"
# Canary secrets: tests assert none of them ever appears in output, errors or metrics.
CANARY_SECRET = "canary-client-secret-Zq81xW"
CANARY_PRIMARY = "canary0primary0key0000000004f1e"
CANARY_SECONDARY = "canary0secondary0key00000009b2c"


@pytest.fixture(autouse=True)
def blockbuster() -> Iterator[BlockBuster]:
    """Fail any test whose event loop makes a blocking call (aiohttp's own suite does this)."""
    with blockbuster_ctx(scanned_modules=["gateway"]) as bb:
        yield bb


@pytest.fixture(autouse=True)
async def reap_gateway_processes() -> AsyncIterator[None]:
    """Kill gateway child processes a test left running (a failed assertion skips its stop)."""
    yield
    while SPAWNED:
        process = SPAWNED.pop()
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


@pytest.fixture(autouse=True)
def log_output() -> io.StringIO:
    """Everything the gateway logs during the test, as JSON lines."""
    buffer = io.StringIO()
    gateway_logging.configure("debug", "json", buffer, cache=False)
    return buffer


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    """A throwaway certificate authority for the local TLS servers."""
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CA certificate as a file, for CIGW_AUTHORITY_CA_FILE."""
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture(scope="session")
def server_ssl(ca: trustme.CA) -> ssl.SSLContext:
    """Server-side TLS for 127.0.0.1, signed by the test CA."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


async def start_app(
    app: web.Application, ssl_context: ssl.SSLContext | None = None
) -> web.AppRunner:
    """Serve `app` on 127.0.0.1 at an ephemeral port."""
    # Cancelled handlers show a disconnect the way production servers notice one.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context).start()
    return runner


def base_url(runner: web.AppRunner, scheme: str = "http") -> str:
    """http(s)://127.0.0.1:<port> of a started runner."""
    return f"{scheme}://127.0.0.1:{runner.addresses[0][1]}"


@contextlib.asynccontextmanager
async def serving_issuer(server_ssl: ssl.SSLContext) -> AsyncIterator[TokenIssuer]:
    """The Entra-like token endpoint over TLS, knowing one app registration, while in use."""
    token_issuer = TokenIssuer(ClientRegistration(TENANT, CLIENT, client_secret=CANARY_SECRET))
    runner = await start_app(token_issuer.app(), server_ssl)
    token_issuer.base_url = base_url(runner, "https")
    try:
        yield token_issuer
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def serving_upstream(server: UpstreamT) -> AsyncIterator[UpstreamT]:
    """`server` (an APIM-like upstream) listening on loopback while in use."""
    runner = await start_app(server.app())
    server.base_url = base_url(runner)
    try:
        yield server
    finally:
        await runner.cleanup()


@pytest.fixture
async def issuer(server_ssl: ssl.SSLContext) -> AsyncIterator[TokenIssuer]:
    """The Entra-like token endpoint over TLS, knowing one app registration."""
    async with serving_issuer(server_ssl) as token_issuer:
        yield token_issuer


@pytest.fixture
async def upstream(issuer: TokenIssuer) -> AsyncIterator[Upstream]:
    """The APIM-like upstream, accepting the canary keys and the issuer's tokens."""
    keys = SubscriptionKeyPair(CANARY_PRIMARY, CANARY_SECONDARY)
    async with serving_upstream(Upstream(issuer, keys)) as server:
        yield server


def gateway_environment(issuer_url: str, upstream_url: str, ca_file: Path) -> dict[str, str]:
    """Environment for a gateway wired to a local issuer and upstream, ports chosen by the OS."""
    return {
        "AZURE_TENANT_ID": TENANT,
        "AZURE_CLIENT_ID": CLIENT,
        "AZURE_CLIENT_SECRET": CANARY_SECRET,
        "AZURE_AUTHORITY_HOST": issuer_url,
        "CIGW_INSTANCE_DISCOVERY": "false",
        "CIGW_AUTHORITY_CA_FILE": str(ca_file),
        "CIGW_UPSTREAM_URL": upstream_url,
        "CIGW_SCOPE": "https://api.ci.ai.microsoft.com/.default",
        "CIGW_LISTEN": "127.0.0.1:0",
        "CIGW_ADMIN_LISTEN": "127.0.0.1:0",
        "CIGW_SUBSCRIPTION_KEY": CANARY_PRIMARY,
        "CIGW_SUBSCRIPTION_KEY_SECONDARY": CANARY_SECONDARY,
        "CIGW_SHUTDOWN_GRACE": "2",
        "CIGW_UPSTREAM_TIMEOUT": "5",
        "CIGW_TOKEN_TIMEOUT": "5",
    }


@pytest.fixture
def gateway_env(issuer: TokenIssuer, upstream: Upstream, ca_file: Path) -> dict[str, str]:
    """Environment for a gateway wired to the local issuer and upstream."""
    return gateway_environment(issuer.base_url, f"{upstream.base_url}/v1", ca_file)


@dataclass
class RunningGateway:
    """A gateway serving in the test's event loop."""

    gateway: Gateway
    stop: asyncio.Event
    task: asyncio.Task[None]
    session: aiohttp.ClientSession

    def url(self, path: str) -> URL:
        """URL on the proxy listener, sent byte-exact (the client must not normalise it)."""
        return URL(f"http://127.0.0.1:{self.gateway.proxy_port}{path}", encoded=True)

    def admin(self, path: str) -> str:
        """URL on the admin listener."""
        return f"http://127.0.0.1:{self.gateway.admin_port}{path}"

    async def metrics_text(self) -> str:
        """The /metrics page."""
        async with self.session.get(self.admin("/metrics")) as response:
            return await response.text()

    async def wait_ready(self, within: float = 10.0) -> None:
        """Until /readyz answers 200."""
        async with asyncio.timeout(within):
            while True:
                async with self.session.get(self.admin("/readyz")) as response:
                    if response.status == 200:
                        return
                await asyncio.sleep(0.02)


StartGateway = Callable[..., Awaitable[RunningGateway]]


@pytest.fixture
async def start_gateway(
    gateway_env: dict[str, str], log_output: io.StringIO
) -> AsyncIterator[StartGateway]:
    """Factory: start a gateway with `gateway_env` plus overrides (None removes a variable)."""
    running: list[RunningGateway] = []
    session = aiohttp.ClientSession(auto_decompress=False)

    async def start(
        overrides: Mapping[str, str | None] | None = None,
        *,
        ready: bool = True,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> RunningGateway:
        env = {**gateway_env}
        for name, value in (overrides or {}).items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        # Loading reads files; production does it before the loop starts, tests off the loop.
        settings = await asyncio.to_thread(config.load, env)
        gateway = await asyncio.to_thread(
            create_app, settings, registry=CollectorRegistry(), monotonic=monotonic
        )
        stop, started = asyncio.Event(), asyncio.Event()
        task = asyncio.ensure_future(serve(gateway, stop, started))
        await asyncio.wait(
            [task, asyncio.ensure_future(started.wait())],
            timeout=10,
            return_when=asyncio.FIRST_COMPLETED,
        )
        if task.done():
            task.result()
        handle = RunningGateway(gateway, stop, task, session)
        running.append(handle)
        if ready:
            await handle.wait_ready()
        return handle

    yield start
    # Shown by pytest only when the test fails: the gateway's own account of what happened.
    print("\n".join(log_output.getvalue().splitlines()[-40:]))  # noqa: T201
    for handle in running:
        handle.stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(handle.task, 10)
    await session.close()


@pytest.fixture
async def gw(start_gateway: StartGateway) -> RunningGateway:
    """A ready gateway with the default test environment."""
    return await start_gateway()
