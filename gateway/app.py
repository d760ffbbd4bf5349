"""Wiring: build the proxy and admin applications, run them, shut them down gracefully."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import math
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway import admin, listener
from gateway import logging as gateway_logging
from gateway.config import Route, Settings
from gateway.group_metrics import WorkerGroup, serve_own
from gateway.handler import CallerChecks, proxy_handler
from gateway.identities import Allowlist
from gateway.keys import SubscriptionKeys
from gateway.logging import get_logger
from gateway.metrics import FleetMetrics, Metrics
from gateway.privileged import PrivilegedHeaders
from gateway.proxy import Proxy
from gateway.ratelimit import ExchangeSlots, Limiter, LocalLimiter, RetryBudget, UpstreamHold
from gateway.routing import Router, RouteState
from gateway.state import METRICS, READINESS, WORKER_GROUP, Readiness
from gateway.tls import ReloadingTLS
from gateway.tokens import Acquirer, MsalAcquirer, TokenManager
from gateway.upstream import UpstreamClient

if TYPE_CHECKING:
    # Imported where they are built, only when configured: redis (fleet mode) and
    # PyJWT with cryptography (caller authentication) add megabytes of resident memory
    # to every sidecar that uses neither.
    from gateway.callers import CallerAuthenticator
    from gateway.fleet import Fleet
    from gateway.jwks import IssuerKeys

log = get_logger("app")


Resource = Callable[[], contextlib.AbstractAsyncContextManager[None]]


@dataclass(slots=True)
class Gateway:
    """The proxy handler, the admin application, and the services they share."""

    settings: Settings
    metrics: Metrics
    tokens: TokenManager  # the first route's (the only one without YAML routes:)
    keys: SubscriptionKeys  # the first route's
    readiness: Readiness
    handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
    # Started in order before the listeners open, stopped in reverse once they have
    # drained (aiohttp's cleanup-context contract: stopped only if started).
    resources: tuple[Resource, ...]
    admin_app: web.Application
    router: Router
    # HTTPS on the proxy listener (CIGW_TLS_CERT_FILE/KEY_FILE), the pair re-read on change.
    tls: ReloadingTLS | None = None
    proxy_port: int = 0  # the bound ports, known once serve() has started the listeners
    admin_port: int = 0

    async def reload_keys(self) -> None:
        """Re-read every route's subscription key files (SIGHUP)."""
        for keys in {id(k): k for k in self.route_keys}.values():
            await keys.reload()

    @property
    def route_keys(self) -> list[SubscriptionKeys]:
        """Each route's subscription keys, in route order."""
        return [cast(SubscriptionKeys, state.keys) for state in self.router.routes]


