"""`ci-gateway sandbox`: a token issuer, two API stand-ins and the gateway, together.

Only the far ends are stand-ins. MSAL fetches the gateway's tokens over HTTPS from a
local issuer whose throwaway CA the gateway pins (CIGW_AUTHORITY_CA_FILE). The gateway
fronts two routes, as a team migrating from Customer Insights to Dataverse runs it:
`/dataverse/` goes to a Dataverse Web API stand-in at an HTTPS organization URL (scope
`{org}/.default`, no subscription key, links in answers rewritten back through the
gateway), and `/` to the Customer Insights stand-in, which checks the subscription key
and the bearer token as APIM does. The gateway is built by `config.load` from a settings
mapping and a routes file, as any deployment is; with `--tls` its proxy listener serves
HTTPS with the sandbox CA. Everything listens on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import ssl
import sys
import tempfile
import uuid
from collections import Counter
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import yaml
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from gateway import logging as gateway_logging
from gateway.app import Gateway, create_app, serve
from gateway.config import load
from gateway.errors import ConfigError
from gateway.sandbox.apim import KEY_HEADER, SubscriptionKeyPair, apim_guard
from gateway.sandbox.customer_insights import create_customer_insights_app
from gateway.sandbox.dataverse import (
    API_PATH,
    BYPASS_HEADERS,
    IMPERSONATION_HEADERS,
    DataverseOrganization,
)
from gateway.sandbox.issuer import ClientRegistration, TokenIssuer
from gateway.sandbox.tls import ServerTLS, create_server_tls, write_private

LOOPBACK = "127.0.0.1"
DATAVERSE_PREFIX = "/dataverse/"
# The Customer Insights API's resource, as CIGW_SCOPE defaults to.
CI_SCOPE = "https://api.ci.ai.microsoft.com/.default"
START_TIMEOUT = 20.0
POLL = 0.05  # how often start-up and the drill look at what they wait for
STEADY_REQUESTS = 5  # requests the drill sends before it rotates and after it is done


class SandboxError(Exception):
    """The sandbox cannot start or a drill step did not happen; the message says why."""


@dataclass(frozen=True, slots=True)
class SandboxFiles:
    """The private directory (0700, removed at stop) and the files the gateway reads (0600)."""

    directory: Path
    ca: Path
    client_secret: Path
    primary_key: Path
    secondary_key: Path
    routes: Path  # the gateway's configuration file: its two routes


@dataclass(slots=True)
class KeyTally:
    """What the stand-in's APIM layer decided, by the key slot each request carried."""

    keys: SubscriptionKeyPair
    accepted: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)

    def middleware(self) -> Middleware:
        """Count each answer: 401 is a rejection, anything else got past APIM."""

        @web.middleware
        async def tally(request: web.Request, handler: Handler) -> web.StreamResponse:
            sent = request.headers.get(KEY_HEADER)
            slot = {self.keys.primary: "primary", self.keys.secondary: "secondary"}.get(
                sent or "", "unknown" if sent else "none"
            )
            response = await handler(request)
            (self.rejected if response.status == 401 else self.accepted)[slot] += 1
            return response

        return tally


@dataclass(slots=True)
class Traffic:
    """Requests a drill sent through the gateway, and how many did not answer 200."""

    sent: int = 0
    failed: int = 0


