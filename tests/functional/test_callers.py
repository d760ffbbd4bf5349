"""Caller authentication with Kubernetes projected service-account tokens, end to end.

A local TLS issuer serves discovery and the key set; tokens are shaped as the kubelet
projects them. Each refused token is answered by the gateway and never reaches the upstream.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import json
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
import trustme

from gateway import config
from gateway.app import caller_tokens_in_plaintext
from gateway.errors import ConfigError
from gateway.jwks import MAX_STALE_SECONDS, REFETCH_SECONDS
from tests.clock import FakeClock
from tests.conftest import RunningGateway, StartGateway, base_url, start_app
from tests.poll import eventually
from tests.process import run_cli
from tests.security.support import JWT
from tests.servers.forward_proxy import running_tinyproxy
from tests.servers.oidc import (
    ServiceAccountIssuer,
    SigningKey,
    projected_claims,
    sign,
    unsigned,
)
from tests.servers.upstream import Upstream
from tests.tls_files import write_pair

ALLOW = "team-a/reporting, team-b/*"


@pytest.fixture
async def sa_issuer(server_ssl: ssl.SSLContext) -> AsyncIterator[ServiceAccountIssuer]:
    """The cluster's service-account issuer over TLS."""
    issuer = ServiceAccountIssuer()
    runner = await start_app(issuer.app(), server_ssl)
    issuer.base_url = base_url(runner, "https")
    yield issuer
    await runner.cleanup()


def caller_env(issuer: ServiceAccountIssuer, ca_file: Path, **more: str) -> dict[str, str]:
    """Variables that turn Kubernetes caller authentication on against `issuer`."""
    return {
        "CIGW_CALLER_AUTH": "kubernetes",
        "CIGW_CALLER_ISSUER": issuer.issuer,
        "CIGW_CALLER_CA_FILE": str(ca_file),
        "CIGW_CALLER_ALLOW": ALLOW,
        **more,
    }


StartCallers = Callable[..., Awaitable[RunningGateway]]


@pytest.fixture
def start_callers(
    start_gateway: StartGateway, sa_issuer: ServiceAccountIssuer, ca_file: Path
) -> StartCallers:
    """Factory: a gateway authenticating callers against the local issuer."""

    async def start(
        *, ready: bool = True, monotonic: Callable[[], float] = time.monotonic, **more: str
    ) -> RunningGateway:
        env = caller_env(sa_issuer, ca_file, **more)
        return await start_gateway(env, ready=ready, monotonic=monotonic)

    return start


