"""The forwarding handler: URL and header policy, body streaming, retry and fallback decisions.

One request's way through: build the target under the base path → filter headers →
await the token → pick the key → send upstream → on 401/429/5xx decide (fallback key,
fresh token, retry, hold) → stream the answer back. Lower layers raise `GatewayError`s;
the error middleware renders them.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC
from typing import Any, NoReturn
from urllib.parse import unquote

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.batch_requests import (
    BATCH_REQUEST_LIMIT,
    is_batch,
    multipart_boundary,
)
from gateway.config import Settings
from gateway.errors import (
    BadRequest,
    BodyIncomplete,
    GatewayError,
    MalformedRequest,
    Overloaded,
    PayloadTooLarge,
    RateLimited,
    UpstreamUnreachable,
)
from gateway.links import BATCH_LIMIT, JsonLinks, Links
from gateway.logging import get_logger
from gateway.metrics import Metrics
from gateway.ratelimit import Refusal
from gateway.routing import RouteState
from gateway.state import RequestContext
from gateway.upstream import IDEMPOTENT, Response

log = get_logger("proxy")

KEY_HEADER = "Ocp-Apim-Subscription-Key"
KEY_QUERY = "subscription-key"
REPLAY_LIMIT = 1024 * 1024  # bodies up to this size are kept so a request can be sent again
SMALL_RESPONSE = 256 * 1024  # answers up to this size are relayed in one write
_AUTH_BODY_LIMIT = 64 * 1024  # how much of a 401 body is read to tell key from token
RETRYABLE_STATUS = frozenset({502, 503, 504})
_RECONSIDER = frozenset({401, 403, 429}) | RETRYABLE_STATUS  # answers _decide looks at

# RFC 9110 §7.6.1 hop-by-hop fields, plus the legacy Proxy-Connection.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Never taken from the caller: credentials are the gateway's, the destination is the
# gateway's, framing is recomputed, and forwarding hints could steer APIM policies.
_CALLER_ONLY = frozenset(
    {
        "host",
        "authorization",
        KEY_HEADER.lower(),
        "content-length",
        "expect",
        "x-request-id",
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-forwarded-port",
    }
)


_REQUEST_DROP = HOP_BY_HOP | _CALLER_ONLY
# Connection values that name no other header ("keep-alive" is hop-by-hop already).
_PLAIN_CONNECTION = frozenset({"keep-alive", "close"})


# --------------------------------------------------------------------------- URL policy


def build_target(base_path: str, raw_target: str) -> str:
    """The upstream request target: base path + path, query minus the key param.

    The path is forwarded byte-exact; a target that is not origin-form, or whose
    dot-segments (raw or percent-encoded, with / or \\ as separators) would climb above
    the base path, is refused.
    """
    if not raw_target.startswith("/"):
        raise BadRequest("only origin-form request targets (starting with /) are accepted")
    if not (raw_target.isascii() and raw_target.isprintable()):
        # The C parser hands raw non-ASCII bytes through (surrogate-escaped); they would
        # fail later as a 500, or reach an upstream that decodes them its own way.
        raise BadRequest("the request target must be printable ASCII (percent-encode the rest)")
    path, _, query = raw_target.partition("?")
    if "#" in raw_target:
        raise BadRequest("a request target must not contain a fragment")
    if climbs_above_root(path):
        raise BadRequest("the path climbs above the API's base path")
    query = strip_key_param(query)
    return f"{base_path}{path}?{query}" if query else base_path + path


def climbs_above_root(path: str) -> bool:
    """True when resolving dot-segments, as any upstream might decode them, leaves the root."""
    if "." not in path and "%" not in path:
        return False  # the common case: no dot-segment can hide in it
    # Each reading an upstream might act on: as sent, then decoded up to three times
    # (double-encoded dots, %252e, count too: some servers decode twice). A servlet
    # container drops ";params" up to the next "/" before decoding ("/;%2fx/.." climbs
    # there) and does not split at "\\", which IIS does: check with and without that.
    reading = path
    for _ in range(4):
        if _climbs(reading) or ("\\" in reading and _climbs(reading.replace("\\", "/"))):
            return True
        decoded = unquote(reading)
        if decoded == reading:
            return False
        reading = decoded
    return False


def _climbs(path: str) -> bool:
    depth = 0
    for segment in path.split("/"):
        name = segment.split(";", 1)[0]  # "..;" is a dot-segment to servlet containers
        if name == "..":
            depth -= 1
            if depth < 0:
                return True
        elif name not in ("", "."):
            depth += 1
    return False


def strip_key_param(query: str) -> str:
    """The raw query without any subscription-key parameter, otherwise byte-exact."""
    if (
        not query
        or ("%" not in query and "subscription" not in query.lower())
        or KEY_QUERY not in unquote(query).lower()
    ):
        return query
    kept = [part for part in query.split("&") if not _names_key(part)]
    return "&".join(kept)


def _names_key(part: str) -> bool:
    # Lenient readings too: a ";" separator (some frameworks split on it) and leading "?"
    # (a target such as "/x??subscription-key=…", which some parsers strip).
    return any(
        unquote(piece.split("=", 1)[0].replace("+", " ")).strip().lstrip("?").strip().lower()
        == KEY_QUERY
        for piece in part.split(";")
    )


# --------------------------------------------------------------------------- header policy


def check_message(version: aiohttp.HttpVersion, headers: CIMultiDictProxy[str]) -> None:
    """Refuse what aiohttp's parsers let through but another server could read differently.

    Only `Transfer-Encoding: chunked`, once, on HTTP/1.1 (RFC 9112 §6.1): lists such as
    "chunked, chunked" or "identity, chunked" are accepted by one parser and not the other.
    Header names with "_" are refused: CGI-style servers read X_Forwarded_For as
    X-Forwarded-For, past the filter below (nginx drops them for the same reason).
    """
    if version not in (aiohttp.HttpVersion10, aiohttp.HttpVersion11):
        raise MalformedRequest("only HTTP/1.0 and HTTP/1.1 requests are accepted")
    codings = headers.getall("Transfer-Encoding", ())
    if codings and (
        version != aiohttp.HttpVersion11 or [c.strip().lower() for c in codings] != ["chunked"]
    ):
        raise MalformedRequest("Transfer-Encoding must be exactly 'chunked', on HTTP/1.1")
    for name, value in headers.items():
        if "_" in name:
            raise MalformedRequest("header names with underscores are refused")
        if not (name.isascii() and value.isascii()):
            # Bytes that are not UTF-8 arrive surrogate-escaped; the two parsers then
            # disagree on what to do with them, so such a request is not forwarded.
            try:
                name.encode()
                value.encode()
            except UnicodeEncodeError:
                raise MalformedRequest("header fields must be valid UTF-8") from None


def connection_named(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> frozenset[str]:
    """Header names listed in Connection: hop-by-hop by declaration."""
    values = headers.getall("Connection", ())
    if len(values) == 1 and values[0].lower() in _PLAIN_CONNECTION:
        return _PLAIN_CONNECTION  # what nearly every answer says; nothing extra to drop
    named: set[str] = set()
    for value in values:
        named.update(token.strip().lower() for token in value.split(","))
    return frozenset(named)


def request_headers(
    headers: CIMultiDictProxy[str], drop: frozenset[str] = frozenset()
) -> CIMultiDict[str]:
    """Caller headers that may go upstream (credentials are added later, by the gateway)."""
    return _end_to_end(headers, _REQUEST_DROP | drop if drop else _REQUEST_DROP)


def response_headers(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> CIMultiDict[str]:
    """Upstream response headers minus hop-by-hop ones."""
    return _end_to_end(headers, HOP_BY_HOP)


def _end_to_end(
    headers: CIMultiDictProxy[str] | CIMultiDict[str], drop: frozenset[str]
) -> CIMultiDict[str]:
    """`headers` without the names in `drop` (lower case), those Connection names, Proxy-*."""
    named = connection_named(headers) if "Connection" in headers else _PLAIN_CONNECTION
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lower = name.lower()
        if lower in drop or lower in named or lower.startswith("proxy-"):
            continue
        out.add(name, value)
    return out


def relayed_headers(response: Response) -> CIMultiDict[str]:
    """The answer's end-to-end headers, its transfer codings (not chunked) as content codings."""
    headers = response_headers(response.headers)
    if response.transfer_codings:
        # The body comes still encoded with codings other than chunked (RFC 9112 §6.1);
        # the caller's hop frames it anew, so they are declared as content codings,
        # applied after any the upstream named (gzip and deflate are the same formats).
        headers["Content-Encoding"] = ", ".join(
            (*headers.getall("Content-Encoding", ()), *response.transfer_codings)
        )
    return headers


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds: delta-seconds or an HTTP-date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def refuse(refusal: Refusal, metrics: Metrics, route: str, caller: str | None = None) -> NoReturn:
    """Count a local 429 by scope, route (and caller); raise it with Retry-After and RateLimit."""
    metrics.count_rate_limited(refusal.scope, route, caller)
    raise RateLimited(refusal.message(), headers=refusal.headers())


