"""Access tokens from Entra ID: MSAL off the event loop, single flight, background renewal.

The gateway keeps its own copy of the token and serves it until its real expiry: MSAL
treats a token with under five minutes left as expired, and an Entra ID outage must not
cost those five minutes of traffic. A background task renews at half the remaining
lifetime, so after the first token no request waits for the token endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import re
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import msal
import requests

from gateway.config import CredentialKind, Settings
from gateway.credentials import load_certificate
from gateway.egress import Egress, ProxyServer
from gateway.errors import TokenUnavailable
from gateway.logging import get_logger, redactor
from gateway.metrics import Metrics

log = get_logger("tokens")
_AADSTS = re.compile(r"AADSTS\d+")
# urllib3's message when a proxy answers CONNECT with anything but 2xx.
_TUNNEL_REFUSED = re.compile(r"Tunnel connection failed: (\d{3}[ \w-]*)")


@dataclass(frozen=True, slots=True)
class AccessToken:
    """A bearer token and when it really expires (Unix time)."""

    value: str = field(repr=False)
    expires_at: float
    acquired_at: float


class TokenAcquisitionError(Exception):
    """The token endpoint did not give a token; the message is safe to show a caller."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Acquirer(Protocol):
    """Gets a fresh token from the token endpoint; blocking, run in a worker thread."""

    def __call__(self) -> AccessToken:
        """A new token, or TokenAcquisitionError."""

    def close(self) -> None:
        """Release connections."""


class _TokenEndpointSession(requests.Session):
    """The HTTP session MSAL uses: a per-request timeout, one pinned CA, our egress decision.

    MSAL applies its `timeout` only to sessions it creates itself. requests reads the
    environment itself (proxies, NO_PROXY, .netrc, REQUESTS_CA_BUNDLE) unless told not to:
    here config.load has read it once, for the token endpoint and the upstream alike, so
    the session trusts no environment and is given the proxy and the CA for each request.
    """

    def __init__(self, timeout: float, ca_file: Path | None, egress: Egress) -> None:
        super().__init__()
        self.trust_env = False
        self._timeout = timeout
        self._ca_file = str(ca_file) if ca_file else None
        self._egress = egress
        self.last_proxy: ProxyServer | None = None
        # MSAL drops the body of a 5xx answer; keep a safe summary so the cause can be named.
        self.last_answer: str | None = None
        self.last_retry_after: float | None = None

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", self._timeout)
        if self._ca_file is not None:
            kwargs["verify"] = self._ca_file
        kwargs["proxies"] = self._proxies(url)
        self.last_proxy = self._proxy(url)
        self.last_answer, self.last_retry_after = None, None
        response = super().request(method, url, *args, **kwargs)
        self.last_answer = _summarize_answer(response)
        retry_after = response.headers.get("Retry-After", "")
        self.last_retry_after = float(retry_after) if retry_after.isdigit() else None
        return response

    def rebuild_proxies(
        self, prepared_request: requests.PreparedRequest, proxies: Any
    ) -> dict[str, str]:
        """A redirect's proxy is decided again for its own URL, by the same decision."""
        rebuilt: dict[str, str] = super().rebuild_proxies(  # type: ignore[no-untyped-call]
            prepared_request, self._proxies(prepared_request.url or "")
        )
        return rebuilt

    def _proxies(self, url: str | bytes) -> dict[str, str]:
        """requests' `proxies` for `url`: our decision, and nothing for direct."""
        proxy = self._proxy(url)
        scheme = urlsplit(url.decode() if isinstance(url, bytes) else url).scheme
        return {} if proxy is None else {scheme: proxy.url_with_credentials()}

    def _proxy(self, url: str | bytes) -> ProxyServer | None:
        parts = urlsplit(url.decode() if isinstance(url, bytes) else url)
        return self._egress.proxy_for(parts.scheme, parts.hostname or "", parts.port)


def _summarize_answer(response: requests.Response) -> str | None:
    content_type = response.headers.get("Content-Type", "").split(";")[0].strip()
    if "json" not in content_type:
        return (
            f"HTTP {response.status_code} with {content_type or 'no content type'} instead of JSON"
        )
    if response.status_code < 400:
        return None
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code} with unreadable JSON"
    if not isinstance(body, dict):
        return f"HTTP {response.status_code}"
    return f"HTTP {response.status_code}: {_describe_error(body)}"