async def call(
    gw: RunningGateway, token: str | None, path: str = "/echo/x", **headers: str
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """GET through the gateway with `token` as the bearer: (status, JSON body, headers)."""
    sent = dict(headers)
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    async with gw.session.get(gw.url(path), headers=sent) as response:
        body = await response.json(content_type=None)
        return response.status, body, dict(response.headers)


async def test_allowed_caller_is_forwarded_without_its_token(
    start_callers: StartCallers,
    sa_issuer: ServiceAccountIssuer,
    upstream: Upstream,
    log_output: io.StringIO,
) -> None:
    """An allowed identity gets 200; the upstream sees only the gateway's Authorization."""
    gw = await start_callers()
    token = sa_issuer.token("team-a", "reporting")
    status, _, _ = await call(gw, token)
    assert status == 200
    (authorization,) = upstream.seen[-1].header_values("Authorization")
    assert token not in authorization
    assert upstream.issuer.verify(authorization.removeprefix("Bearer "))
    status, _, _ = await call(gw, sa_issuer.token("team-b", "anyone"))
    assert status == 200
    lines = [json.loads(line) for line in log_output.getvalue().splitlines()]
    callers = [line.get("caller") for line in lines if line.get("event") == "request"]
    assert callers == ["team-a/reporting", "team-b/anyone"]
    metrics = await gw.metrics_text()
    requests = 'cigw_requests_total{{caller="{}",code="200",method="GET",route="/"}} 1.0'
    assert requests.format("team-a/reporting") in metrics
    # Wildcard matches are labelled by their allowlist entry, so the label stays bounded.
    assert requests.format("team-b/*") in metrics
    assert token not in log_output.getvalue()


async def test_unknown_identity_is_forbidden(
    start_callers: StartCallers, sa_issuer: ServiceAccountIssuer, upstream: Upstream
) -> None:
    """A valid token for a service account outside the allowlist gets 403 and goes nowhere."""
    gw = await start_callers()
    status, body, _ = await call(gw, sa_issuer.token("team-c", "reporting"))
    assert status == 403
    assert body["error"]["code"] == "caller_forbidden"
    assert upstream.seen == []
    assert 'cigw_caller_rejections_total{reason="forbidden"} 1.0' in await gw.metrics_text()


def _bad_tokens(issuer: ServiceAccountIssuer) -> dict[str, str | None]:
    now = time.time()
    key = issuer.keys[0]

    def claims(**changes: Any) -> dict[str, Any]:
        base = projected_claims(issuer.issuer, "team-a", "reporting")
        base.update(changes)
        return base

    good = sign(claims(), key)
    header, payload, signature = good.split(".")
    forged = json.loads(jwt.utils.base64url_decode(payload))
    forged["kubernetes.io"]["namespace"] = forged["kubernetes.io"]["namespace"]  # same shape
    forged["sub"] = "system:serviceaccount:team-a:admin"
    forged["kubernetes.io"]["serviceaccount"]["name"] = "admin"
    tampered_payload = jwt.utils.base64url_encode(json.dumps(forged).encode()).decode()
    return {
        "no-token": None,
        "empty-bearer": "",
        "not-a-jwt": "abc.def",
        "expired": sign(claims(iat=int(now) - 7200, nbf=int(now) - 7200, exp=int(now) - 61), key),
        "not-yet-valid": sign(claims(nbf=int(now) + 120, iat=int(now)), key),
        "wrong-audience": sign(claims(aud=["https://kubernetes.default.svc"]), key),
        "wrong-issuer": sign(claims(iss=issuer.issuer + "/"), key),
        "alg-none": unsigned(claims(), key.kid),
        "hs256-with-public-key": _hs256(claims(), key),
        "unknown-kid": sign(claims(), SigningKey.generate(kid="not-a-known-kid")),
        "known-kid-other-key": sign(claims(), SigningKey.generate(kid=key.kid)),
        "tampered-payload": f"{header}.{tampered_payload}.{signature}",
        "lifetime-over-24h": sign(claims(exp=int(now) + 25 * 3600), key),
        "no-kubernetes-claim": sign({**claims(), "kubernetes.io": None}, key),
    }


def _hs256(claims: dict[str, Any], key: SigningKey) -> str:
    """HS256 keyed with the issuer's public key PEM: the classic algorithm-confusion forgery."""
    header = {"alg": "HS256", "typ": "JWT", "kid": key.kid}

    def part(data: dict[str, Any]) -> str:
        return jwt.utils.base64url_encode(json.dumps(data).encode()).decode()

    signing_input = f"{part(header)}.{part(claims)}"
    mac = hmac.new(key.public_pem(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{jwt.utils.base64url_encode(mac).decode()}"


BAD = [
    "no-token",
    "empty-bearer",
    "not-a-jwt",
    "expired",
    "not-yet-valid",
    "wrong-audience",
    "wrong-issuer",
    "alg-none",
    "hs256-with-public-key",
    "unknown-kid",
    "known-kid-other-key",
    "tampered-payload",
    "lifetime-over-24h",
    "no-kubernetes-claim",
]


async def test_bad_tokens_are_unauthenticated(
    start_callers: StartCallers,
    sa_issuer: ServiceAccountIssuer,
    upstream: Upstream,
    log_output: io.StringIO,
) -> None:
    """Each bad token gets 401 caller_unauthenticated with WWW-Authenticate: Bearer, none sent."""
    gw = await start_callers()
    tokens = _bad_tokens(sa_issuer)
    assert set(tokens) == set(BAD)
    for name in BAD:
        status, body, headers = await call(gw, tokens[name])
        assert (name, status) == (name, 401), body
        assert body["error"]["code"] == "caller_unauthenticated"
        assert headers["WWW-Authenticate"] == "Bearer"
    assert upstream.seen == []
    metrics = await gw.metrics_text()
    assert f'cigw_caller_rejections_total{{reason="unauthenticated"}} {len(BAD)}.0' in metrics
    output = log_output.getvalue()
    assert not [token for token in tokens.values() if token and token in output]
    assert not JWT.search(output)


async def test_key_rotation_is_picked_up_within_the_refetch_limit(
    start_callers: StartCallers, sa_issuer: ServiceAccountIssuer, upstream: Upstream
) -> None:
    """A token signed by a rotated-in key works once 30 s have passed since the last fetch."""
    clock = FakeClock(start=1000.0)
    gw = await start_callers(monotonic=clock)
    assert (await call(gw, sa_issuer.token("team-a", "reporting")))[0] == 200
    sa_issuer.rotate()
    fetches = sa_issuer.jwks_fetches
    await clock.advance(REFETCH_SECONDS - 1)
    new_token = sa_issuer.token("team-a", "reporting")
    assert (await call(gw, new_token))[0] == 401  # too soon after the last fetch
    assert sa_issuer.jwks_fetches == fetches
    await clock.advance(1)
    assert (await call(gw, new_token))[0] == 200  # verified tokens are cached by hash
    assert sa_issuer.jwks_fetches == fetches + 1
    assert (await call(gw, new_token))[0] == 200


async def test_random_kid_flood_fetches_at_most_once_per_30s(
    start_callers: StartCallers, sa_issuer: ServiceAccountIssuer, upstream: Upstream
) -> None:
    """Hundreds of tokens with random kids cause at most one key-set fetch per 30 s."""
    clock = FakeClock(start=1000.0)
    gw = await start_callers(monotonic=clock)
    fetches = sa_issuer.jwks_fetches
    claims = projected_claims(sa_issuer.issuer, "team-a", "reporting")

    async def flood(count: int) -> list[int]:
        tokens = [
            sign(claims, SigningKey(uuid.uuid4().hex, "RS256", sa_issuer.keys[0].private))
            for _ in range(count)
        ]
        return [status for status, _, _ in await asyncio.gather(*(call(gw, t) for t in tokens))]

    for _ in range(4):  # two minutes of fake time in 30 s steps, plus a flood within each
        assert set(await flood(50)) == {401}
        assert sa_issuer.jwks_fetches - fetches <= 1
        fetches = sa_issuer.jwks_fetches
        await clock.advance(REFETCH_SECONDS / 2)
        assert set(await flood(20)) == {401}
        assert sa_issuer.jwks_fetches == fetches
        await clock.advance(REFETCH_SECONDS / 2)
    assert upstream.seen == []


async def test_issuer_outage_serves_on_cached_keys_then_503(
    start_callers: StartCallers, sa_issuer: ServiceAccountIssuer, upstream: Upstream
) -> None:
    """With the issuer down, tokens are still checked with the last key set for up to 1 h."""
    clock = FakeClock(start=1000.0)
    gw = await start_callers(monotonic=clock)
    sa_issuer.down = True
    await clock.advance(MAX_STALE_SECONDS - 60)
    assert (await call(gw, sa_issuer.token("team-a", "reporting")))[0] == 200
    assert (await call(gw, sa_issuer.token("team-b", "other")))[0] == 200
    await clock.advance(120)  # over an hour since the last good key set
    status, body, _ = await call(gw, sa_issuer.token("team-a", "reporting"))
    assert status == 503
    assert body["error"]["code"] == "caller_keys_unavailable"
    async with gw.session.get(gw.admin("/readyz")) as response:
        assert response.status == 503


async def test_not_ready_until_the_first_key_set(
    start_callers: StartCallers, sa_issuer: ServiceAccountIssuer, upstream: Upstream
) -> None:
    """/readyz stays 503 and callers get 503 until the issuer's key set has been loaded once."""
    sa_issuer.down = True
    gw = await start_callers(ready=False)

    async def waiting_for_keys() -> bool:
        # The gateway's own token arrives quickly; then only the key set is missing.
        async with gw.session.get(gw.admin("/readyz")) as response:
            return response.status == 503 and "key set" in await response.text()

    await eventually(waiting_for_keys)
    status, body, _ = await call(gw, sa_issuer.token("team-a", "reporting"))
    assert (status, body["error"]["code"]) == (503, "caller_keys_unavailable")
    sa_issuer.down = False
    await gw.wait_ready(within=10)
    assert (await call(gw, sa_issuer.token("team-a", "reporting")))[0] == 200


async def test_per_caller_limits_are_keyed_by_identity(
    start_callers: StartCallers, sa_issuer: ServiceAccountIssuer, upstream: Upstream
) -> None:
    """Buckets belong to verified identities, with per-identity rates over the default."""
    clock = FakeClock(start=1000.0)
    gw = await start_callers(
        monotonic=clock,
        CIGW_RATE_LIMIT_CALLER_RPS="1",
        CIGW_RATE_LIMIT_CALLER_BURST="2",
        CIGW_RATE_LIMIT_CALLERS="team-a/reporting=1:4",
    )
    reporting = sa_issuer.token("team-a", "reporting")
    other = sa_issuer.token("team-b", "batch")
    # A self-chosen header does not change whose bucket is spent.
    statuses = [(await call(gw, reporting, **{"X-Caller": f"n{i}"}))[0] for i in range(5)]
    assert statuses == [200, 200, 200, 200, 429]
    assert [(await call(gw, other))[0] for _ in range(3)] == [200, 200, 429]
    metrics = await gw.metrics_text()
    limited = 'cigw_rate_limited_total{{caller="{}",route="/",scope="caller"}} 1.0'
    assert limited.format("team-a/reporting") in metrics
    assert limited.format("team-b/*") in metrics


async def test_privileged_headers_pass_only_for_allowed_callers(
    start_callers: StartCallers,
    sa_issuer: ServiceAccountIssuer,
    upstream: Upstream,
    log_output: io.StringIO,
) -> None:
    """Impersonation and bypass headers are stripped unless the identity is allowed them."""
    gw = await start_callers(
        CIGW_PRIVILEGED_HEADERS_ALLOW="team-a/reporting", CIGW_STRIP_HEADERS="X-Internal"
    )
    privileged = {
        "mscrmcallerid": "00000000-0000-0000-0000-000000000001",
        "MSCRM.BypassCustomPluginExecution": "true",
        "X-Internal": "1",
        "X-Keep": "yes",
    }
    assert (await call(gw, sa_issuer.token("team-b", "batch"), **privileged))[0] == 200
    seen = upstream.seen[-1]
    assert seen.header_values("MSCRMCallerID") == []
    assert seen.header_values("MSCRM.BypassCustomPluginExecution") == []
    assert seen.header_values("X-Internal") == []
    assert seen.header_values("X-Keep") == ["yes"]
    assert (await call(gw, sa_issuer.token("team-a", "reporting"), **privileged))[0] == 200
    seen = upstream.seen[-1]
    assert seen.header_values("MSCRMCallerID") == ["00000000-0000-0000-0000-000000000001"]
    assert seen.header_values("X-Internal") == ["1"]
    metrics = await gw.metrics_text()
    assert 'cigw_stripped_headers_total{header="MSCRMCallerID"} 1.0' in metrics
    assert 'cigw_stripped_headers_total{header="X-Internal"} 1.0' in metrics
    assert 'cigw_stripped_headers_total{header="CallerObjectId"} 0.0' in metrics
    (event,) = [
        json.loads(line)
        for line in log_output.getvalue().splitlines()
        if "privileged_headers_stripped" in line
    ]
    assert event["headers"] == "MSCRMCallerID,MSCRM.BypassCustomPluginExecution,X-Internal"
    assert event["caller"] == "team-b/batch"


async def test_privileged_headers_are_stripped_in_a_sidecar(
    gw: RunningGateway, upstream: Upstream
) -> None:
    """Without caller authentication every caller loses the privileged Dataverse headers."""
    headers = {"CallerObjectId": "x", "MSCRM.BypassBusinessLogicExecution": "CustomSync"}
    async with gw.session.get(gw.url("/echo/x"), headers=headers) as response:
        assert response.status == 200
    assert upstream.seen[-1].header_values("CallerObjectId") == []
    assert upstream.seen[-1].header_values("MSCRM.BypassBusinessLogicExecution") == []


async def test_required_header_is_412_when_absent(
    start_gateway: StartGateway, upstream: Upstream
) -> None:
    """With CIGW_REQUIRE_HEADER, a request without that header and value gets 412."""
    gw = await start_gateway({"CIGW_REQUIRE_HEADER": "X-Gateway-Caller: app"})
    for headers in ({}, {"X-Gateway-Caller": "other"}):
        async with gw.session.get(gw.url("/echo/x"), headers=headers) as response:
            assert response.status == 412
            assert (await response.json())["error"]["code"] == "required_header_missing"
    assert upstream.seen == []
    async with gw.session.get(gw.url("/echo/x"), headers={"X-Gateway-Caller": "app"}) as r:
        assert r.status == 200


async def test_non_loopback_without_caller_auth_exits_2(gateway_env: dict[str, str]) -> None:
    """Listening beyond loopback with CIGW_CALLER_AUTH=none is refused at start, saying why."""
    env = {**gateway_env, "CIGW_LISTEN": "0.0.0.0:0"}
    code, _, err = await run_cli(env, "serve")
    assert code == 2
    assert "CIGW_CALLER_AUTH=none" in err
    assert "CIGW_ALLOW_UNAUTHENTICATED_CALLERS" in err
    code, _, _ = await run_cli(
        {**env, "CIGW_ALLOW_UNAUTHENTICATED_CALLERS": "true"}, "check-config"
    )
    assert code == 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"CIGW_RATE_LIMIT_CALLER_HEADER": "X-Caller", "CIGW_RATE_LIMIT_CALLER_RPS": "1"},
            "conflicts with CIGW_CALLER_AUTH=kubernetes",
        ),
        ({"CIGW_CALLER_ALLOW": ""}, "needs CIGW_CALLER_ALLOW"),
        ({"CIGW_CALLER_ALLOW": "team-a"}, "namespace/serviceaccount"),
        ({"CIGW_RATE_LIMIT_CALLERS": "team-z/x=1"}, "not in CIGW_CALLER_ALLOW"),
        ({"CIGW_RATE_LIMIT_CALLERS": "team-a/reporting=fast"}, "rps[:burst]"),
    ],
    ids=["caller-header-conflict", "no-allowlist", "bad-entry", "rate-outside", "bad-rate"],
)
def test_caller_configuration_errors(
    gateway_env: dict[str, str], ca_file: Path, extra: dict[str, str], message: str
) -> None:
    """Conflicting or malformed caller settings are one ConfigError naming the fix."""
    issuer = ServiceAccountIssuer(base_url="https://127.0.0.1:1")
    env = {**gateway_env, **caller_env(issuer, ca_file), **extra}
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        config.load({k: v for k, v in env.items() if v})