# --------------------------------------------------------------------------- bodies


class Body:
    """The request body: kept in memory when small enough to replay, else streamed once."""

    def __init__(
        self,
        data: bytes | None,
        *,
        request: web.BaseRequest | None = None,
        prefix: bytes = b"",
        limit: int = 0,
        read_timeout: float = 30.0,
        length: int | None = None,
    ) -> None:
        self.data = data
        self.length = len(data) if data is not None else length
        self._request, self._prefix, self._limit = request, prefix, limit
        self._read_timeout = read_timeout
        self._consumed = False

    @property
    def replayable(self) -> bool:
        """True when the body can be sent again (kept in memory, or none at all)."""
        return self._request is None

    def payload(self) -> bytes | AsyncIterator[bytes] | None:
        """What to hand the HTTP client for one attempt."""
        if self._request is None:
            return self.data
        if self._consumed:
            raise RuntimeError("a streamed body can be sent only once")
        self._consumed = True
        return self._stream(self._request)

    async def held(self, limit: int) -> Body:
        """This body kept whole in memory when it ends within `limit` bytes; else one that
        streams what was read so far and the rest (a body of None passes as it is)."""
        request = self._request
        if request is None or self._consumed:
            return self
        buffered = bytearray(self._prefix)
        while len(buffered) <= limit:
            chunk = await _read_chunk(request, self._read_timeout)
            if not chunk:
                return Body(bytes(buffered))
            buffered += chunk
        if len(buffered) > self._limit:
            raise PayloadTooLarge(f"the request body exceeds {self._limit} bytes")
        return Body(
            None,
            request=request,
            prefix=bytes(buffered),
            limit=self._limit,
            read_timeout=self._read_timeout,
            length=self.length,
        )

    async def _stream(self, request: web.BaseRequest) -> AsyncIterator[bytes]:
        sent = len(self._prefix)
        if self._prefix:
            yield self._prefix
        while True:
            chunk = await _read_chunk(request, self._read_timeout)
            if not chunk:
                return
            sent += len(chunk)
            if sent > self._limit:
                # Cut off at the cap: raising here aborts the upstream exchange.
                raise PayloadTooLarge(f"the request body exceeds {self._limit} bytes")
            yield chunk


