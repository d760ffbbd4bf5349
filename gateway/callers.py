"""Caller authentication: Kubernetes projected service-account tokens, verified offline.

A caller sends its pod's projected token (audience CIGW_CALLER_AUDIENCE) as a bearer
token. PyJWT checks the signature (JWS) with the issuer's key named by `kid`; the claims
are checked here, stricter than a generic JWT library would (SECURITY.md lists each
difference, tests/unit/test_caller_tokens.py holds them against PyJWT's full decode).
Verified tokens are cached by their SHA-256 until they expire, so a caller's repeated
requests cost a hash and a dictionary lookup.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

from cachetools import TLRUCache
from jwt import PyJWK, PyJWS
from jwt.exceptions import InvalidSignatureError, PyJWTError

from gateway.errors import CallerForbidden, CallerKeysUnavailable, CallerUnauthenticated
from gateway.identities import NAME, Allowlist, Caller
from gateway.logging import get_logger

log = get_logger("callers")

# Signature algorithms a Kubernetes API server signs with (RSA or P-256 service-account
# keys); anything else, above all "none" and the HMAC family, is refused before any key
# is looked at.
ALGORITHMS = frozenset({"RS256", "ES256"})
LEEWAY_SECONDS = 60  # clock skew allowed on exp, nbf and iat
MAX_LIFETIME_SECONDS = 24 * 3600  # exp - iat; the kubelet asks for 10 min to 48 h
_JWS = PyJWS(options={"verify_signature": True})


class TokenRejectedError(ValueError):
    """The token fails a check; the message names which, in words safe to log."""


class UnknownKeyError(TokenRejectedError):
    """The token names a key id the current key set does not hold."""


# --------------------------------------------------------------------------- the checks


def usable_keys(jwks: Mapping[str, Any]) -> dict[str, PyJWK]:
    """The signing keys of a JWKS document by `kid`, those usable with ALGORITHMS only."""
    keys: dict[str, PyJWK] = {}
    entries = jwks.get("keys")
    if not isinstance(entries, list):
        raise ValueError("the key set has no 'keys' list")  # noqa: TRY004 - a bad document
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("kid"), str):
            continue
        if entry.get("use", "sig") != "sig":
            continue
        try:
            key = PyJWK(entry)
        except PyJWTError:
            continue  # an algorithm or key type we do not accept, or a broken key
        if key.algorithm_name in ALGORITHMS:
            keys[entry["kid"]] = key
    return keys


def verify(
    token: str,
    keys: Mapping[str, PyJWK],
    *,
    issuer: str,
    audience: str,
    now: float,
) -> tuple[str, float]:
    """Check a projected service-account token: its `namespace/serviceaccount` and `exp`.

    Raises TokenRejectedError (UnknownKeyError for a kid the key set lacks).
    """
    if token.count(".") != 2:
        raise TokenRejectedError("not a signed JWT")
    try:
        header = _JWS.get_unverified_header(token)
    except PyJWTError:
        raise TokenRejectedError("malformed header") from None
    algorithm = header.get("alg")
    if algorithm not in ALGORITHMS:
        raise TokenRejectedError("algorithm not allowed")
    kid = header.get("kid")
    if not isinstance(kid, str):
        raise TokenRejectedError("no key id")
    key = keys.get(kid)
    if key is None:
        raise UnknownKeyError("unknown key id")
    if key.algorithm_name != algorithm:
        raise TokenRejectedError("algorithm does not match the key")
    try:
        payload = _JWS.decode_complete(token, key.key, algorithms=[algorithm])["payload"]
    except InvalidSignatureError:
        raise TokenRejectedError("bad signature") from None
    except PyJWTError:
        raise TokenRejectedError("malformed token") from None
    try:
        claims = json.loads(payload)
    except ValueError:
        raise TokenRejectedError("claims are not JSON") from None
    if not isinstance(claims, dict):
        raise TokenRejectedError("claims are not an object")
    return _check_claims(claims, issuer=issuer, audience=audience, now=now)


def _number(claims: Mapping[str, Any], name: str) -> float:
    value = claims.get(name)
    if value is None:
        raise TokenRejectedError(f"no {name}")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TokenRejectedError(f"{name} is not a number")
    return float(value)


def _check_claims(
    claims: Mapping[str, Any], *, issuer: str, audience: str, now: float
) -> tuple[str, float]:
    if claims.get("iss") != issuer:  # exact: no prefix, case or trailing-slash matching
        raise TokenRejectedError("wrong issuer")
    audiences = claims.get("aud")
    if isinstance(audiences, str):
        audiences = [audiences]
    if not isinstance(audiences, list) or audience not in audiences:
        raise TokenRejectedError("wrong audience")
    expires = _number(claims, "exp")
    issued = _number(claims, "iat")
    if now >= expires + LEEWAY_SECONDS:  # exp is the first instant it is no longer valid
        raise TokenRejectedError("expired")
    if "nbf" in claims and now < _number(claims, "nbf") - LEEWAY_SECONDS:
        raise TokenRejectedError("not yet valid")
    if issued > now + LEEWAY_SECONDS:
        raise TokenRejectedError("issued in the future")
    if expires - issued > MAX_LIFETIME_SECONDS:
        raise TokenRejectedError("lifetime over 24 h")
    kubernetes = claims.get("kubernetes.io")
    if not isinstance(kubernetes, dict):
        raise TokenRejectedError("no kubernetes.io claim")
    namespace = kubernetes.get("namespace")
    account = kubernetes.get("serviceaccount")
    name = account.get("name") if isinstance(account, dict) else None
    if not (isinstance(namespace, str) and NAME.fullmatch(namespace)):
        raise TokenRejectedError("no namespace in the kubernetes.io claim")
    if not (isinstance(name, str) and NAME.fullmatch(name)):
        raise TokenRejectedError("no service account in the kubernetes.io claim")
    # The API server writes both; a token whose two names disagree was not minted by it.
    if claims.get("sub") != f"system:serviceaccount:{namespace}:{name}":
        raise TokenRejectedError("sub does not name the service account")
    return f"{namespace}/{name}", expires


# --------------------------------------------------------------------------- per request


class KeySet(Protocol):
    """The issuer's current signing keys, as gateway.jwks.IssuerKeys holds them."""

    @property
    def keys(self) -> Mapping[str, PyJWK]:
        """Usable keys by kid."""

    def problem(self) -> str | None:
        """Why no key set may be used now (never loaded, or too old), else None."""

    async def refresh_for_unknown_kid(self) -> bool:
        """Fetch again if the refetch limit allows; True when the key set changed."""