@dataclass
class Sandbox:
    """The issuer, the stand-ins and the gateway, running; `start()` builds one."""

    issuer: TokenIssuer
    keys: SubscriptionKeyPair
    tally: KeyTally
    stand_in_url: str  # the CI route's upstream base URL, http://127.0.0.1:<port>/v1
    dataverse: DataverseOrganization  # its `url` is the Dataverse route's upstream
    gateway: Gateway
    files: SandboxFiles
    tls: bool  # the proxy listener serves HTTPS with the sandbox CA
    _stack: AsyncExitStack
    _client: aiohttp.ClientSession
    _rotating: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def gateway_url(self) -> str:
        """The proxy listener: callers send requests here without any credentials."""
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{LOOPBACK}:{self.gateway.proxy_port}"

    @property
    def dataverse_url(self) -> str:
        """The Dataverse route as an organization URL, for the SDK: {gateway}/dataverse."""
        return self.gateway_url + DATAVERSE_PREFIX.rstrip("/")

    @property
    def admin_url(self) -> str:
        """The admin listener: /readyz, /healthz, /metrics."""
        return f"http://{LOOPBACK}:{self.gateway.admin_port}"

    @property
    def rotating(self) -> bool:
        """True while a rotation drill runs."""
        return self._rotating.locked()

    @classmethod
    async def start(
        cls,
        *,
        port: int = 0,
        admin_port: int = 0,
        token_lifetime: float = 3600.0,
        key_reload_interval: float = 1.0,
        tls: bool = False,
    ) -> Sandbox:
        """Start issuer, stand-ins and gateway; returns once the gateway holds its tokens."""
        stack = AsyncExitStack()
        try:
            # Every resource registers its own cleanup as it is made; stop() unwinds them
            # in reverse, so the gateway stops first, then the servers, then the files.
            registration = ClientRegistration(
                tenant_id=str(uuid.uuid4()),
                client_id=str(uuid.uuid4()),
                client_secret=secrets.token_urlsafe(32),
            )
            keys = SubscriptionKeyPair()
            files, server_tls = await asyncio.to_thread(_prepare_files, registration, keys, tls)
            stack.push_async_callback(asyncio.to_thread, shutil.rmtree, files.directory, True)
            trust = await asyncio.to_thread(ssl.create_default_context, cafile=str(files.ca))
            client = await stack.enter_async_context(
                aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=30),
                    connector=aiohttp.TCPConnector(ssl=trust),
                )
            )

            issuer = await asyncio.to_thread(TokenIssuer, registration, lifetime=token_lifetime)
            issuer.base_url = f"https://{LOOPBACK}:{await _listen(stack, issuer.app(), server_tls)}"

            tally = KeyTally(keys)
            stand_in = create_customer_insights_app()
            # Outermost first: the tally sees APIM's verdict, APIM guards the API.
            stand_in.middlewares.insert(0, apim_guard(keys, issuer.verify))
            stand_in.middlewares.insert(0, tally.middleware())
            stand_in_url = f"http://{LOOPBACK}:{await _listen(stack, stand_in)}/v1"

            dataverse = DataverseOrganization(
                issuer.verify_audience, application_id=registration.client_id
            )
            dataverse_port = await _listen(stack, dataverse.app(), server_tls)
            dataverse.url = f"https://{LOOPBACK}:{dataverse_port}"

            env = {
                **_gateway_environment(registration, files, issuer.base_url),
                "CIGW_LISTEN": f"{LOOPBACK}:{port}",
                "CIGW_ADMIN_LISTEN": f"{LOOPBACK}:{admin_port}",  # loopback: this is a demo
                "CIGW_KEY_RELOAD_INTERVAL": str(key_reload_interval),
            }
            if server_tls.cert_file and server_tls.key_file:
                env["CIGW_TLS_CERT_FILE"] = str(server_tls.cert_file)
                env["CIGW_TLS_KEY_FILE"] = str(server_tls.key_file)
            routes = _routes(files, stand_in_url, dataverse.url)
            await asyncio.to_thread(write_private, files.routes, routes.encode())
            # Both read files (and the system trust store): off the event loop.
            settings = await asyncio.to_thread(load, env, files.routes)
            gateway = await asyncio.to_thread(create_app, settings)
            await _serve_gateway(stack, gateway)
        except BaseException:
            await stack.aclose()
            raise
        return cls(issuer, keys, tally, stand_in_url, dataverse, gateway, files, tls, stack, client)

    async def stop(self) -> None:
        """Stop the gateway, then the stand-in and the issuer; delete the private files."""
        await self._stack.aclose()

    async def get(self, path: str) -> tuple[int, Any]:
        """GET `path` through the gateway with no credentials: (status, JSON body)."""
        async with self._client.get(self.gateway_url + path) as response:
            return response.status, await response.json(content_type=None)

    async def rotate(self, say: Callable[[str], None] = print, pace: float = 0.2) -> Traffic:
        """The rotation drill, under traffic: the stand-in regenerates its primary key → the
        gateway falls back to the secondary → the new primary goes into the key file → the
        gateway reloads it and is back on the primary. Returns the traffic it drove."""
        async with self._rotating:
            traffic = Traffic()
            driver = asyncio.ensure_future(self._drive(traffic, pace))
            say(f"rotation: GET /instances through the gateway every {pace:g} s (see key_slot)")
            try:
                await self._rotate(say, traffic, driver)
            finally:
                driver.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await driver
            say(f"rotation done: {traffic.sent} requests via the gateway, {traffic.failed} failed")
            return traffic

    async def _rotate(
        self, say: Callable[[str], None], traffic: Traffic, driver: asyncio.Future[None]
    ) -> None:
        accepted = self.tally.accepted
        await self._until(lambda: traffic.sent >= STEADY_REQUESTS, driver, "answer")
        before = accepted["secondary"]
        new_primary = self.keys.regenerate("primary")
        say("rotation 1/4: the stand-in regenerated its primary key (the portal's Regenerate)")
        await self._until(lambda: accepted["secondary"] > before, driver, "fall back")
        say(
            "rotation 2/4: APIM refused the old primary; the gateway retried with the "
            "secondary key and keeps using it"
        )
        before = accepted["primary"]
        await asyncio.to_thread(write_private, self.files.primary_key, new_primary.encode() + b"\n")
        say(f"rotation 3/4: wrote the new primary key into {self.files.primary_key}")
        await self._until(lambda: accepted["primary"] > before, driver, "reload the key file")
        say("rotation 4/4: the gateway reloaded the key file and is back on the primary key")
        mark = traffic.sent
        await self._until(lambda: traffic.sent >= mark + STEADY_REQUESTS, driver, "answer")

    async def _drive(self, traffic: Traffic, pace: float) -> None:
        """Requests through the gateway, one at a time, `pace` seconds apart, until cancelled."""
        while True:
            try:
                async with self._client.get(f"{self.gateway_url}/instances") as response:
                    await response.read()
                    ok = response.status == 200
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            traffic.sent += 1
            traffic.failed += not ok
            await asyncio.sleep(pace)

    async def _until(
        self, happened: Callable[[], bool], driver: asyncio.Future[None], step: str
    ) -> None:
        # A reload takes up to one reload interval; allow several, plus slack for a slow host.
        within = 5.0 + 5 * self.gateway.settings.key_reload_interval
        try:
            async with asyncio.timeout(within):
                while not happened():
                    if driver.done():
                        driver.result()  # why the traffic stopped
                    await asyncio.sleep(POLL)
        except TimeoutError:
            raise SandboxError(f"the gateway did not {step} within {within:g} s") from None