def create_app(
    settings: Settings,
    *,
    registry: CollectorRegistry | None = None,
    acquirer: Acquirer | None = None,
    clock: Callable[[], float] | None = None,
    monotonic: Callable[[], float] = time.monotonic,
    group: WorkerGroup | None = None,
) -> Gateway:
    """Build the proxy handler and the admin application; serve() starts the resources."""
    kubernetes_callers = settings.caller_auth == "kubernetes"
    metrics = Metrics(
        registry or CollectorRegistry(auto_describe=True), caller_label=kubernetes_callers
    )
    for route in settings.routes:
        metrics.add_route(route.name)
    for secret in settings.egress.secrets():
        gateway_logging.redactor.register(secret)  # proxy credentials, wherever they surface
    msal_acquirer = MsalAcquirer(settings) if acquirer is None else None
    # One token source per scope: routes to the same API share their token.
    tokens_by_scope: dict[str, TokenManager] = {}
    for route in settings.routes:
        if route.scope not in tokens_by_scope:
            tokens_by_scope[route.scope] = TokenManager(
                acquirer or cast(MsalAcquirer, msal_acquirer).for_scope(route.scope),
                metrics,
                wait_timeout=settings.token_timeout,
                clock=clock or time.time,
            )
    fleet = _fleet(settings, metrics, monotonic)
    caller_header = settings.rate_limit_caller_header
    # The caller-identity header is for the gateway only, never for the upstream.
    drop = frozenset({caller_header.lower()}) if caller_header else frozenset()
    # Dataverse's impersonation and bypass headers (+ CIGW_STRIP_HEADERS): dropped from
    # every caller's request except for identities on CIGW_PRIVILEGED_HEADERS_ALLOW.
    privileged = PrivilegedHeaders(settings.strip_headers)
    metrics.add_stripped_headers(privileged.names)
    states = [
        RouteState(
            route=route,
            tokens=tokens_by_scope[route.scope],
            keys=SubscriptionKeys(settings, metrics, route),
            hold=UpstreamHold(monotonic),
            budget=RetryBudget(clock=monotonic),
            slots=ExchangeSlots(settings.max_connections),
            limiter=route_limiter(settings, route, monotonic, fleet),
            drop_headers=drop | route.strip_headers | privileged.lower,
            privileged_drop_headers=drop | route.strip_headers,
        )
        for route in settings.routes
    ]
    router = Router(states)
    if fleet is not None:
        for state in states:
            fleet.share_hold(state.name, state.hold)  # each route's own hold, fleet-wide
    readiness = Readiness(
        {state.name: state.tokens for state in states}, named=not settings.routes[0].implicit
    )
    metrics.ready.set_function(lambda: 0 if readiness.reason() else 1)
    for state in states:
        metrics.upstream_hold.labels(route=state.name).set_function(state.hold.remaining)
    # Tokens are per scope; the gauge shows the one that expires first.
    managers = list(tokens_by_scope.values())
    metrics.token_expiry.set_function(lambda: min(m.expires_at for m in managers))
    limiter = worker_limiter(settings, monotonic, fleet)
    issuer_keys = _issuer_keys(settings, metrics, monotonic) if kubernetes_callers else None
    checks = _caller_checks(settings, metrics, privileged, issuer_keys, clock or time.time)
    readiness.checks = (issuer_keys.problem,) if issuer_keys is not None else ()
    proxy = Proxy(settings=settings, metrics=metrics)
    handler = proxy_handler(proxy, metrics, limiter, router, caller_header, checks=checks)
    tls = (
        ReloadingTLS(settings.tls, on_reload=metrics.tls_reloaded)
        if settings.tls is not None
        else None
    )
    resources: tuple[Resource, ...] = (
        *(_upstream_client(settings, state) for state in states),
        *(
            _background(f"token renewal {scope}", manager.run, manager.close)
            for scope, manager in tokens_by_scope.items()
        ),
        *(_background("key file watch", cast(SubscriptionKeys, s.keys).watch) for s in states),
        _background("log flush", gateway_logging.flush_periodically, _flush_logs),
    )
    if tls is not None:
        resources += (_background("tls certificate watch", tls.watch),)
    if fleet is not None:
        resources += (_fleet_membership(fleet),)
    if group is not None:
        # Before the listeners: a scrape of another worker may ask for this one's page.
        resources += (functools.partial(serve_own, metrics.registry, group.own_socket),)
    if issuer_keys is not None:
        # The key client first, then its refresh task (stopped in reverse order).
        resources += (issuer_keys.session, _background("caller key refresh", issuer_keys.run))

    admin_app = web.Application()
    admin_app[METRICS] = metrics
    admin_app[READINESS] = readiness
    if group is not None:
        admin_app[WORKER_GROUP] = group
    admin_app.add_routes(admin.routes())
    first = states[0]
    return Gateway(
        settings,
        metrics,
        cast(TokenManager, first.tokens),
        cast(SubscriptionKeys, first.keys),
        readiness,
        handler,
        resources,
        admin_app,
        router,
        tls,
    )


def _fleet(settings: Settings, metrics: Metrics, monotonic: Callable[[], float]) -> Fleet | None:
    """Fleet mode: budgets and holds shared through Redis with every other gateway."""
    if settings.redis_url is None:
        return None
    from gateway.fleet import Fleet

    return Fleet(settings, FleetMetrics(metrics.registry), monotonic)


def _caller_checks(
    settings: Settings,
    metrics: Metrics,
    privileged: PrivilegedHeaders,
    issuer_keys: IssuerKeys | None,
    clock: Callable[[], float],
) -> CallerChecks:
    """The handler's checks of who calls and what it may send."""
    return CallerChecks(
        privileged,
        authenticator=_authenticator(settings, metrics, issuer_keys, clock)
        if issuer_keys is not None
        else None,
        required_header=settings.require_header,
        privileged_allow=Allowlist.parse(settings.privileged_headers_allow)
        if settings.privileged_headers_allow
        else None,
    )


def _issuer_keys(
    settings: Settings, metrics: Metrics, monotonic: Callable[[], float]
) -> IssuerKeys:
    from gateway.jwks import IssuerKeys

    trust = settings.caller_trust
    assert settings.caller_issuer is not None  # noqa: S101 - config requires it with kubernetes
    return IssuerKeys(
        settings.caller_issuer,
        jwks_url=str(settings.caller_jwks_url) if settings.caller_jwks_url else None,
        # Built here, before the loop runs: loading a CA bundle is blocking file I/O.
        tls=ssl.create_default_context(cafile=str(trust) if trust else None),
        monotonic=monotonic,
        timeout=settings.token_timeout,
        on_fetch=metrics.caller_keys_fetched,
        egress=settings.egress,
    )


