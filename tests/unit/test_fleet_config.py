"""Fleet-mode settings: validation, the derived fleet name, and the Redis URL as a secret."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway import config
from gateway.config import ConfigError

BASE = {
    "AZURE_TENANT_ID": "tenant-a",
    "AZURE_CLIENT_ID": "client-a",
    "AZURE_CLIENT_SECRET": "canary-fleet-config-secret",
}
PASSWORD = "canary-redis-url-password-77"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        pytest.param(
            {"CIGW_REDIS_URL": "http://127.0.0.1:6379"},
            "CIGW_REDIS_URL must be redis://host:port/db or rediss://host:port/db",
            id="scheme",
        ),
        pytest.param(
            {"CIGW_REDIS_URL": "redis://127.0.0.1:6379/orders"},
            "CIGW_REDIS_URL must name the database as a number",
            id="database",
        ),
        pytest.param(
            {"CIGW_REDIS_TIMEOUT": "0.5"},
            "CIGW_REDIS_TIMEOUT is set without CIGW_REDIS_URL",
            id="timeout-without-url",
        ),
        pytest.param(
            {"CIGW_FLEET_NAME": "orders"},
            "CIGW_FLEET_NAME is set without CIGW_REDIS_URL",
            id="name-without-url",
        ),
        pytest.param(
            {"CIGW_REDIS_URL": "redis://127.0.0.1:6379/0", "CIGW_REDIS_TIMEOUT": "0"},
            "CIGW_REDIS_TIMEOUT must be greater than 0",
            id="timeout-zero",
        ),
        pytest.param(
            {"CIGW_REDIS_URL": "redis://127.0.0.1:6379/0", "CIGW_FLEET_NAME": "a b"},
            "CIGW_FLEET_NAME must be 1 to 64 letters",
            id="name-spaces",
        ),
    ],
)
def test_wrong_fleet_settings_are_named(env: dict[str, str], expected: str) -> None:
    """Each wrong fleet setting gives a message naming it and what is expected."""
    with pytest.raises(ConfigError, match=expected):
        config.load({**BASE, **env})


def test_ca_file_needs_tls(tmp_path: Path) -> None:
    """A CA file with a plain redis:// URL is refused: it would pin nothing."""
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    with pytest.raises(ConfigError, match="CIGW_REDIS_CA_FILE is set but CIGW_REDIS_URL is not"):
        config.load({**BASE, "CIGW_REDIS_URL": "redis://r:6379/0", "CIGW_REDIS_CA_FILE": str(ca)})


def test_password_in_url_and_file_is_refused_without_echo(tmp_path: Path) -> None:
    """Two passwords are ambiguous; the message never quotes the URL's."""
    secret = tmp_path / "password"
    secret.write_text("other\n")
    with pytest.raises(ConfigError) as caught:
        config.load(
            {
                **BASE,
                "CIGW_REDIS_URL": f"redis://:{PASSWORD}@r:6379/0",
                "CIGW_REDIS_PASSWORD_FILE": str(secret),
            }
        )
    assert "keep one" in str(caught.value)
    assert PASSWORD not in str(caught.value)


def test_a_wrong_url_with_a_password_is_not_echoed() -> None:
    """An invalid Redis URL is reported without its text (it may carry the password)."""
    with pytest.raises(ConfigError) as caught:
        config.load({**BASE, "CIGW_REDIS_URL": f"redis://:{PASSWORD}@r:6379/x"})
    assert PASSWORD not in str(caught.value)


def test_redis_url_is_redacted_everywhere() -> None:
    """The Redis URL is a secret: not in repr, describe() or str of the settings."""
    settings = config.load({**BASE, "CIGW_REDIS_URL": f"redis://:{PASSWORD}@r:6379/0"})
    assert settings.redis_url is not None
    assert PASSWORD in settings.redis_url.reveal()
    shown = settings.describe()
    assert shown["CIGW_REDIS_URL"] == "(set, redacted)"
    assert PASSWORD not in repr(settings) + str(shown) + str(settings)


def test_default_fleet_name_separates_apis_and_registrations() -> None:
    """The default namespace differs by upstream, tenant and client, and shows none of them."""
    url = {"CIGW_REDIS_URL": "redis://r:6379/0"}
    one = config.load({**BASE, **url})
    same = config.load({**BASE, **url})
    other_api = config.load({**BASE, **url, "CIGW_UPSTREAM_URL": "https://other.example/v1"})
    other_client = config.load({**BASE, **url, "AZURE_CLIENT_ID": "client-b"})
    names = {one.fleet_name, other_api.fleet_name, other_client.fleet_name}
    assert len(names) == 3
    assert one.fleet_name == same.fleet_name
    assert "client-a" not in one.fleet_name
    assert "tenant-a" not in one.fleet_name
    assert one.describe()["fleet name"] == one.fleet_name
    named = config.load({**BASE, **url, "CIGW_FLEET_NAME": "orders"})
    assert named.fleet_name == "orders"


def test_without_redis_nothing_changes() -> None:
    """No CIGW_REDIS_URL: no fleet settings and no fleet line in describe()."""
    settings = config.load(BASE)
    assert settings.redis_url is None
    assert "fleet name" not in settings.describe()
    assert settings.redis_timeout == 0.02
