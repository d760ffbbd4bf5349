"""Secrets never leak: every credential kind, through success and failure, in every output.

The leak ledger (conftest) scans what each test recorded, and the whole suite's record at
the end, for the canaries: client secret, certificate password, federated assertion, both
keys and every token the issuers minted.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import sys
from collections.abc import Mapping
from pathlib import Path

import aiohttp
import pytest
import trustme
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from gateway.sandbox.issuer import TokenIssuer
from tests.certs import self_signed_rsa
from tests.conftest import CANARY_PRIMARY, CANARY_SECONDARY, CANARY_SECRET, base_url, start_app
from tests.security.conftest import (
    CANARY_ASSERTION,
    CANARY_CERT_PASSWORD,
    CANARY_PROXY_PASSWORD,
    CANARY_PROXY_USER,
    CANARY_REDIS_PASSWORD,
    process_env,
)
from tests.security.support import GatewayProcess, Ledger, SecurityUpstream
from tests.servers.forward_proxy import running_tinyproxy
from tests.servers.oidc import ServiceAccountIssuer
from tests.servers.redis import RedisServer
from tests.servers.upstream import Upstream
from tests.tls_files import client_context, key_canary, write_pair


def write_credential(directory: Path, kind: str) -> tuple[Path, bytes, str]:
    """An encrypted PEM or PFX protected by the password canary: (file, cert PEM, key canary)."""
    key, certificate = self_signed_rsa()
    # A line of the decrypted key, which the gateway holds in memory, is a canary too.
    key_canary = (
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
        .splitlines()[3]
    )
    password = CANARY_CERT_PASSWORD.encode()
    cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
    if kind == "pem":
        data = (
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(password),
            )
            + cert_pem
        )
    else:
        data = pkcs12.serialize_key_and_certificates(
            b"client", key, certificate, None, serialization.BestAvailableEncryption(password)
        )
    path = directory / f"client.{kind}"
    path.write_bytes(data)
    return path, cert_pem, key_canary


async def check_config(env: Mapping[str, str], ledger: Ledger) -> str:
    """`python -m gateway check-config` with `env`: its output, recorded for the scan."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "check-config",
        env={"PATH": "/usr/bin:/bin", **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(30):
        output, _ = await process.communicate()
    text = output.decode()
    ledger.record("check-config", text)
    assert process.returncode == 0, text
    return text


async def exercise(gateway: GatewayProcess, issuer: TokenIssuer, ledger: Ledger) -> None:
    """Succeed, fail at the token endpoint, fail at APIM, and read /metrics: all recorded."""
    proxy = f"http://127.0.0.1:{gateway.proxy_port}"
    async with aiohttp.ClientSession() as session:
        await gateway.wait_ready(session)
        status, _ = await gateway.get(session, f"{proxy}/echo/ok")
        assert status == 200
        status, _ = await gateway.get(session, f"{proxy}/status/401")
        assert status == 401
        status, _ = await gateway.get(session, f"{proxy}/raw/cr-in-value")
        assert status == 502
        status, text = await gateway.get(session, f"http://127.0.0.1:{gateway.admin_port}/metrics")
        assert status == 200
        assert "cigw_requests_total" in text
        await gateway.get(session, f"http://127.0.0.1:{gateway.admin_port}/readyz")
    assert issuer.issued, "a token was minted, so the token canary is live"


@pytest.mark.parametrize("kind", ["pem", "pfx"])
async def test_certificate_credential_leaks_nothing(
    *,
    issuer: TokenIssuer,
    upstream: Upstream,
    ledger: Ledger,
    ca_file: Path,
    tmp_path: Path,
    kind: str,
) -> None:
    """An encrypted certificate credential: its password and key never appear in any output."""
    assert isinstance(upstream, SecurityUpstream)
    path, cert_pem, key_canary = await asyncio.to_thread(write_credential, tmp_path, kind)
    ledger.secret(key_canary)
    issuer.registration.client_secret = None
    issuer.registration.certificate_pem = cert_pem
    env = process_env(issuer, f"{upstream.base_url}/v1", ca_file)
    del env["AZURE_CLIENT_SECRET"]
    env["AZURE_CLIENT_CERTIFICATE_PATH"] = str(path)
    env["AZURE_CLIENT_CERTIFICATE_PASSWORD"] = CANARY_CERT_PASSWORD
    text = await check_config(env, ledger)
    assert "(set, redacted)" in text
    issuer.faults.status, issuer.faults.error = 401, "invalid_client"
    issuer.faults.aadsts = "AADSTS700027"
    gateway = await GatewayProcess.start(env, ledger)
    try:
        proxy = f"http://127.0.0.1:{gateway.proxy_port}"
        async with aiohttp.ClientSession() as session, asyncio.timeout(10):
            while not gateway.logged("token_acquisition_failed"):  # noqa: ASYNC110 - child's log
                await asyncio.sleep(0.02)
            status, body = await gateway.get(session, f"{proxy}/echo/refused")
        assert status == 503
        assert "AADSTS700027" in body
        issuer.faults.clear()
        await exercise(gateway, issuer, ledger)
    finally:
        await gateway.stop()
    ledger.secret(*issuer.issued)


async def test_federated_credential_leaks_nothing(
    issuer: TokenIssuer, upstream: Upstream, ledger: Ledger, ca_file: Path, tmp_path: Path
) -> None:
    """A workload-identity assertion: never in output, answers or metrics, even when refused."""
    token_file = tmp_path / "azure-identity-token"
    await asyncio.to_thread(token_file.write_text, CANARY_ASSERTION + "\n")
    issuer.registration.client_secret = None
    issuer.registration.federated_assertion = CANARY_ASSERTION
    env = process_env(issuer, f"{upstream.base_url}/v1", ca_file)
    del env["AZURE_CLIENT_SECRET"]
    env["AZURE_FEDERATED_TOKEN_FILE"] = str(token_file)
    await check_config(env, ledger)
    issuer.registration.federated_assertion = "a-different-assertion"  # refused first
    gateway = await GatewayProcess.start(env, ledger)
    try:
        async with aiohttp.ClientSession() as session, asyncio.timeout(10):
            while not gateway.logged("token_acquisition_failed"):  # noqa: ASYNC110 - child's log
                await asyncio.sleep(0.02)
            status, body = await gateway.get(
                session, f"http://127.0.0.1:{gateway.proxy_port}/echo/refused"
            )
        assert status == 503
        assert "AADSTS700211" in body
        issuer.registration.federated_assertion = CANARY_ASSERTION
        await exercise(gateway, issuer, ledger)
    finally:
        await gateway.stop()
    ledger.secret(*issuer.issued)


async def test_client_secret_and_keys_leak_nothing(
    issuer: TokenIssuer, upstream: Upstream, ledger: Ledger, ca_file: Path
) -> None:
    """Client secret and both keys: absent from check-config, logs, answers and metrics."""
    env = process_env(issuer, f"{upstream.base_url}/v1", ca_file)
    text = await check_config(env, ledger)
    for canary in (CANARY_SECRET, CANARY_PRIMARY, CANARY_SECONDARY):
        assert canary not in text
    gateway = await GatewayProcess.start(env, ledger)
    try:
        await exercise(gateway, issuer, ledger)
    finally:
        await gateway.stop()
    ledger.secret(*issuer.issued)
    assert ledger.leaks() == []


async def test_listener_private_key_leaks_nothing(
    issuer: TokenIssuer, upstream: Upstream, ledger: Ledger, ca_file: Path, tmp_path: Path
) -> None:
    """The HTTPS listener's private key: absent from check-config, start and reload errors, logs."""
    ca = trustme.CA()
    cert, key, _ = write_pair(ca, tmp_path)
    other_cert, other_key, _ = write_pair(ca, tmp_path, "other")
    ledger.secret(key_canary(key), key_canary(other_key))
    env = process_env(issuer, f"{upstream.base_url}/v1", ca_file)
    env |= {"CIGW_TLS_CERT_FILE": str(cert), "CIGW_TLS_KEY_FILE": str(key)}
    await check_config(env, ledger)
    mismatched = {**env, "CIGW_TLS_KEY_FILE": str(other_key)}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "serve",
        env={"PATH": "/usr/bin:/bin", **mismatched},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(30):
        output, _ = await process.communicate()
    ledger.record("serve with a mismatched pair", output)
    assert process.returncode == 2, output
    gateway = await GatewayProcess.start(env, ledger)
    gateway.client_tls = client_context(ca)
    try:
        client = await gateway.connect(ledger)
        await client.send(b"GET /echo/ok HTTP/1.1\r\nHost: gateway\r\n\r\n")
        assert (await client.response()).status == 200
        await client.close()
        cert.write_bytes(other_cert.read_bytes())  # a certificate without its key
        async with asyncio.timeout(10):
            while not gateway.logged("tls_reload_failed"):  # noqa: ASYNC110 - child's log
                await asyncio.sleep(0.05)
    finally:
        await gateway.stop()


async def test_proxy_credentials_leak_nothing(
    issuer: TokenIssuer, upstream: Upstream, ledger: Ledger, ca_file: Path, tmp_path: Path
) -> None:
    """The egress proxy's user and password: redacted in check-config, absent from all output."""
    ledger.secret(CANARY_PROXY_USER, CANARY_PROXY_PASSWORD)
    with running_tinyproxy(tmp_path, (CANARY_PROXY_USER, CANARY_PROXY_PASSWORD)) as proxy:
        env = process_env(issuer, f"{upstream.base_url}/v1", ca_file)
        env["HTTPS_PROXY"] = proxy.url()
        env["HTTP_PROXY"] = proxy.url()
        text = await check_config(env, ledger)
        assert f"http://(credentials redacted)@{proxy.address}" in text
        assert f"proxy {proxy.address}" in text
        gateway = await GatewayProcess.start(env, ledger)
        try:
            await exercise(gateway, issuer, ledger)
        finally:
            await gateway.stop()
        # Both destinations really went through the authenticating proxy.
        assert proxy.carried("CONNECT", issuer.base_url.removeprefix("https://")) >= 1
        assert proxy.carried("GET", f"{upstream.base_url}/v1/echo/ok") == 1
    ledger.secret(*issuer.issued)


async def test_route_keys_leak_nothing(
    issuer: TokenIssuer, upstream: Upstream, ledger: Ledger, ca_file: Path, tmp_path: Path
) -> None:
    """Keys given inline on YAML routes: absent from check-config, logs, answers and metrics."""
    env = process_env(issuer, f"{upstream.base_url}/v1", ca_file)
    for name in (
        "CIGW_UPSTREAM_URL",
        "CIGW_SCOPE",
        "CIGW_SUBSCRIPTION_KEY",
        "CIGW_SUBSCRIPTION_KEY_SECONDARY",
    ):
        env.pop(name, None)
    config = tmp_path / "routes.yaml"
    routes = {
        "routes": [
            {
                "prefix": "/",
                "upstream_url": f"{upstream.base_url}/v1",
                "scope": "https://api.ci.ai.microsoft.com/.default",
                "subscription_key": CANARY_PRIMARY,
                "subscription_key_secondary": CANARY_SECONDARY,
            },
            {
                "prefix": "/dataverse/",
                "upstream_url": f"{upstream.base_url}/v1",
                "scope": f"{upstream.base_url}/.default",
            },
        ]
    }
    await asyncio.to_thread(config.write_text, yaml.safe_dump(routes))
    env["CIGW_CONFIG"] = str(config)
    text = await check_config(env, ledger)
    assert re.search(r"routes\[0\].subscription_key +\(set, redacted\)", text)
    assert "routes[1].prefix" in text
    for canary in (CANARY_SECRET, CANARY_PRIMARY, CANARY_SECONDARY):
        assert canary not in text
    gateway = await GatewayProcess.start(env, ledger)
    try:
        await exercise(gateway, issuer, ledger)
    finally:
        await gateway.stop()


async def test_redis_password_leaks_nothing(
    issuer: TokenIssuer, upstream: Upstream, ledger: Ledger, ca_file: Path, tmp_path: Path
) -> None:
    """Fleet mode's Redis password, in the URL or a file: never in output, even on failures."""
    redis = RedisServer(tmp_path, password=CANARY_REDIS_PASSWORD)
    await asyncio.to_thread(redis.start)
    try:
        env = process_env(issuer, f"{upstream.base_url}/v1", ca_file)
        port = redis.port
        env["CIGW_REDIS_URL"] = f"redis://:{CANARY_REDIS_PASSWORD}@127.0.0.1:{port}/0"
        env["CIGW_RATE_LIMIT_RPS"] = "100"
        text = await check_config(env, ledger)
        assert "CIGW_REDIS_URL" in text
        gateway = await GatewayProcess.start(env, ledger)
        try:
            await exercise(gateway, issuer, ledger)
            await asyncio.to_thread(redis.kill)  # connection errors get logged too
            async with aiohttp.ClientSession() as session, asyncio.timeout(10):
                while not gateway.logged("fleet_redis_down"):
                    await gateway.get(session, f"http://127.0.0.1:{gateway.proxy_port}/echo/x")
                    await asyncio.sleep(0.05)
        finally:
            await gateway.stop()
        await asyncio.to_thread(redis.start)
        # A wrong password from a file: the refusal names the file, never either password.
        wrong = tmp_path / "redis-password"
        await asyncio.to_thread(wrong.write_text, CANARY_REDIS_PASSWORD + "-wrong\n")
        env["CIGW_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
        env["CIGW_REDIS_PASSWORD_FILE"] = str(wrong)
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            "serve",
            env={"PATH": "/usr/bin:/bin", **env},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        async with asyncio.timeout(30):
            output, _ = await process.communicate()
        ledger.record("refused redis password", output)
        assert process.returncode == 2
        assert b"CIGW_REDIS_PASSWORD_FILE" in output
    finally:
        await asyncio.to_thread(redis.stop)
    ledger.secret(*issuer.issued)
    assert ledger.leaks() == []


async def test_caller_tokens_leak_nothing(
    issuer: TokenIssuer,
    upstream: Upstream,
    ledger: Ledger,
    ca_file: Path,
    server_ssl: ssl.SSLContext,
) -> None:
    """Callers' tokens, accepted or refused, appear in no log line, answer or metric."""
    sa_issuer = ServiceAccountIssuer()
    runner = await start_app(sa_issuer.app(), server_ssl)
    sa_issuer.base_url = base_url(runner, "https")
    env = process_env(issuer, f"{upstream.base_url}/v1", ca_file) | {
        "CIGW_CALLER_AUTH": "kubernetes",
        "CIGW_CALLER_ISSUER": sa_issuer.issuer,
        "CIGW_CALLER_CA_FILE": str(ca_file),
        "CIGW_CALLER_ALLOW": "team-a/reporting",
    }
    await check_config(env, ledger)
    gateway = await GatewayProcess.start(env, ledger)
    tokens = {
        200: sa_issuer.token("team-a", "reporting"),
        403: sa_issuer.token("team-b", "reporting"),
        401: sa_issuer.token("team-a", "reporting", aud=["elsewhere"]),
    }
    try:
        async with aiohttp.ClientSession() as session:
            await gateway.wait_ready(session)
            proxy = f"http://127.0.0.1:{gateway.proxy_port}"
            for status, token in tokens.items():
                async with session.get(
                    f"{proxy}/echo/caller", headers={"Authorization": f"Bearer {token}"}
                ) as response:
                    ledger.record("caller answer", await response.read())
                    assert response.status == status
            _, text = await gateway.get(session, f"http://127.0.0.1:{gateway.admin_port}/metrics")
            assert "cigw_caller_rejections_total" in text
    finally:
        await gateway.stop()
        await runner.cleanup()
        ledger.secret(*sa_issuer.minted, *issuer.issued)