def _authenticator(
    settings: Settings, metrics: Metrics, keys: IssuerKeys, clock: Callable[[], float]
) -> CallerAuthenticator:
    from gateway.callers import CallerAuthenticator

    assert settings.caller_issuer is not None  # noqa: S101 - config requires it with kubernetes
    return CallerAuthenticator(
        keys,
        Allowlist.parse(settings.caller_allow),
        issuer=settings.caller_issuer,
        audience=settings.caller_audience,
        clock=clock,
        on_rejected=metrics.caller_rejected,
    )


def worker_limiter(
    settings: Settings, monotonic: Callable[[], float], fleet: Fleet | None = None
) -> LocalLimiter:
    """This process's share of the configured limits.

    With CIGW_WORKERS=N each worker keeps its own buckets and the kernel spreads connections
    evenly, so each gets 1/N of every rate and burst (bursts rounded up): together they
    enforce the configured figures. In fleet mode the figures are fleet-wide budgets that
    every worker of every pod spends from.
    """
    if fleet is not None:
        return LocalLimiter(
            rps=settings.rate_limit_rps,
            burst=settings.rate_limit_burst,
            caller_rps=settings.rate_limit_caller_rps,
            caller_burst=settings.rate_limit_caller_burst,
            # Fleet-wide per-identity budgets, named "caller:<namespace/serviceaccount>".
            caller_rates={
                identity: (rps, burst) for identity, rps, burst in settings.rate_limit_callers
            },
            clock=monotonic,
            buckets=fleet.bucket,
        )
    workers = settings.workers
    return LocalLimiter(
        rps=settings.rate_limit_rps / workers,
        burst=math.ceil(settings.rate_limit_burst / workers),
        caller_rps=settings.rate_limit_caller_rps / workers,
        caller_burst=math.ceil(settings.rate_limit_caller_burst / workers),
        caller_rates={
            identity: (rps / workers, math.ceil(burst / workers))
            for identity, rps, burst in settings.rate_limit_callers
        },
        clock=monotonic,
    )


def route_limiter(
    settings: Settings, route: Route, monotonic: Callable[[], float], fleet: Fleet | None = None
) -> Limiter | None:
    """The route's own budget (rate_limit_rps/_burst), this process's share; None when unset.

    In fleet mode it is the fleet budget named "route:<prefix>", shared by every gateway.
    """
    if not route.rate_limit_rps:
        return None
    if fleet is not None:
        return LocalLimiter(
            rps=route.rate_limit_rps,
            burst=route.rate_limit_burst,
            clock=monotonic,
            scope="route",
            buckets=fleet.bucket,
            name=f"route:{route.name}",
        )
    workers = settings.workers
    return LocalLimiter(
        rps=route.rate_limit_rps / workers,
        burst=math.ceil(route.rate_limit_burst / workers),
        clock=monotonic,
        scope="route",
    )


def upstream_client(settings: Settings, route: Route, tls: ssl.SSLContext) -> UpstreamClient:
    """The client for `route`'s upstream: every route's is built here, with the same options."""
    # Bound to the configured origin: no request can name another host. The egress
    # proxy is the one config.load decided (the token endpoint follows the same
    # decision); no netrc, no cookies, no headers the caller did not send.
    origin = route.upstream_url.origin()
    return UpstreamClient(
        origin,
        tls=tls,
        connect_timeout=settings.upstream_timeout,
        read_timeout=settings.upstream_timeout,
        max_idle=settings.max_connections,
        idle_timeout=settings.upstream_idle_timeout,
        max_connection_age=settings.upstream_max_connection_age,
        proxy=settings.egress_for(origin),
    )


def _upstream_client(settings: Settings, state: RouteState) -> Resource:
    trust = settings.route_trust(state.route)
    # Built here, before the loop runs: loading a CA bundle is blocking file I/O.
    tls = ssl.create_default_context(cafile=str(trust) if trust else None)

    @contextlib.asynccontextmanager
    async def context() -> AsyncIterator[None]:
        client = upstream_client(settings, state.route, tls)
        state.client = client
        yield
        await client.close()

    return context