class MsalAcquirer:
    """Client-credentials tokens through MSAL; blocking, so called in a worker thread.

    One MSAL application (one app registration) serves every route: `for_scope` hands
    each scope its own Acquirer over it, and a lock keeps their acquisitions one at a
    time, since they share the application and the token endpoint's session.
    """

    def __init__(
        self,
        settings: Settings,
        clock: Callable[[], float] = time.time,
        scope: str | None = None,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._scope = scope or settings.scope
        self._app: msal.ConfidentialClientApplication | None = None
        self._app_secret: str | None = None
        self._http = _TokenEndpointSession(
            settings.token_timeout, settings.authority_trust, settings.egress
        )
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close pooled connections to the token endpoint."""
        self._http.close()

    def for_scope(self, scope: str) -> Acquirer:
        """An Acquirer of tokens for `scope`, sharing this one's MSAL application."""
        return _ScopedAcquirer(self, scope)

    def __call__(self) -> AccessToken:
        return self.acquire(self._scope)

    def acquire(self, scope: str) -> AccessToken:
        """A new token for `scope`, or TokenAcquisitionError."""
        with self._lock:
            return self._acquire(scope)

    def _acquire(self, scope: str) -> AccessToken:
        try:
            app = self._application()
            # Always ask the endpoint: the gateway caches the token itself, until real expiry.
            app.remove_tokens_for_client()
            started = self._clock()
            result = app.acquire_token_for_client(scopes=[scope])
        except TokenAcquisitionError:
            raise
        except Exception as exc:  # noqa: BLE001 - MSAL and requests raise many kinds; all mean "no token"
            self._app = None  # rebuild next time: discovery may have been what failed
            answer = self._http.last_answer
            message = (
                f"token endpoint answered {answer}"
                if answer and not isinstance(exc, requests.exceptions.RequestException)
                else _describe_exception(exc, self._http.last_proxy)
            )
            raise TokenAcquisitionError(message, self._http.last_retry_after) from None
        if "access_token" not in result:
            raise TokenAcquisitionError(
                f"token endpoint refused: {_describe_error(result)}", self._http.last_retry_after
            )
        token = str(result["access_token"])
        redactor.register(token)
        expires_in = float(result.get("expires_in", 0))
        return AccessToken(token, started + expires_in, started)

    def _application(self) -> msal.ConfidentialClientApplication:
        settings = self._settings
        credential, secret = self._credential()
        if self._app is not None and secret == self._app_secret:
            return self._app
        self._app = msal.ConfidentialClientApplication(
            settings.client_id,
            client_credential=credential,
            authority=settings.authority,
            instance_discovery=settings.instance_discovery,
            http_client=self._http,
            token_cache=msal.TokenCache(),
        )
        self._app_secret = secret
        return self._app

    def _credential(self) -> tuple[Any, str | None]:
        cred = self._settings.credential
        if cred.kind is CredentialKind.CERTIFICATE:
            assert cred.certificate_path is not None  # noqa: S101 - guaranteed by config.load
            certificate = load_certificate(cred.certificate_path, cred.certificate_password)
            if cred.certificate_password:
                redactor.register(cred.certificate_password.reveal())
            return certificate.for_msal(), certificate.thumbprint
        if cred.kind is CredentialKind.WORKLOAD_IDENTITY:
            assert cred.federated_token_file is not None  # noqa: S101 - guaranteed by config.load
            path = cred.federated_token_file
            # A callable: MSAL calls it at every token request, and the kubelet rotates the file.
            return {"client_assertion": lambda: _read_assertion(path)}, None
        secret = (
            cred.secret.reveal()
            if cred.secret
            else Path(str(cred.secret_file)).read_text(encoding="utf-8").strip()
        )
        redactor.register(secret)
        return secret, secret


@dataclass(frozen=True, slots=True)
class _ScopedAcquirer:
    """The shared MSAL application's tokens for one scope."""

    msal: MsalAcquirer
    scope: str

    def __call__(self) -> AccessToken:
        return self.msal.acquire(self.scope)

    def close(self) -> None:
        self.msal.close()


def _read_assertion(path: Path) -> str:
    assertion = path.read_text(encoding="utf-8").strip()
    redactor.register(assertion)
    return assertion


def _describe_error(result: Mapping[str, Any]) -> str:
    error = str(result.get("error", "unknown_error"))
    description = str(result.get("error_description", ""))
    codes = _AADSTS.findall(description)
    summary = description.strip().splitlines()[0][:200] if description.strip() else ""
    if codes and not summary.startswith(codes[0]):
        summary = f"{codes[0]}: {summary}"
    return redactor.scrub(f"{error}" + (f" ({summary})" if summary else ""))


def _describe_exception(exc: Exception, proxy: ProxyServer | None = None) -> str:
    detail = str(exc).splitlines()[0][:200] if str(exc) else ""
    name = type(exc).__name__
    if isinstance(exc, requests.exceptions.ProxyError) and proxy is not None:
        # Name the proxy, not the token endpoint: it is the proxy that failed.
        refused = _TUNNEL_REFUSED.search(str(exc))
        what = f"refused the tunnel: {refused.group(1)}" if refused else "cannot be reached"
        return redactor.scrub(f"token endpoint unreachable: egress proxy {proxy.address} {what}")
    if isinstance(exc, requests.exceptions.SSLError):
        return redactor.scrub(f"token endpoint TLS failure: {detail}")
    if isinstance(exc, requests.exceptions.Timeout):
        return "token endpoint timed out"
    if isinstance(exc, requests.exceptions.ConnectionError):
        return redactor.scrub(f"token endpoint unreachable: {name}: {detail}")
    if isinstance(exc, ValueError):
        # MSAL raises ValueError when the endpoint answers something other than JSON.
        return redactor.scrub(f"token endpoint answered an unreadable response: {detail}")
    return redactor.scrub(f"token request failed: {name}: {detail}")


class TokenManager:
    """The gateway's token source: cached token, single-flight acquisition, renewal loop."""

    def __init__(
        self,
        acquire: Acquirer,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        wait_timeout: float = 10.0,
        min_backoff: float = 1.0,
        max_backoff: float = 60.0,
        min_replace_interval: float = 5.0,
        rng: Callable[[], float] = random.random,
        offload: Callable[[Callable[[], AccessToken]], Awaitable[AccessToken]] = asyncio.to_thread,
    ) -> None:
        self._acquire_blocking = acquire
        self._offload = offload
        self._metrics = metrics
        self._clock = clock
        self._sleep = sleep
        self._wait_timeout = wait_timeout
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self._min_replace_interval = min_replace_interval
        self._rng = rng
        self._token: AccessToken | None = None
        self._inflight: asyncio.Future[AccessToken] | None = None
        self._problem: str | None = None
        self._last_replace = -math.inf

    @property
    def valid(self) -> bool:
        """True while a token that has not expired is held."""
        token = self._token
        return token is not None and self._clock() < token.expires_at

    @property
    def expires_at(self) -> float:
        """Unix time at which the held token expires (0 when there is none)."""
        token = self._token
        return token.expires_at if token else 0.0

    @property
    def problem(self) -> str | None:
        """Why the last acquisition failed, safe to show a caller."""
        return self._problem

    async def token(self) -> str:
        """The current token; waits only for an acquisition already under way."""
        token = self._token
        if token is not None and self._clock() < token.expires_at:
            return token.value
        if self._inflight is not None:
            with contextlib.suppress(TokenAcquisitionError, TimeoutError):
                async with asyncio.timeout(self._wait_timeout):
                    return (await asyncio.shield(self._inflight)).value
        raise TokenUnavailable(self._unavailable_message())

    async def replace(self, rejected: str) -> str:
        """A token other than `rejected` (the upstream refused it), fetched at most so often."""
        token = self._token
        if token is not None and token.value != rejected and self.valid:
            return token.value
        if (
            self._inflight is None
            and self._clock() - self._last_replace < self._min_replace_interval
        ):
            raise TokenUnavailable("the upstream rejected a freshly acquired token")
        self._last_replace = self._clock()
        try:
            return (await self._acquire_once()).value
        except TokenAcquisitionError:
            raise TokenUnavailable(self._unavailable_message()) from None

    async def run(self) -> None:
        """Acquire the first token at once, then renew ahead of expiry; backoff on failure."""
        backoff = self._min_backoff
        while True:
            try:
                token = await self._acquire_once()
            except TokenAcquisitionError as exc:
                if self._token is not None:
                    self._metrics.token_renewal_failures.inc()
                jittered = backoff / 2 + self._rng() * backoff / 2
                delay = max(jittered, exc.retry_after or 0.0)
                backoff = min(backoff * 2, self._max_backoff)
                log.warning("token_renewal_retry", retry_in_s=round(delay, 2), reason=str(exc))
                await self._sleep(delay)
                continue
            backoff = self._min_backoff
            # Half the remaining lifetime: a 1-hour token renews at 30 minutes, long before
            # MSAL's 5-minute margin, leaving time for retries during an Entra ID outage.
            await self._sleep(max(self._min_backoff, (token.expires_at - self._clock()) / 2))

    async def close(self) -> None:
        """Release the token endpoint's connections (at shutdown)."""
        await asyncio.to_thread(self._acquire_blocking.close)

    async def _acquire_once(self) -> AccessToken:
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(self._acquire())
            self._inflight.add_done_callback(self._clear_inflight)
        return await asyncio.shield(self._inflight)

    def _clear_inflight(self, future: asyncio.Future[AccessToken]) -> None:
        self._inflight = None
        if not future.cancelled():
            future.exception()  # mark retrieved: waiters may all have timed out

    async def _acquire(self) -> AccessToken:
        renewing = self._token is not None
        try:
            token = await self._offload(self._acquire_blocking)
        except TokenAcquisitionError as exc:
            self._metrics.token_requests.labels(outcome="failure").inc()
            self._problem = str(exc)
            log.error("token_acquisition_failed", reason=str(exc), renewing=renewing)
            self._update_gauges()
            raise
        self._metrics.token_requests.labels(outcome="success").inc()
        self._token, self._problem = token, None
        self._update_gauges()
        log.info(
            "token_renewed" if renewing else "token_acquired",
            expires_in_s=round(token.expires_at - self._clock()),
        )
        return token

    def _update_gauges(self) -> None:
        token = self._token
        self._metrics.token_expiry.set(token.expires_at if token else 0)

    def _unavailable_message(self) -> str:
        if self._token is not None:
            return f"the access token expired and renewal failed: {self._problem or 'unknown'}"
        return f"no access token yet: {self._problem or 'the first token request is under way'}"