def test_caller_settings_need_caller_auth(gateway_env: dict[str, str]) -> None:
    """The allowlist or privileged allowance without caller authentication is an error."""
    env = {
        **gateway_env,
        "CIGW_CALLER_ALLOW": "team-a/x",
        "CIGW_PRIVILEGED_HEADERS_ALLOW": "team-a/x",
    }
    with pytest.raises(ConfigError) as caught:
        config.load(env)
    assert "CIGW_CALLER_ALLOW is set but CIGW_CALLER_AUTH is none" in str(caught.value)
    assert "CIGW_PRIVILEGED_HEADERS_ALLOW is set but CIGW_CALLER_AUTH is none" in str(caught.value)


@pytest.mark.parametrize(
    ("listen", "tls", "warned"),
    [
        ("0.0.0.0:8080", False, True),
        ("0.0.0.0:8080", True, False),
        ("127.0.0.1:8080", False, False),
    ],
    ids=["plaintext-beyond-loopback", "https", "loopback"],
)
def test_plaintext_warning_with_caller_auth(
    *,
    gateway_env: dict[str, str],
    ca_file: Path,
    ca: trustme.CA,
    tmp_path: Path,
    listen: str,
    tls: bool,
    warned: bool,
) -> None:
    """With caller authentication, only a plaintext listener beyond loopback is warned about."""
    issuer = ServiceAccountIssuer(base_url="https://127.0.0.1:1")
    env = {**gateway_env, **caller_env(issuer, ca_file), "CIGW_LISTEN": listen}
    if tls:
        cert, key, _ = write_pair(ca, tmp_path)
        env |= {"CIGW_TLS_CERT_FILE": str(cert), "CIGW_TLS_KEY_FILE": str(key)}
    assert caller_tokens_in_plaintext(config.load(env)) is warned


async def test_key_set_is_fetched_through_the_egress_proxy(
    start_callers: StartCallers,
    sa_issuer: ServiceAccountIssuer,
    upstream: Upstream,
    tmp_path: Path,
) -> None:
    """With CIGW_EGRESS_PROXY, the issuer's discovery and key set go through that proxy."""
    with running_tinyproxy(tmp_path, ("jwks-user-Mv62", "jwks-password-Lc19")) as proxy:
        gw = await start_callers(CIGW_EGRESS_PROXY=proxy.url())
        assert (await call(gw, sa_issuer.token("team-a", "reporting")))[0] == 200
        issuer_address = sa_issuer.issuer.removeprefix("https://")
        # A CONNECT tunnel each for discovery and the key set (TLS inside, to the issuer).
        assert proxy.carried("CONNECT", issuer_address) >= 1
    assert sa_issuer.jwks_fetches >= 1
