"""The caller-token issuer's signing keys: fetched with aiohttp, cached, refreshed with limits.

Policy (issue 13): refreshed every REFRESH_SECONDS; a token naming an unknown `kid`
triggers a fetch only when the last fetch is REFETCH_SECONDS old (random kids must not
make the gateway hammer the issuer); the last good key set is used through an issuer
outage for up to MAX_STALE_SECONDS, after which callers get 503 until it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import aiohttp
from jwt import PyJWK
from yarl import URL

from gateway.callers import usable_keys
from gateway.egress import Egress
from gateway.logging import get_logger

log = get_logger("jwks")
REFRESH_SECONDS = 300.0
REFETCH_SECONDS = 30.0
MAX_STALE_SECONDS = 3600.0
_FIRST_RETRY, _MAX_RETRY = 1.0, 30.0
_MAX_DOCUMENT = 1 << 20  # a key set is a few KiB; a megabyte means something is wrong


class KeySetError(Exception):
    """The discovery document or key set could not be fetched or used; says why."""


class IssuerKeys:
    """The issuer's usable signing keys and the policy that keeps them fresh."""

    def __init__(
        self,
        issuer: str,
        *,
        jwks_url: str | None,
        tls: ssl.SSLContext,
        monotonic: Callable[[], float] = time.monotonic,
        timeout: float = 10.0,
        on_fetch: Callable[[bool], None] | None = None,
        egress: Egress | None = None,
    ) -> None:
        self._issuer = issuer
        self._jwks_url = jwks_url
        self._tls = tls
        self._clock = monotonic
        self._timeout = timeout
        self._on_fetch = on_fetch
        self._egress = egress or Egress()
        self._session: aiohttp.ClientSession | None = None
        self._keys: Mapping[str, PyJWK] = {}
        self._loaded_at: float | None = None
        self._last_fetch = -float("inf")
        self._last_ok = False
        self._inflight: asyncio.Future[bool] | None = None

    # ---------------------------------------------------------------- state

    @property
    def keys(self) -> Mapping[str, PyJWK]:
        """Usable keys by kid (empty before the first fetch succeeds)."""
        return self._keys

    def problem(self) -> str | None:
        """None while the key set may be used; else why not (for 503 answers and /readyz)."""
        if self._loaded_at is None:
            return "the issuer's key set has not been loaded yet"
        if self._clock() - self._loaded_at > MAX_STALE_SECONDS:
            return "the issuer's key set could not be refreshed for over an hour"
        return None

    # ---------------------------------------------------------------- fetching

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[None]:
        """The HTTP client session, open while the gateway runs (a cleanup context)."""
        # No environment: the egress decision (gateway/egress.py, from config) names the
        # proxy per request, as for the token endpoint and the upstream.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self._tls, limit=2),
            timeout=aiohttp.ClientTimeout(total=self._timeout),
            trust_env=False,
        )
        try:
            yield
        finally:
            await self._session.close()
            self._session = None

    async def refresh(self) -> bool:
        """Fetch now (one fetch at a time: callers join one in flight); True when keys changed."""
        if self._inflight is not None:
            return await asyncio.shield(self._inflight)
        future = self._inflight = asyncio.get_running_loop().create_future()
        changed = False
        try:
            changed = await self._fetch()
        except KeySetError as exc:
            log.error("caller_keys_fetch_failed", reason=str(exc), kept=bool(self._keys))
        finally:
            self._inflight = None
            future.set_result(changed)  # also when cancelled: those waiting get "no change"
        return changed

    async def refresh_for_unknown_kid(self) -> bool:
        """Fetch again for a kid not in the set, at most once per REFETCH_SECONDS."""
        if self._inflight is None and self._clock() - self._last_fetch < REFETCH_SECONDS:
            return False
        return await self.refresh()

    async def run(self, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        """Load the key set, then keep it fresh until cancelled (a background task)."""
        retry = _FIRST_RETRY
        while True:
            await self.refresh()
            if self._last_ok:
                retry = _FIRST_RETRY
                await sleep(REFRESH_SECONDS)
            else:
                # Not loaded, or the last refresh failed: try again sooner, backing off.
                await sleep(retry)
                retry = min(_MAX_RETRY, retry * 2)

    async def _fetch(self) -> bool:
        self._last_fetch = self._clock()
        self._last_ok = False
        try:
            jwks_url = self._jwks_url or await self._discover()
            keys = usable_keys(await self._get_json(jwks_url))
        except (KeySetError, ValueError) as exc:
            if self._on_fetch is not None:
                self._on_fetch(False)
            raise KeySetError(str(exc)) from None
        if not keys:
            if self._on_fetch is not None:
                self._on_fetch(False)
            raise KeySetError("the key set holds no RS256 or ES256 signing key")
        changed = set(keys) != set(self._keys)
        self._keys, self._loaded_at, self._last_ok = keys, self._clock(), True
        if self._on_fetch is not None:
            self._on_fetch(True)
        if changed:
            log.info("caller_keys_loaded", kids=",".join(sorted(keys)))
        return changed

    async def _discover(self) -> str:
        url = f"{self._issuer.rstrip('/')}/.well-known/openid-configuration"
        document = await self._get_json(url)
        # OpenID Connect Discovery §4.3: the document must name the issuer it was asked for.
        if document.get("issuer") != self._issuer:
            raise KeySetError("the discovery document names another issuer")
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str) or URL(jwks_uri).scheme != "https":
            raise KeySetError("the discovery document has no https jwks_uri")
        return jwks_uri

    async def _get_json(self, url: str) -> dict[str, Any]:
        session = self._session
        if session is None:
            raise KeySetError("the key client is not running")
        target = URL(url)
        proxy = self._egress.proxy_for(target.scheme, target.host or "", target.port)
        via: dict[str, Any] = {}
        if proxy is not None:
            via["proxy"] = f"http://{proxy.address}"
            authorization = proxy.authorization()
            if authorization is not None:
                via["proxy_headers"] = {"Proxy-Authorization": authorization}
        try:
            async with session.get(url, allow_redirects=False, **via) as response:
                if response.status != 200:
                    raise KeySetError(f"{URL(url).path} answered {response.status}")
                body = await response.content.read(_MAX_DOCUMENT + 1)
        except (aiohttp.ClientError, TimeoutError, ssl.SSLError) as exc:
            raise KeySetError(f"{URL(url).path} unreachable ({type(exc).__name__})") from None
        if len(body) > _MAX_DOCUMENT:
            raise KeySetError(f"{URL(url).path} answered more than 1 MiB")
        try:
            document = json.loads(body)
        except ValueError:
            raise KeySetError(f"{URL(url).path} did not answer JSON") from None
        if not isinstance(document, dict):
            raise KeySetError(f"{URL(url).path} did not answer a JSON object")
        return document
