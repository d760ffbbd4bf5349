"""The caller-token checks held to a reference: PyJWT's full `jwt.decode` with equal options.

gateway.callers.verify uses PyJWT for the signature only and checks the claims itself.
For generated tokens (claims shifted in time, wrong or odd issuers and audiences, missing
or mistyped claims, other algorithms and kids) it must accept exactly when PyJWT's own
decode accepts AND the deliberate extra checks hold (SECURITY.md lists them).
"""

from __future__ import annotations

import datetime
import json
import time
from typing import Any
from unittest import mock

import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.callers import (
    LEEWAY_SECONDS,
    MAX_LIFETIME_SECONDS,
    TokenRejectedError,
    UnknownKeyError,
    usable_keys,
    verify,
)
from gateway.identities import Allowlist
from tests.servers.oidc import SigningKey, projected_claims, sign, unsigned

ISSUER = "https://kubernetes.default.svc.cluster.local"
AUDIENCE = "ci-gateway"
NOW = 1_800_000_000.0
RSA_KEY = SigningKey.generate("RS256", kid="rsa")
EC_KEY = SigningKey.generate("ES256", kid="ec")
KEYS = usable_keys({"keys": [RSA_KEY.jwk(), EC_KEY.jwk()]})


class _FrozenDatetime(datetime.datetime):
    """PyJWT reads the time as datetime.now(); the reference is asked at NOW."""

    @classmethod
    def now(cls, tz: datetime.tzinfo | None = None) -> _FrozenDatetime:
        return cls.fromtimestamp(NOW, tz)


def reference(token: str) -> bool:
    """PyJWT's verdict with the gateway's options: allowlisted algorithms, exact iss, aud."""
    with mock.patch.object(jwt.api_jwt, "datetime", _FrozenDatetime):
        return _reference(token)


def _reference(token: str) -> bool:
    try:
        kid = jwt.get_unverified_header(token).get("kid")
        key = KEYS[kid] if isinstance(kid, str) and kid in KEYS else None
        if key is None:
            return False
        jwt.decode(
            token,
            key.key,
            algorithms=["RS256", "ES256"],
            audience=AUDIENCE,
            issuer=ISSUER,
            leeway=LEEWAY_SECONDS,
            options={"require": ["exp", "iat", "iss", "aud"], "verify_sub": False},
        )
    except (jwt.PyJWTError, KeyError, ValueError, TypeError):
        return False
    return True


def extras_hold(claims: dict[str, Any], header: dict[str, Any]) -> bool:
    """The deliberate extra checks, written as the specification (SECURITY.md)."""
    key = KEYS.get(header.get("kid", ""))
    if key is None or key.algorithm_name != header.get("alg"):
        return False  # the key's own algorithm, not only the allowlist, decides
    exp, iat = claims.get("exp"), claims.get("iat")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (exp, iat)):
        return False
    assert isinstance(exp, int | float)
    assert isinstance(iat, int | float)
    if exp - iat > MAX_LIFETIME_SECONDS or iat > NOW + LEEWAY_SECONDS:
        return False
    if "nbf" in claims and not (
        isinstance(claims["nbf"], int | float) and not isinstance(claims["nbf"], bool)
    ):
        return False
    k8s = claims.get("kubernetes.io")
    if not isinstance(k8s, dict):
        return False
    namespace = k8s.get("namespace")
    account = k8s.get("serviceaccount")
    name = account.get("name") if isinstance(account, dict) else None
    if not (isinstance(namespace, str) and namespace and isinstance(name, str) and name):
        return False
    try:  # Kubernetes object names only: lower-case DNS labels and subdomains
        Allowlist.parse([f"{namespace}/{name}"])
    except ValueError:
        return False
    return claims.get("sub") == f"system:serviceaccount:{namespace}:{name}"


def ours(token: str) -> bool:
    """gateway.callers.verify's verdict at NOW."""
    try:
        verify(token, KEYS, issuer=ISSUER, audience=AUDIENCE, now=NOW)
    except TokenRejectedError:
        return False
    return True


OFFSETS = st.sampled_from([-90_000, -3_700, -61, -60, -59, 0, 59, 60, 61, 3_600, 86_400, 90_000])
ODD: st.SearchStrategy[Any] = st.sampled_from([None, "1", True, 1.5, [], {}])
TIME_CLAIMS = ("exp", "iat", "nbf")
MUTATIONS = (
    "time",
    "drop",
    "odd",
    "issuer",
    "audience",
    "namespace",
    "sub",
    "other-kid",
    "none",
    "swap-alg",
)


def _mutate(draw: st.DrawFn, claims: dict[str, Any], mutation: str) -> None:
    """Change the claims as `mutation` says."""
    name = draw(st.sampled_from((*TIME_CLAIMS, "iss", "aud", "sub", "kubernetes.io")))
    if mutation == "time":
        claims[draw(st.sampled_from(TIME_CLAIMS))] = NOW + draw(OFFSETS)
    elif mutation == "drop":
        claims.pop(name, None)
    elif mutation == "odd":
        claims[name] = draw(ODD)
    elif mutation == "issuer":
        claims["iss"] = draw(
            st.sampled_from([ISSUER + "/", ISSUER.upper(), "https://evil.example", ISSUER])
        )
    elif mutation == "audience":
        claims["aud"] = draw(
            st.sampled_from([AUDIENCE, ["x", AUDIENCE], ["x"], [], "ci-gateway2", [1]])
        )
    elif mutation == "namespace" and isinstance(claims.get("kubernetes.io"), dict):
        namespace = draw(st.sampled_from(["", "Team-A", "a/b", "team-b"]))
        claims["kubernetes.io"]["namespace"] = namespace
        if draw(st.booleans()):
            claims["sub"] = f"system:serviceaccount:{namespace}:reporting"
    elif mutation == "sub":
        claims["sub"] = draw(st.sampled_from(["system:serviceaccount:team-a:admin", "x"]))