def _fleet_membership(fleet: Fleet) -> Resource:
    @contextlib.asynccontextmanager
    async def context() -> AsyncIterator[None]:
        # One heartbeat before the listeners open: the first requests already know the
        # fleet's size and state (fallback when Redis does not answer within its timeout).
        await fleet.beat_once()
        task = asyncio.ensure_future(fleet.run())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await fleet.close()

    return context


async def _flush_logs() -> None:
    gateway_logging.flush()


def _background(
    name: str,
    run: Callable[[], Coroutine[Any, Any, None]],
    close: Callable[[], Coroutine[Any, Any, None]] | None = None,
) -> Resource:
    @contextlib.asynccontextmanager
    async def context() -> AsyncIterator[None]:
        task = asyncio.ensure_future(run())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if close is not None:
            await close()
        log.debug("background_task_stopped", task=name)

    return context


async def serve(
    gateway: Gateway, stop: asyncio.Event, started: asyncio.Event | None = None
) -> None:
    """Start the resources and both listeners, serve until `stop` is set, shut down gracefully."""
    settings = gateway.settings
    async with contextlib.AsyncExitStack() as resources:
        for resource in gateway.resources:
            await resources.enter_async_context(resource())
        proxy_runner = listener.proxy_runner(
            gateway.handler,
            client_timeout=settings.client_timeout,
            shutdown_timeout=settings.shutdown_grace,
        )
        admin_runner = web.AppRunner(gateway.admin_app, handle_signals=False, access_log=None)
        await admin_runner.setup()
        await proxy_runner.setup()
        try:
            await _listen(gateway, proxy_runner, admin_runner)
            if started is not None:
                started.set()
            await stop.wait()
        finally:
            # Shutdown, step by step (uvicorn's order):
            # 1. mark not ready, so the platform stops sending new traffic;
            gateway.readiness.draining = True
            log.info("shutdown_started", grace_s=settings.shutdown_grace)
            # 2. close the listener (new connections are refused), let in-flight requests
            #    finish within the grace period, then cancel what is left;
            await proxy_runner.cleanup()
            # 3. stop the resources (upstream connections, background tasks), newest first;
            await resources.aclose()
            # 4. the admin listener goes last, so probes see "draining" until the end.
            await admin_runner.cleanup()
            log.info("shutdown_complete")


async def _listen(
    gateway: Gateway, proxy_runner: web.BaseRunner, admin_runner: web.BaseRunner
) -> None:
    settings = gateway.settings
    proxy_site = web.TCPSite(
        proxy_runner,
        settings.listen.host,
        settings.listen.port,
        reuse_port=settings.workers > 1,
        ssl_context=gateway.tls.listener_context if gateway.tls else None,
    )
    admin_site = web.TCPSite(
        admin_runner,
        settings.admin_listen.host,
        settings.admin_listen.port,
        reuse_port=settings.workers > 1,
    )
    await proxy_site.start()
    await admin_site.start()
    gateway.proxy_port = proxy_runner.addresses[0][1]
    if caller_tokens_in_plaintext(settings):
        log.warning(
            "caller_tokens_in_plaintext",
            listen=str(settings.listen),
            hint="callers' bearer tokens cross the network unencrypted unless a service mesh "
            "encrypts them; set CIGW_TLS_CERT_FILE and CIGW_TLS_KEY_FILE",
        )
    gateway.admin_port = admin_runner.addresses[0][1]
    log.info(
        "listening",
        proxy=_bound(proxy_runner),
        admin=_bound(admin_runner),
        upstream=", ".join(f"{route.prefix} -> {route.upstream_url}" for route in settings.routes),
        tls=gateway.tls is not None,
        http_parser=listener.http_parser_in_use(),
    )
    for destination, url in settings.egress_destinations().items():
        log.info(
            "egress",
            destination=destination,
            egress=settings.egress.describe(url.scheme, url.host or "", url.port),
        )
    # Everything built so far (modules, settings, MSAL) lives as long as the process:
    # moved out of the collector's sight, a full collection no longer walks it and the
    # tail latency loses its GC pauses (gc.freeze docs; Instagram's pre-fork freeze).
    gc.collect()
    gc.freeze()


def caller_tokens_in_plaintext(settings: Settings) -> bool:
    """True when callers send tokens over a plaintext listener beyond loopback (a warning).

    Not an error: a service mesh may be doing TLS between the pods.
    """
    return (
        settings.caller_auth != "none"
        and settings.tls is None
        and not settings.listen.host.startswith(("127.", "::1", "localhost"))
    )


def _bound(runner: web.BaseRunner) -> str:
    return ", ".join(f"{address[0]}:{address[1]}" for address in runner.addresses)