_NO_BODY = Body(None)  # shared: a body of None has no state


async def _read_chunk(request: web.BaseRequest, read_timeout: float) -> bytes:
    """The next piece of the caller's body (b"" at its end); BodyIncomplete on a stall or break."""
    try:
        async with asyncio.timeout(read_timeout):
            return await request.content.readany()
    except TimeoutError:
        raise BodyIncomplete("the request body stalled: nothing arrived in time") from None
    except web.RequestPayloadError:
        raise BodyIncomplete("the request body breaks its framing") from None


async def read_body(request: web.BaseRequest, limit: int, read_timeout: float) -> Body:
    """Small bodies are read whole (replayable); large or unbounded ones are streamed."""
    if not request.body_exists:
        return _NO_BODY
    length = request.content_length
    if length is not None and length > limit:
        raise PayloadTooLarge(f"the request body ({length} bytes) exceeds {limit} bytes")
    keep = min(REPLAY_LIMIT, limit)
    buffered = bytearray()
    while len(buffered) <= keep:
        chunk = await _read_chunk(request, read_timeout)
        if not chunk:
            return Body(bytes(buffered))
        buffered += chunk
    if len(buffered) > limit:
        raise PayloadTooLarge(f"the request body exceeds {limit} bytes")
    return Body(
        None,
        request=request,
        prefix=bytes(buffered),
        limit=limit,
        read_timeout=read_timeout,
        length=length,
    )


