"""The proxy listener's one request handler: context, log, errors and limits around the proxy."""

from __future__ import annotations

import random
import re
import time
from asyncio import CancelledError
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog
from aiohttp import HttpVersion11, web

from gateway.errors import (
    BadRequest,
    ExpectationFailed,
    GatewayError,
    MethodNotAllowed,
    NoRoute,
    RequiredHeaderMissing,
)
from gateway.identities import Allowlist
from gateway.logging import access_log, get_logger
from gateway.metrics import NO_ROUTE, Metrics
from gateway.privileged import PrivilegedHeaders
from gateway.proxy import Proxy, refuse
from gateway.ratelimit import LocalLimiter
from gateway.routing import Router, RouteState
from gateway.state import CLOSE_CONNECTION, RequestContext

if TYPE_CHECKING:
    from gateway.callers import CallerAuthenticator  # PyJWT: loaded only with caller auth

log = get_logger("proxy")
# A caller's X-Request-ID is kept only if it is short and plain: it is logged and sent on.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


@dataclass(frozen=True, slots=True)
class CallerChecks:
    """Who may call and what they may send: the handler's step 4 before the rate limits."""

    privileged: PrivilegedHeaders
    authenticator: CallerAuthenticator | None = None
    required_header: tuple[str, str] | None = None
    # Identities (allowlist form) that may send the privileged headers.
    privileged_allow: Allowlist | None = None


def proxy_handler(
    proxy: Proxy,
    metrics: Metrics,
    limiter: LocalLimiter,
    router: Router,
    caller_header: str | None,
    *,
    checks: CallerChecks | None = None,
) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
    """The proxy listener's request handler: its steps, outermost first, in one function.

    They were four aiohttp middlewares behind a catch-all route; the listener now runs
    aiohttp's low-level server with this one handler, because the application layer
    (routing, the middleware chain) and every extra coroutine frame cost CPU on each
    request, and the benchmark's profile showed them (tests/perf/README.md).
    """

    tally = metrics.tally
    checks = checks or CallerChecks(PrivilegedHeaders())
    authenticator = checks.authenticator

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        # 1. Request context first: every later step and log line sees the request ID.
        ctx = _start_context(request)
        # 2. Access log and metrics wrap everything below, so refusals are counted too.
        tally.started()
        status, aborted, route_name = 500, False, NO_ROUTE
        try:
            # 3. Error mapping turns a GatewayError raised below into JSON; the only place.
            try:
                # 4. Refusals before any body is read or any upstream I/O: CONNECT, the
                # required header (412), the caller's token (401/403/503), routing (404),
                # then the rate limits keyed by the verified caller; privileged headers are
                # marked for removal. Only then is a caller waiting for "100 Continue"
                # told to send its body.
                if request.method == "CONNECT":
                    _refuse_connect()
                if checks.required_header is not None:
                    _require_header(request, checks.required_header)
                if authenticator is not None:
                    authorization = request.headers.get("Authorization")
                    caller = authenticator.cached(authorization)
                    if caller is None:
                        caller = await authenticator.authenticate(authorization)
                    ctx.caller, ctx.caller_label = caller.identity, caller.label
                    ctx.privileged = checks.privileged_allow is not None and bool(
                        checks.privileged_allow.label(caller.identity)
                    )
                    limited_as: str | None = caller.identity
                else:
                    limited_as = request.headers.get(caller_header) if caller_header else None
                route, path = _route(request, router)
                route_name = route.name
                _refuse_early(limiter, route, metrics, limited_as, ctx.caller_label)
                if not ctx.privileged:
                    _count_stripped(request, checks.privileged, metrics, ctx.caller)
                if "Expect" in request.headers:
                    await expect_continue(request)
                response = await proxy.handle(request, ctx, route, path)
            except Exception as exc:  # noqa: BLE001 - _map_error re-raises what it cannot answer
                response = _map_error(ctx, exc)
            status = response.status
            if not response.prepared:
                response.headers["X-Request-ID"] = ctx.request_id
            return response
        except BaseException as exc:
            # Cancelled: the caller went away (nginx's 499). Otherwise the answer broke
            # after its headers were sent, which the caller saw as an aborted response.
            status, aborted = (499, True) if isinstance(exc, CancelledError) else (502, True)
            raise
        finally:
            seconds = time.perf_counter() - ctx.started
            tally.finished(request.method, status, seconds, route_name, ctx.caller_label)
            access_log.request(
                ctx.request_id,
                request.path,
                method=request.method,
                status=status,
                duration_ms=round(seconds * 1000, 2),
                upstream_status=ctx.upstream_status,
                key_slot=ctx.key_slot,
                error=ctx.error_code,
                aborted=aborted or None,
                caller=ctx.caller,
            )

    return handle