def _prepare_files(
    registration: ClientRegistration, keys: SubscriptionKeyPair, tls_listener: bool
) -> tuple[SandboxFiles, ServerTLS]:
    """Blocking: the private directory, the TLS material and the gateway's secret files."""
    directory = Path(tempfile.mkdtemp(prefix="ci-gateway-sandbox-"))  # mode 0700
    files = SandboxFiles(
        directory=directory,
        ca=directory / "ca.pem",
        client_secret=directory / "client-secret",
        primary_key=directory / "primary.key",
        secondary_key=directory / "secondary.key",
        routes=directory / "gateway.yaml",
    )
    try:
        # One CA and one loopback certificate serve the issuer, the Dataverse stand-in and,
        # with --tls, the gateway's proxy listener.
        tls = create_server_tls(directory, keep_pair=tls_listener)
        assert registration.client_secret is not None  # noqa: S101 - set just above by start()
        for path, value in (
            (files.client_secret, registration.client_secret),
            (files.primary_key, keys.primary),
            (files.secondary_key, keys.secondary),
        ):
            write_private(path, value.encode() + b"\n")
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return files, tls


def _gateway_environment(
    registration: ClientRegistration, files: SandboxFiles, issuer_url: str
) -> dict[str, str]:
    """The gateway's settings, as a deployment would set them; never os.environ."""
    return {
        "AZURE_TENANT_ID": registration.tenant_id,
        "AZURE_CLIENT_ID": registration.client_id,
        "CIGW_CLIENT_SECRET_FILE": str(files.client_secret),
        "AZURE_AUTHORITY_HOST": issuer_url,
        "CIGW_AUTHORITY_CA_FILE": str(files.ca),
        # Instance discovery would ask login.microsoftonline.com about this authority.
        "CIGW_INSTANCE_DISCOVERY": "false",
        "CIGW_SHUTDOWN_GRACE": "2",
    }


