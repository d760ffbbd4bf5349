"""`ci-gateway sandbox`: a token issuer, a Customer Insights stand-in and the gateway, together.

Only the two far ends are stand-ins. MSAL fetches the gateway's tokens over HTTPS from a
local issuer whose throwaway CA the gateway pins (CIGW_AUTHORITY_CA_FILE); the stand-in
checks the subscription key and the bearer token as APIM does; the gateway is built from
a settings mapping by `config.load`, as any deployment is. Everything listens on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import shutil
import signal
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
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from gateway import logging as gateway_logging
from gateway.app import Gateway, create_app, serve
from gateway.config import load
from gateway.errors import ConfigError
from gateway.sandbox.apim import KEY_HEADER, SubscriptionKeyPair, apim_guard
from gateway.sandbox.customer_insights import create_customer_insights_app
from gateway.sandbox.issuer import ClientRegistration, TokenIssuer
from gateway.sandbox.tls import ServerTLS, create_server_tls, write_private

LOOPBACK = "127.0.0.1"
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
    """The issuer, the stand-in and the gateway, running; `start()` builds one."""

    issuer: TokenIssuer
    keys: SubscriptionKeyPair
    tally: KeyTally
    stand_in_url: str  # the gateway's upstream base URL, http://127.0.0.1:<port>/v1
    gateway: Gateway
    files: SandboxFiles
    _stack: AsyncExitStack
    _client: aiohttp.ClientSession
    _rotating: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def gateway_url(self) -> str:
        """The proxy listener: callers send requests here without any credentials."""
        return f"http://{LOOPBACK}:{self.gateway.proxy_port}"

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
    ) -> Sandbox:
        """Start issuer, stand-in and gateway; returns once the gateway holds a token."""
        stack = AsyncExitStack()
        try:
            # Every resource registers its own cleanup as it is made; stop() unwinds them
            # in reverse, so the gateway stops first, then the servers, then the files.
            client = await stack.enter_async_context(
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
            )
            registration = ClientRegistration(
                tenant_id=str(uuid.uuid4()),
                client_id=str(uuid.uuid4()),
                client_secret=secrets.token_urlsafe(32),
            )
            keys = SubscriptionKeyPair()
            files, tls = await asyncio.to_thread(_prepare_files, registration, keys)
            stack.push_async_callback(asyncio.to_thread, shutil.rmtree, files.directory, True)

            issuer = await asyncio.to_thread(TokenIssuer, registration, lifetime=token_lifetime)
            issuer.base_url = f"https://{LOOPBACK}:{await _listen(stack, issuer.app(), tls)}"

            tally = KeyTally(keys)
            stand_in = create_customer_insights_app()
            # Outermost first: the tally sees APIM's verdict, APIM guards the API.
            stand_in.middlewares.insert(0, apim_guard(keys, issuer.verify))
            stand_in.middlewares.insert(0, tally.middleware())
            stand_in_url = f"http://{LOOPBACK}:{await _listen(stack, stand_in)}/v1"

            env = {
                **_gateway_environment(registration, files, issuer.base_url, stand_in_url),
                "CIGW_LISTEN": f"{LOOPBACK}:{port}",
                "CIGW_ADMIN_LISTEN": f"{LOOPBACK}:{admin_port}",  # loopback: this is a demo
                "CIGW_KEY_RELOAD_INTERVAL": str(key_reload_interval),
            }
            # Both read files (and the system trust store): off the event loop.
            settings = await asyncio.to_thread(load, env)
            gateway = await asyncio.to_thread(create_app, settings)
            await _serve_gateway(stack, gateway)
        except BaseException:
            await stack.aclose()
            raise
        return cls(issuer, keys, tally, stand_in_url, gateway, files, stack, client)

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
    registration: ClientRegistration, keys: SubscriptionKeyPair
) -> tuple[SandboxFiles, ServerTLS]:
    """Blocking: the private directory, the TLS material and the gateway's secret files."""
    directory = Path(tempfile.mkdtemp(prefix="ci-gateway-sandbox-"))  # mode 0700
    files = SandboxFiles(
        directory=directory,
        ca=directory / "ca.pem",
        client_secret=directory / "client-secret",
        primary_key=directory / "primary.key",
        secondary_key=directory / "secondary.key",
    )
    try:
        tls = create_server_tls(directory)
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
    registration: ClientRegistration,
    files: SandboxFiles,
    issuer_url: str,
    stand_in_url: str,
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
        "CIGW_UPSTREAM_URL": stand_in_url,
        "CIGW_SUBSCRIPTION_KEY_FILE": str(files.primary_key),
        "CIGW_SUBSCRIPTION_KEY_SECONDARY_FILE": str(files.secondary_key),
        "CIGW_SHUTDOWN_GRACE": "2",
    }


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
        port=args.port, admin_port=args.admin_port, token_lifetime=args.token_lifetime
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
    files, port = sandbox.files, sandbox.gateway.proxy_port
    data = f"instances/{instances[0]['instanceId']}/data/Customer"
    query = "$filter=Country%20eq%20%27Germany%27&$select=FullName,City&$top=3"
    return f"""
ci-gateway sandbox: everything runs in this process, on loopback only

  token issuer, for Entra ID        {sandbox.issuer.authority}
      HTTPS with a CA made at start; the gateway's MSAL client trusts that CA only
  Customer Insights API, for APIM   {sandbox.stand_in_url}
      refuses requests without a subscription key and an unexpired bearer token
  gateway                           {sandbox.gateway_url}
  gateway admin                     {sandbox.admin_url}/readyz  /metrics

  private files (0600; the directory is deleted on exit): {files.directory}/
      {files.client_secret.name:<30} the app registration's generated client secret
      {files.primary_key.name + ", " + files.secondary_key.name:<30} the subscription keys
      {files.ca.name:<30} the throwaway CA certificate
  tokens live {token_lifetime:g} s; the gateway renews each one at half its lifetime
  self-check: GET /instances through the gateway answered 200 with {len(instances)} instances

Try it (send no credentials: the gateway adds the token and the key):
  curl -s localhost:{port}/instances
  curl -s 'localhost:{port}/{data}?{query}'
  curl -s {sandbox.stand_in_url}/instances    # the API without the gateway: 401

Rotate the subscription keys under traffic: kill -USR1 {os.getpid()}    Stop: Ctrl-C
"""


def _say(text: str, stream: TextIO | None = None) -> None:
    print(text, file=stream or sys.stdout, flush=True)