def _start_context(request: web.BaseRequest) -> RequestContext:
    """The request's context, with the caller's X-Request-ID or a new one bound for logging."""
    given = request.headers.get("X-Request-ID")
    request_id = given if given and _REQUEST_ID.fullmatch(given) else new_request_id()
    ctx = RequestContext(request_id)
    # Rebinding replaces the previous request's ID on a kept-alive connection's task;
    # nothing else is bound per request, so no clear_contextvars (it walks every variable).
    structlog.contextvars.bind_contextvars(request_id=request_id)
    return ctx


def new_request_id() -> str:
    """A fresh request ID: 32 hex digits."""
    # Unique, not secret (every answer and log line carries it): the process's PRNG
    # instead of a getrandom(2) system call on every request.
    return f"{random.getrandbits(128):032x}"


def _route(request: web.BaseRequest, router: Router) -> tuple[RouteState, str]:
    """The request's route and its target without the prefix; NoRoute when none matches."""
    if request.method == "CONNECT":
        # Refused before routing: CONNECT's target is an authority, not a path.
        raise MethodNotAllowed("CONNECT is not supported: this is not a tunnel")
    target = request.raw_path
    found = router.match(target)
    if found is None:
        if not target.startswith("/"):
            raise BadRequest("only origin-form request targets (starting with /) are accepted")
        # Nothing about the configuration: the prefixes are the operator's business.
        raise NoRoute("no route for this path")
    return found


def _refuse_early(
    limiter: LocalLimiter,
    route: RouteState,
    metrics: Metrics,
    caller: str | None,
    caller_label: str,
) -> None:
    """RateLimited when the route's upstream hold, a gateway bucket or the route's says no."""
    refusal = route.hold.check()
    if refusal is None and limiter.active:
        refusal = limiter.check(caller)
    if refusal is None and route.limiter is not None:
        refusal = route.limiter.check(None)
    if refusal is not None:
        refuse(refusal, metrics, route.name, caller_label)


def _refuse_connect() -> None:
    # Refused first: CONNECT's target is an authority, not a path.
    raise MethodNotAllowed("CONNECT is not supported: this is not a tunnel")


def _require_header(request: web.BaseRequest, required: tuple[str, str]) -> None:
    """412 unless the request carries the configured header with its value."""
    name, value = required
    if request.headers.get(name) != value:
        raise RequiredHeaderMissing(f"this gateway requires the header {name}")


def _count_stripped(
    request: web.BaseRequest,
    privileged: PrivilegedHeaders,
    metrics: Metrics,
    caller: str | None,
) -> None:
    """Count and log the privileged headers the proxy will drop from this request."""
    found = privileged.present(request.headers)
    if found:
        for name in found:
            metrics.stripped_headers.labels(header=name).inc()
        log.warning("privileged_headers_stripped", headers=",".join(found), caller=caller)


def _map_error(ctx: RequestContext, exc: Exception) -> web.StreamResponse:
    """The JSON answer for `exc`, or re-raise it when no answer can be sent any more."""
    if ctx.response_started:
        raise exc
    if isinstance(exc, GatewayError):
        ctx.error_code = exc.code
        return render_error(exc)
    if isinstance(exc, web.HTTPException):
        # aiohttp's own refusals in the JSON shape.
        error = GatewayError(exc.reason)
        error.status, error.code = exc.status, exc.reason.lower().replace(" ", "_")
        return _map_error(ctx, error)
    log.error("unhandled_error", exc_info=exc)
    return _map_error(ctx, GatewayError("internal error; see the gateway's log"))


def render_error(exc: GatewayError) -> web.Response:
    """The JSON answer for a gateway error; also used for requests the parser refused."""
    response = web.json_response(
        {"error": {"code": exc.code, "message": exc.message}},
        status=exc.status,
        headers=exc.headers,
    )
    # Every answer carries an X-Request-ID: answers made before the request context exists
    # (parser refusals, Expect) get a new one; the middleware puts the request's own in.
    response.headers["X-Request-ID"] = new_request_id()
    if exc.close_connection:
        response.force_close()
        response[CLOSE_CONNECTION] = True
    return response


async def expect_continue(request: web.BaseRequest) -> None:
    """Answer "Expect: 100-continue" on HTTP/1.1; refuse any other expectation (417).

    aiohttp's application layer did this with a 417 text built from the header value,
    which failed (a 500) when that value held bytes that are not UTF-8.
    """
    if request.version != HttpVersion11:
        return  # HTTP/1.0 has no 100 Continue (RFC 9110 §10.1.1): ignored
    if request.headers.get("Expect", "").lower() != "100-continue":
        raise ExpectationFailed("only 'Expect: 100-continue' is supported")
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # the real answer's headers are still to come