def _routes(files: SandboxFiles, stand_in_url: str, organization_url: str) -> str:
    """The gateway's configuration file: the Dataverse route and the CI API as the catch-all,
    so every path the CI API had before (`/instances`, …) keeps working unprefixed."""
    document = {
        "routes": [
            {
                "prefix": DATAVERSE_PREFIX,
                "upstream_url": organization_url,
                "scope": f"{organization_url}/.default",
                "upstream_ca_file": str(files.ca),
                "rewrite_links": True,
                # A caller must never act as another user or skip business logic.
                "strip_headers": [*IMPERSONATION_HEADERS, *BYPASS_HEADERS],
            },
            {
                "prefix": "/",
                "upstream_url": stand_in_url,
                "scope": CI_SCOPE,
                "subscription_key_file": str(files.primary_key),
                "subscription_key_secondary_file": str(files.secondary_key),
            },
        ]
    }
    return yaml.safe_dump(document, sort_keys=False)


async def _listen(stack: AsyncExitStack, app: web.Application, tls: ServerTLS | None = None) -> int:
    """Serve `app` on an ephemeral loopback port until the stack closes; the port."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    await web.TCPSite(runner, LOOPBACK, 0, ssl_context=tls.context if tls else None).start()
    port: int = runner.addresses[0][1]
    return port


async def _serve_gateway(stack: AsyncExitStack, gateway: Gateway) -> None:
    """Run the gateway until the stack closes; returns once it listens and holds a token."""
    stop, started = asyncio.Event(), asyncio.Event()
    serving = asyncio.ensure_future(serve(gateway, stop, started))

    async def stop_gateway() -> None:
        stop.set()
        await serving

    stack.push_async_callback(stop_gateway)
    try:
        async with asyncio.timeout(START_TIMEOUT):
            while not started.is_set() or gateway.readiness.reason() is not None:
                if serving.done():
                    await serving  # raises why it ended, e.g. a port already in use
                    raise SandboxError("the gateway stopped while starting")
                if gateway.tokens.problem:
                    raise SandboxError(f"the gateway got no token: {gateway.tokens.problem}")
                await asyncio.sleep(POLL)
    except TimeoutError:
        reason = gateway.readiness.reason() or "it did not start listening"
        raise SandboxError(
            f"the gateway was not ready within {START_TIMEOUT:g} s: {reason}"
        ) from None


# --------------------------------------------------------------------------- command line


def main(args: argparse.Namespace) -> int:
    """Run the sandbox until SIGINT/SIGTERM; SIGUSR1 or --rotate-keys runs the rotation drill."""
    problem = _check_arguments(args)
    if problem:
        _say(f"ci-gateway sandbox: {problem}", sys.stderr)
        return 2
    gateway_logging.configure("info", "auto")
    try:
        return asyncio.run(_run(args))
    except KeyboardInterrupt:  # Ctrl-C while starting, before the signal handlers were set
        return 0
    except OSError as exc:
        _say(f"ci-gateway sandbox: {exc} (choose other ports: --port, --admin-port)", sys.stderr)
    except (SandboxError, ConfigError) as exc:
        _say(f"ci-gateway sandbox: {exc}", sys.stderr)
    return 1


def _check_arguments(args: argparse.Namespace) -> str | None:
    for option, port in (("--port", args.port), ("--admin-port", args.admin_port)):
        if not 0 <= port <= 65535:
            return f"{option} must be a port number from 0 to 65535 (0 picks a free one)"
    if args.port == args.admin_port != 0:
        return "--port and --admin-port must differ"
    # The gateway renews at half the remaining lifetime but waits at least a second.
    if not 2 <= args.token_lifetime <= 86400:
        return "--token-lifetime must be between 2 and 86400 seconds"
    return None


async def _run(args: argparse.Namespace) -> int:
    sandbox = await Sandbox.start(
        port=args.port,
        admin_port=args.admin_port,
        token_lifetime=args.token_lifetime,
        tls=args.tls,
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    drills: set[asyncio.Task[Traffic]] = set()

    def drill() -> None:
        if sandbox.rotating:
            _say("a rotation drill is already running")
            return
        task = loop.create_task(sandbox.rotate(_say))
        drills.add(task)
        task.add_done_callback(drill_done)

    def drill_done(task: asyncio.Task[Traffic]) -> None:
        drills.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _say(f"rotation drill failed: {task.exception()}")

    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        loop.add_signal_handler(signal.SIGUSR1, drill)
        status, instances = await sandbox.get("/instances")
        if status != 200:
            raise SandboxError(f"GET /instances through the gateway answered {status}: {instances}")
        who_am_i = f"{DATAVERSE_PREFIX}{API_PATH.lstrip('/')}/WhoAmI"
        status, user = await sandbox.get(who_am_i)
        if status != 200:
            raise SandboxError(f"GET {who_am_i} through the gateway answered {status}: {user}")
        _say(_banner(sandbox, instances, args.token_lifetime))
        if args.rotate_keys:
            drill()
        await stop.wait()
        _say("stopping: the gateway drains first, then the stand-in and the issuer")
    finally:
        for task in list(drills):
            task.cancel()
        await asyncio.gather(*drills, return_exceptions=True)
        await sandbox.stop()
    _say(f"stopped; {sandbox.files.directory} is deleted")
    return 0


def _banner(sandbox: Sandbox, instances: list[dict[str, Any]], token_lifetime: float) -> str:
    files, org = sandbox.files, sandbox.dataverse.url
    data = f"instances/{instances[0]['instanceId']}/data/Customer"
    query = "$filter=Country%20eq%20%27Germany%27&$select=FullName,City&$top=3"
    # Over TLS curl needs the sandbox CA; "localhost" is in the certificate too.
    curl = f"curl -s --cacert {files.ca}" if sandbox.tls else "curl -s"
    gateway = sandbox.gateway_url.replace(LOOPBACK, "localhost")
    gateway = gateway if sandbox.tls else gateway.removeprefix("http://")
    api = f"{gateway}{DATAVERSE_PREFIX}{API_PATH.lstrip('/')}"
    listener = "HTTPS with the sandbox CA" if sandbox.tls else "plain HTTP (--tls: HTTPS)"
    pair = ""
    trust = ""
    if sandbox.tls:
        pair = f"\n      {'server.crt, server.key':<30} the proxy listener's certificate and key"
        trust = f"""