@st.composite
def tokens(draw: st.DrawFn) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """A valid projected token with 0-3 mutations of claims or header: (token, claims, header)."""
    claims = projected_claims(ISSUER, "team-a", "reporting", now=NOW)
    key = draw(st.sampled_from([RSA_KEY, EC_KEY]))
    header: dict[str, Any] = {"kid": key.kid, "alg": key.algorithm}
    form = "signed"
    for mutation in draw(st.lists(st.sampled_from(MUTATIONS), max_size=3)):
        if mutation in ("other-kid", "none", "swap-alg"):
            form = mutation
        else:
            _mutate(draw, claims, mutation)
    if form == "none":
        header = {"kid": key.kid, "alg": "none"}
        return unsigned(claims, key.kid), claims, header
    if form == "other-kid":
        header["kid"] = "missing"
    token = sign(claims, key, kid=header["kid"])
    if form == "swap-alg":
        # The other allowlisted algorithm named in the header, the signature unchanged.
        other = "ES256" if key.algorithm == "RS256" else "RS256"
        head, payload, signature = token.split(".")
        header = {**json.loads(jwt.utils.base64url_decode(head)), "alg": other}
        head = jwt.utils.base64url_encode(json.dumps(header).encode()).decode()
        token = f"{head}.{payload}.{signature}"
    return token, claims, header


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tokens())
def test_verdict_matches_pyjwt_plus_the_documented_extras(
    case: tuple[str, dict[str, Any], dict[str, Any]],
) -> None:
    """Accepted exactly when PyJWT's decode accepts and the documented extra checks hold."""
    token, claims, header = case
    assert ours(token) == (reference(token) and extras_hold(claims, header))


def test_valid_projected_token_gives_its_identity_and_expiry() -> None:
    """A well-formed projected token yields namespace/serviceaccount and its exp."""
    claims = projected_claims(ISSUER, "team-a", "reporting", now=NOW)
    identity, expires = verify(
        sign(claims, EC_KEY), KEYS, issuer=ISSUER, audience=AUDIENCE, now=NOW
    )
    assert (identity, expires) == ("team-a/reporting", claims["exp"])


def test_unknown_kid_is_its_own_error() -> None:
    """A kid the key set lacks raises UnknownKeyError, which triggers a (limited) refetch."""
    claims = projected_claims(ISSUER, "team-a", "reporting", now=time.time())
    with pytest.raises(UnknownKeyError):
        verify(
            sign(claims, RSA_KEY, kid="rotated"), KEYS, issuer=ISSUER, audience=AUDIENCE, now=NOW
        )


def test_key_set_keeps_only_allowlisted_signing_keys() -> None:
    """Keys for other algorithms, encryption keys and keys without kid are not usable."""
    hmac_key = {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac", "alg": "HS256"}
    encryption = {**RSA_KEY.jwk(), "kid": "enc", "use": "enc"}
    no_kid = {k: v for k, v in EC_KEY.jwk().items() if k != "kid"}
    ps256 = {**RSA_KEY.jwk(), "kid": "ps", "alg": "PS256"}
    keys = usable_keys({"keys": [hmac_key, encryption, no_kid, ps256, RSA_KEY.jwk()]})
    assert list(keys) == ["rsa"]


@pytest.mark.parametrize(
    ("entries", "identity", "label"),
    [
        (["team-a/reporting"], "team-a/reporting", "team-a/reporting"),
        (["team-a/reporting"], "team-a/other", None),
        (["team-b/*"], "team-b/anything", "team-b/*"),
        (["team-b/*"], "team-bb/anything", None),
        (["team-a/reporting", "team-a/*"], "team-a/reporting", "team-a/reporting"),
    ],
    ids=["exact", "other-account", "wildcard", "prefix-is-not-namespace", "exact-wins"],
)
def test_allowlist_labels(entries: list[str], identity: str, label: str | None) -> None:
    """Exact entries and namespace/* match; the label is the entry, so it stays bounded."""
    assert Allowlist.parse(entries).label(identity) == label


@pytest.mark.parametrize("entry", ["team-a", "team-a/", "/x", "Team/x", "a/b/c", "*/x", "a/*x"])
def test_allowlist_refuses_malformed_entries(entry: str) -> None:
    """An entry that is not namespace/serviceaccount or namespace/* is refused."""
    with pytest.raises(ValueError, match="namespace/serviceaccount"):
        Allowlist.parse([entry])


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
@pytest.mark.parametrize("offset", [-61, -60, -59, -1, 0, 1, 59, 60, 61])
def test_leeway_boundaries_match_pyjwt(claim: str, offset: int) -> None:
    """At the edges of the 60 s leeway, each time claim is judged as PyJWT judges it."""
    claims = projected_claims(ISSUER, "team-a", "reporting", now=NOW - 600)
    claims[claim] = NOW + offset
    if claim == "iat":
        claims["nbf"] = NOW - 600
    token = sign(claims, RSA_KEY)
    assert ours(token) == reference(token)