async def batch_body(
    request: web.BaseRequest, body: Body, route: RouteState, settings: Settings
) -> Body:
    """A $batch request's body with its parts' gateway URLs naming the upstream instead
    (gateway/batch_requests.py); unchanged when the request is not a POST to `$batch`,
    when nothing matches, when it is not an uncompressed multipart/mixed body, or when it
    is larger than BATCH_REQUEST_LIMIT."""
    rewriter = route.batch_requests
    if rewriter is None or not is_batch(request.method, request.raw_path):
        return body
    headers = request.headers
    boundary = multipart_boundary(headers.get("Content-Type"))
    encoding = headers.get("Content-Encoding", "identity").strip().lower() or "identity"
    if boundary is None or encoding != "identity" or body.length == 0:
        return body
    if body.data is None:
        # Streamed: held whole up to the bound, else passed on as it comes.
        body = await body.held(min(BATCH_REQUEST_LIMIT, settings.max_body_bytes))
        if body.data is None:
            return body
    data = body.data
    rewritten = rewriter.rewrite(data, boundary, request.scheme, headers.get("Host"))
    return Body(data if rewritten is None else rewritten)


# --------------------------------------------------------------------------- the handler


@dataclass(slots=True)
class Proxy:
    """Everything the forwarding handler needs, wired by app.create_app."""

    settings: Settings
    metrics: Metrics
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    rng: Callable[[], float] = random.random

    async def handle(
        self, request: web.BaseRequest, ctx: RequestContext, route: RouteState, path: str
    ) -> web.StreamResponse:
        """Forward one request (`path`: its target without the route's prefix); relay the answer."""
        # One coroutine from here to the upstream client: each nested await is paid for
        # on every request (the benchmark's profile).
        check_message(request.version, request.headers)
        settings = self.settings
        target = build_target(route.base_path, path)
        # Callers allowed the privileged headers are spared their removal (a smaller set).
        headers = request_headers(
            request.headers,
            route.privileged_drop_headers if ctx.privileged else route.drop_headers,
        )
        headers["X-Request-ID"] = ctx.request_id
        body = await read_body(request, settings.max_body_bytes, settings.client_timeout)
        method = request.method
        if route.links is not None:
            # Links are rewritten only in an uncompressed answer; a $batch request's parts
            # that name the gateway are rewritten to name the upstream.
            headers["Accept-Encoding"] = "identity"
            # The cheap check first: other methods pay nothing.
            body = await batch_body(request, body, route, settings) if method == "POST" else body
        route.budget.record_request()
        attempt = _Attempt(
            route=route,
            token=await route.tokens.token(),
            key=route.keys.current(),
            replayable=body.replayable,
            idempotent=method in IDEMPOTENT,
        )
        client = route.client
        assert client is not None  # noqa: S101 - set by its resource before serving
        hold, slots = route.hold, route.slots
        while True:
            refusal = hold.check()
            if refusal is not None:
                refuse(refusal, self.metrics, route.name, ctx.caller_label)
            headers["Authorization"] = f"Bearer {attempt.token}"
            if attempt.key is not None:
                headers[KEY_HEADER] = attempt.key[1]
                ctx.key_slot = attempt.key[0]
            if not slots.try_take() and not await slots.take(self.settings.connection_wait):
                raise Overloaded("every upstream connection slot is busy; retry later")
            try:
                started = time.perf_counter()
                try:
                    response = await client.request(
                        method, target, headers.items(), body.payload(), body.length
                    )
                except UpstreamUnreachable:
                    # A refused or reset connection, before any response byte. A timeout
                    # is not retried: the caller asked for an answer within it (504).
                    if await self._may_retry(attempt, "connect_error", None):
                        continue
                    raise
                self.metrics.tally.upstream_answered(time.perf_counter() - started, route.name)
                ctx.upstream_status = response.status
                try:
                    if response.status in _RECONSIDER:
                        again, prefix = await self._decide(response, attempt)
                        if again:
                            response.release()
                            continue
                    else:
                        prefix = b""
                    return await self._answer(request, ctx, response, prefix, route)
                except BaseException:
                    # The caller left during a back-off or a token refresh, or writing to
                    # it failed: an answer not read to its end takes its connection along.
                    response.release()
                    raise
            finally:
                slots.give_back()

    async def _decide(self, response: Response, attempt: _Attempt) -> tuple[bool, bytes]:
        """Whether to send again (fallback key, fresh token, retry), and any body already read."""
        status = response.status
        if status == 401:
            return await self._on_unauthorized(response, attempt)
        if status == 429 or (status == 403 and "Retry-After" in response.headers):
            wait = retry_after_seconds(response.headers.get("Retry-After"))
            attempt.route.hold.hold(wait if wait is not None else 1.0)
            log.warning("upstream_throttled", status=status, hold_s=wait, route=attempt.route.name)
            return False, b""
        if status in RETRYABLE_STATUS:
            hint = response.headers.get("Retry-After") if status == 503 else None
            return await self._may_retry(
                attempt, f"status_{status}", retry_after_seconds(hint)
            ), b""
        return False, b""

    async def _on_unauthorized(self, response: Response, attempt: _Attempt) -> tuple[bool, bytes]:
        kind, prefix = await self._classify_401(response)
        if kind == "key":
            self.metrics.upstream_auth_rejections.labels(
                credential="key", route=attempt.route.name
            ).inc()
            if attempt.key is None or attempt.tried_other_key:
                return False, prefix
            # Switch even when this request cannot be replayed: the next ones will succeed.
            other = attempt.route.keys.fallback(attempt.key[0])
            if other is None or not attempt.replayable:
                return False, prefix
            attempt.key, attempt.tried_other_key = other, True
            return True, prefix
        if kind == "token":
            self.metrics.upstream_auth_rejections.labels(
                credential="token", route=attempt.route.name
            ).inc()
            if attempt.refreshed_token or not attempt.replayable:
                return False, prefix
            attempt.token = await attempt.route.tokens.replace(attempt.token)
            attempt.refreshed_token = True
            return True, prefix
        return False, prefix

    async def _may_retry(self, attempt: _Attempt, reason: str, hint: float | None) -> bool:
        """Wait and return True when a retry is allowed: idempotent, replayable, in budget."""
        if not (attempt.idempotent and attempt.replayable):
            return False
        if attempt.retries >= self.settings.retry_attempts:
            return False
        if hint is not None and hint > self.settings.upstream_timeout:
            return False
        if not attempt.route.budget.try_spend():
            self.metrics.retry_budget_exhausted.inc()
            return False
        self.metrics.upstream_retries.labels(reason=reason, route=attempt.route.name).inc()
        # Full jitter (AWS architecture blog): spreads a burst of retries over the window.
        delay = hint if hint is not None else self.rng() * min(2.0, 0.05 * 2**attempt.retries)
        attempt.retries += 1
        await self.sleep(delay)
        return True

    async def _classify_401(self, response: Response) -> tuple[str, bytes]:
        """Tell APIM's subscription-key rejection from a bearer-token rejection."""
        prefix = b""
        while len(prefix) <= _AUTH_BODY_LIMIT:
            chunk = await response.readany()
            if not chunk:
                break
            prefix += chunk
        text = prefix[:_AUTH_BODY_LIMIT].decode("utf-8", "replace").lower()
        if "subscription key" in text:
            return "key", prefix
        challenge = response.headers.get("WWW-Authenticate", "").lower()
        if "bearer" in challenge or "access token" in text or "invalid_token" in text:
            return "token", prefix
        return "other", prefix

    async def _relay(
        self,
        request: web.BaseRequest,
        ctx: RequestContext,
        response: Response,
        prefix: bytes,
    ) -> web.StreamResponse:
        # X-Request-ID: the handler adds it to answers not yet sent, as to every answer.
        headers = relayed_headers(response)
        length = response.content_length
        if request.method == "HEAD" or response.status in (204, 304):
            response.release()
            return web.StreamResponse(
                status=response.status, reason=response.reason, headers=headers
            )
        if length is not None and length <= SMALL_RESPONSE:
            data = response.body() if response.done else await response.read()
            return web.Response(
                status=response.status, reason=response.reason, headers=headers, body=prefix + data
            )
        headers["X-Request-ID"] = ctx.request_id  # sent below, before the handler sees it
        out = web.StreamResponse(status=response.status, reason=response.reason, headers=headers)
        try:
            await out.prepare(request)
            ctx.response_started = True
            if prefix:
                await out.write(prefix)
            while chunk := await response.readany():
                await out.write(chunk)
        except GatewayError as exc:
            # Headers are gone already: the only honest signal left is an aborted
            # connection, never a clean end that would pass a truncated body as complete.
            log.warning("upstream_aborted_mid_body", reason=exc.message)
            raise
        finally:
            response.release()
        await out.write_eof()
        return out

    def _answer(
        self,
        request: web.BaseRequest,
        ctx: RequestContext,
        response: Response,
        prefix: bytes,
        route: RouteState,
    ) -> Coroutine[Any, Any, web.StreamResponse]:
        """The relay for this answer, its links rewritten on a route with rewrite_links.

        A plain function handing back the relay's coroutine: no extra frame per request.
        """
        if route.links is not None:
            # The caller's Host gives the links' authority only, never a destination.
            links = route.links.for_answer(request.scheme, request.headers.get("Host"))
            if links is not None:
                return self._relay_rewritten(request, ctx, response, prefix, links)
        return self._relay(request, ctx, response, prefix)

    async def _relay_rewritten(
        self,
        request: web.BaseRequest,
        ctx: RequestContext,
        response: Response,
        prefix: bytes,
        links: Links,
    ) -> web.StreamResponse:
        """Relay with the answer's links leading back through the gateway (gateway/links.py)."""
        headers = relayed_headers(response)
        links.headers(headers)
        kind = links.body_kind(headers.items())
        if kind is None or request.method == "HEAD" or response.status in (204, 304):
            if request.method == "HEAD" or response.status in (204, 304):
                response.release()
                return web.StreamResponse(
                    status=response.status, reason=response.reason, headers=headers
                )
            return await self._stream(request, ctx, response, prefix, headers=headers)
        # The body's length changes: the answer is sent with its own length or chunked.
        headers.popall("Content-Length", None)
        length = response.content_length
        if kind[0] == "batch":
            data, complete = await _read_up_to(response, BATCH_LIMIT - len(prefix))
            if not complete:
                # Too large to hold: passed on unchanged (SECURITY.md).
                return await self._stream(request, ctx, response, prefix + data, headers=headers)
            data = prefix + data
            body = links.batch(data, kind[1])
            return web.Response(
                status=response.status, reason=response.reason, headers=headers, body=body
            )
        stream = links.json()
        if length is not None and length <= SMALL_RESPONSE:
            data = response.body() if response.done else await response.read()
            body = stream.feed(prefix + data) + stream.end()
            return web.Response(
                status=response.status, reason=response.reason, headers=headers, body=body
            )
        return await self._stream(request, ctx, response, prefix, headers=headers, rewrite=stream)

    async def _stream(
        self,
        request: web.BaseRequest,
        ctx: RequestContext,
        response: Response,
        prefix: bytes,
        *,
        headers: CIMultiDict[str],
        rewrite: JsonLinks | None = None,
    ) -> web.StreamResponse:
        """Stream the answer's body, through `rewrite` when given (then chunked)."""
        headers["X-Request-ID"] = ctx.request_id  # sent below, before the handler sees it
        out = web.StreamResponse(status=response.status, reason=response.reason, headers=headers)
        if rewrite is not None:
            out.enable_chunked_encoding()
        await out.prepare(request)
        ctx.response_started = True
        try:
            if prefix:
                await out.write(rewrite.feed(prefix) if rewrite else prefix)
            while chunk := await response.readany():
                await out.write(rewrite.feed(chunk) if rewrite else chunk)
        except GatewayError as exc:
            # Headers are gone already: the only honest signal left is an aborted
            # connection, never a clean end that would pass a truncated body as complete.
            log.warning("upstream_aborted_mid_body", reason=exc.message)
            raise
        finally:
            response.release()
        if rewrite is not None:
            await out.write(rewrite.end())
        await out.write_eof()
        return out


async def _read_up_to(response: Response, limit: int) -> tuple[bytes, bool]:
    """(the answer's body, True), or (its first bytes, False) once more than `limit` arrived."""
    data = bytearray()
    while len(data) <= limit:
        chunk = await response.readany()
        if not chunk:
            return bytes(data), True
        data += chunk
    return bytes(data), False


@dataclass(slots=True)
class _Attempt:
    """What one request has tried so far, so that each recovery happens at most once."""

    route: RouteState
    token: str
    key: tuple[str, str] | None
    replayable: bool
    idempotent: bool
    retries: int = 0
    tried_other_key: bool = False
    refreshed_token: bool = False