Trust the gateway's certificate, signed by the sandbox CA {files.ca}:
  curl: --cacert {files.ca}
  Python requests and Microsoft's Dataverse SDK: export REQUESTS_CA_BUNDLE={files.ca}
      then DataverseClient("{sandbox.dataverse_url}", credential): any token will do,
      the gateway replaces it
"""
    return f"""
ci-gateway sandbox: everything runs in this process, on loopback only

  token issuer, for Entra ID        {sandbox.issuer.authority}
      HTTPS with a CA made at start; the gateway's MSAL client trusts that CA only
  Customer Insights API, for APIM   {sandbox.stand_in_url}
      refuses requests without a subscription key and an unexpired bearer token
  Dataverse organization            {org}
      Web API at {API_PATH}/, HTTPS with the sandbox CA; wants a token for {org}
  gateway                           {sandbox.gateway_url}
      {listener}; two routes:
      {DATAVERSE_PREFIX:<12} -> Dataverse: scope {org}/.default, no subscription key,
                      links in answers rewritten to lead back through the gateway
      {"/":<12} -> Customer Insights: its scope and subscription key
  gateway admin                     {sandbox.admin_url}/readyz  /metrics

  private files (0600; the directory is deleted on exit): {files.directory}/
      {files.client_secret.name:<30} the app registration's generated client secret
      {files.primary_key.name + ", " + files.secondary_key.name:<30} the subscription keys
      {files.ca.name:<30} the throwaway CA certificate
      {files.routes.name:<30} the gateway's two routes (its configuration file){pair}
  tokens live {token_lifetime:g} s; the gateway renews each one at half its lifetime
  self-check through the gateway: GET /instances answered 200 with {len(instances)} instances,
      GET {DATAVERSE_PREFIX}{API_PATH.lstrip("/")}/WhoAmI answered 200
{trust}
Try it (send no credentials: the gateway adds the token and, for the CI API, the key):
  {curl} {gateway}/instances
  {curl} '{gateway}/{data}?{query}'
  {curl} {api}/WhoAmI
  {curl} -H 'Prefer: odata.maxpagesize=2' '{api}/accounts?$select=name'
  curl -s {sandbox.stand_in_url}/instances    # the API without the gateway: 401

Rotate the subscription keys under traffic: kill -USR1 {os.getpid()}    Stop: Ctrl-C
"""


def _say(text: str, stream: TextIO | None = None) -> None:
    print(text, file=stream or sys.stdout, flush=True)
