"""Fleet-mode fixtures: real redis-server processes on loopback ports, stopped by PID."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.servers.redis import RedisServer


@pytest.fixture(scope="session")
def redis_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the session; each test uses its own fleet name (key namespace)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, which the test may kill and start again."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def password_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server that requires a password (requirepass)."""
    server = RedisServer(tmp_path, password=f"canary-redis-password-{uuid.uuid4().hex[:8]}")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def tls_redis(tmp_path: Path, ca: trustme.CA) -> Iterator[RedisServer]:
    """A redis-server speaking only TLS, its certificate signed by the tests' CA."""
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    chain, key, ca_pem = tmp_path / "chain.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    leaf.private_key_pem.write_to_path(str(key))
    chain.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    ca.cert_pem.write_to_path(str(ca_pem))
    server = RedisServer(tmp_path, tls=(chain, key, ca_pem))
    server.start()
    yield server
    server.stop()


def fleet_overrides(url: str, **extra: str) -> dict[str, str]:
    """Environment for fleet mode: a fresh fleet name, a timeout generous for a loaded machine."""
    return {
        "CIGW_REDIS_URL": url,
        "CIGW_FLEET_NAME": f"test-{uuid.uuid4().hex[:12]}",
        "CIGW_REDIS_TIMEOUT": "0.5",
        **extra,
    }
