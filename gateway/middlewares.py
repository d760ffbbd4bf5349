"""The proxy listener's middlewares; app.py lists them in order and says why."""

from __future__ import annotations

import re
import time
import uuid
from asyncio import CancelledError

import structlog
from aiohttp import HttpVersion11, web
from aiohttp.typedefs import Handler, Middleware

from gateway.errors import (
    BadRequest,
    ExpectationFailed,
    GatewayError,
    MethodNotAllowed,
    RateLimited,
)
from gateway.logging import get_logger
from gateway.metrics import Metrics
from gateway.ratelimit import LocalLimiter, UpstreamHold
from gateway.state import CLOSE_CONNECTION, CONTEXT, RequestContext

access_log = get_logger("access")
log = get_logger("proxy")
# A caller's X-Request-ID is kept only if it is short and plain: it is logged and sent on.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Create the request context, bind the request ID for every log line, echo it back."""
    given = request.headers.get("X-Request-ID")
    request_id = given if given and _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
    ctx = RequestContext(request_id)
    request[CONTEXT] = ctx
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    response = await handler(request)
    if not response.prepared:
        response.headers["X-Request-ID"] = request_id
    return response


def access_log_and_metrics(metrics: Metrics) -> Middleware:
    """One summary line and the request counters, whatever happens further in."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        ctx = request[CONTEXT]
        metrics.inflight.inc()
        status, aborted = 500, False
        try:
            response = await handler(request)
            status = response.status
            return response
        except BaseException as exc:
            # Cancelled: the caller went away (nginx's 499). Otherwise the answer broke
            # after its headers were sent, which the caller saw as an aborted response.
            status, aborted = (499, True) if isinstance(exc, CancelledError) else (502, True)
            raise
        finally:
            metrics.inflight.dec()
            seconds = time.perf_counter() - ctx.started
            metrics.observe_request(request.method, status, seconds)
            access_log.info(
                "request",
                method=request.method,
                path=request.path,
                status=status,
                duration_ms=round(seconds * 1000, 2),
                upstream_status=ctx.upstream_status,
                key_slot=ctx.key_slot,
                error=ctx.error_code,
                aborted=aborted or None,
            )

    return middleware


@web.middleware
async def error_mapping(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The only place that renders the gateway's own errors as JSON."""
    ctx = request[CONTEXT]
    if request.method == "CONNECT":
        # Answered before routing's verdict is used: CONNECT's target is an authority.
        ctx.error_code = MethodNotAllowed.code
        return render_error(MethodNotAllowed("CONNECT is not supported: this is not a tunnel"))
    try:
        return await handler(request)
    except GatewayError as exc:
        if ctx.response_started:
            raise
        ctx.error_code = exc.code
        return render_error(exc)
    except web.HTTPNotFound:
        # The catch-all route matches every origin-form target, so only another form
        # ("*" of OPTIONS *, an authority) reaches here; it is the caller's error, not ours.
        ctx.error_code = BadRequest.code
        return render_error(
            BadRequest("only origin-form request targets (starting with /) are accepted")
        )
    except web.HTTPException as exc:
        # aiohttp's own refusals (an Expect other than 100-continue: 417) in the JSON shape.
        error = GatewayError(exc.reason)
        error.status, error.code = exc.status, exc.reason.lower().replace(" ", "_")
        ctx.error_code = error.code
        return render_error(error)
    except Exception:
        if ctx.response_started:
            raise
        log.exception("unhandled_error")
        ctx.error_code = "internal_error"
        return render_error(GatewayError("internal error; see the gateway's log"))


def render_error(exc: GatewayError) -> web.Response:
    """The JSON answer for a gateway error; also used for requests the parser refused."""
    response = web.json_response(
        {"error": {"code": exc.code, "message": exc.message}},
        status=exc.status,
        headers=exc.headers,
    )
    if exc.close_connection:
        response.force_close()
        response[CLOSE_CONNECTION] = True
    return response


async def expect_continue(request: web.Request) -> web.StreamResponse | None:
    """aiohttp's Expect handling, with the gateway's JSON refusal.

    It runs before any middleware; aiohttp's default builds its 417 text from the header
    value, which fails (a 500) when that value holds bytes that are not UTF-8.
    """
    if request.version != HttpVersion11:
        return None
    if request.headers.get("Expect", "").lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the real answer's headers are still to come
        return None
    return render_error(ExpectationFailed("only 'Expect: 100-continue' is supported"))


def rate_limit(
    limiter: LocalLimiter, hold: UpstreamHold, metrics: Metrics, caller_header: str | None
) -> Middleware:
    """429 before any upstream I/O: local buckets first, then the upstream's hold."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        refusal = hold.check()
        if refusal is None and limiter.active:
            caller = request.headers.get(caller_header) if caller_header else None
            refusal = limiter.check(caller)
        if refusal is not None:
            metrics.rate_limited.labels(scope=refusal.scope).inc()
            message = (
                "the upstream asked for a pause; retry later"
                if refusal.scope == "upstream"
                else f"{refusal.scope} rate limit exceeded; retry later"
            )
            raise RateLimited(message, headers=refusal.headers())
        return await handler(request)

    return middleware