@dataclass(slots=True)
class _Verdict:
    caller: Caller | None  # None: a valid token outside the allowlist
    identity: str
    expires: float


def _until_expiry(_key: bytes, verdict: _Verdict, _now: float) -> float:
    return verdict.expires + LEEWAY_SECONDS


class CallerAuthenticator:
    """Turns an Authorization header into a Caller or an error for the caller."""

    def __init__(
        self,
        keys: KeySet,
        allow: Allowlist,
        *,
        issuer: str,
        audience: str,
        clock: Callable[[], float] = time.time,
        on_rejected: Callable[[str], None] | None = None,
        max_cached: int = 10_000,
    ) -> None:
        self._keys, self._allow = keys, allow
        self._issuer, self._audience, self._clock = issuer, audience, clock
        self._on_rejected = on_rejected
        # An entry lives until its token's exp (plus the leeway a fresh check would grant).
        self._verified: TLRUCache[bytes, _Verdict] = TLRUCache(
            max_cached, ttu=_until_expiry, timer=clock
        )

    def cached(self, authorization: str | None) -> Caller | None:
        """The caller for a token verified before and not expired; None: call authenticate()."""
        if authorization is None or not authorization.startswith("Bearer "):
            return None
        verdict = self._verified.get(hashlib.sha256(authorization.encode()).digest())
        if verdict is None or verdict.caller is None or self._keys.problem() is not None:
            return None
        return verdict.caller

    async def authenticate(self, authorization: str | None) -> Caller:
        """The verified, allowed caller; raises CallerUnauthenticated/Forbidden/KeysUnavailable."""
        problem = self._keys.problem()
        if problem is not None:
            if self._on_rejected is not None:
                self._on_rejected("keys_unavailable")
            raise CallerKeysUnavailable(f"caller tokens cannot be checked: {problem}")
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            self._reject("no bearer token")
        token = token.strip()
        digest = hashlib.sha256(authorization.encode()).digest()  # type: ignore[union-attr]
        verdict = self._verified.get(digest)
        if verdict is None:
            verdict = await self._verify(token)
            self._verified[digest] = verdict
        if verdict.caller is None:
            self._reject_forbidden(verdict.identity)
        return verdict.caller

    async def _verify(self, token: str) -> _Verdict:
        try:
            try:
                identity, expires = self._check(token)
            except UnknownKeyError:
                # A rotated issuer key: fetch again (rate-limited), then check once more.
                await self._keys.refresh_for_unknown_kid()
                identity, expires = self._check(token)
        except TokenRejectedError as exc:
            self._reject(str(exc))
        label = self._allow.label(identity)
        return _Verdict(Caller(identity, label) if label else None, identity, expires)

    def _check(self, token: str) -> tuple[str, float]:
        return verify(
            token,
            self._keys.keys,
            issuer=self._issuer,
            audience=self._audience,
            now=self._clock(),
        )

    def _reject(self, reason: str) -> NoReturn:
        if self._on_rejected is not None:
            self._on_rejected("unauthenticated")
        log.warning("caller_rejected", status=401, reason=reason)
        raise CallerUnauthenticated(f"caller authentication failed: {reason}")

    def _reject_forbidden(self, identity: str) -> NoReturn:
        if self._on_rejected is not None:
            self._on_rejected("forbidden")
        log.warning("caller_rejected", status=403, caller=identity, reason="not on the allowlist")
        raise CallerForbidden(f"{identity} may not use this gateway")
