"""Configuration: precedence, validation messages naming each setting, secrets redacted."""

from __future__ import annotations

from pathlib import Path

import pytest
from yarl import URL

from gateway import config
from gateway.config import ConfigError, CredentialKind
from tests.certs import client_certificate

BASE = {
    "AZURE_TENANT_ID": "tenant",
    "AZURE_CLIENT_ID": "client",
    "AZURE_CLIENT_SECRET": "canary-secret-value-1",
}


def test_defaults_match_the_documented_contract() -> None:
    """Only the required settings given: every other value is the documented default."""
    settings = config.load(BASE)
    assert str(settings.listen) == "127.0.0.1:8080"
    assert str(settings.admin_listen) == "0.0.0.0:9090"
    assert settings.upstream_url == URL("https://api.ci.ai.dynamics.com/v1")
    assert settings.scope == "https://api.ci.ai.microsoft.com/.default"
    assert settings.authority == "https://login.microsoftonline.com/tenant"
    assert settings.instance_discovery is True
    assert settings.upstream_timeout == 60
    assert settings.upstream_idle_timeout == 4
    assert settings.upstream_max_connection_age == 300
    assert settings.shutdown_grace == 20
    assert settings.log_level == "info"
    assert settings.primary_key is None
    assert settings.credential.kind is CredentialKind.CLIENT_SECRET


def test_environment_overrides_yaml_which_overrides_defaults(tmp_path: Path) -> None:
    """Precedence is defaults < YAML file < environment, and YAML keys mirror the variables."""
    file = tmp_path / "gateway.yaml"
    file.write_text(
        "listen: 127.0.0.1:7000\nupstream_timeout: 5\nazure_tenant_id: from-yaml\n"
        "instance_discovery: false\n"
    )
    settings = config.load({**BASE, "CIGW_UPSTREAM_TIMEOUT": "7"}, file)
    assert settings.listen.port == 7000  # from YAML
    assert settings.upstream_timeout == 7  # environment wins
    assert settings.tenant_id == "tenant"  # environment wins
    assert settings.instance_discovery is False
    assert settings.shutdown_grace == 20  # default


def test_config_file_from_environment(tmp_path: Path) -> None:
    """CIGW_CONFIG names the YAML file when --config is not given."""
    file = tmp_path / "g.yaml"
    file.write_text("scope: api://custom/.default\n")
    assert config.load({**BASE, "CIGW_CONFIG": str(file)}).scope == "api://custom/.default"


def test_example_yaml_is_valid_and_covers_every_setting() -> None:
    """config/gateway.example.yaml documents every YAML key and loads as it is."""
    example = Path(__file__).parents[2] / "config" / "gateway.example.yaml"
    text = example.read_text()
    for key in config.yaml_keys():
        assert f"{key}:" in text, f"{key} is not documented in {example.name}"
    settings = config.load({"AZURE_CLIENT_SECRET": "x" * 12}, example)
    assert settings.tenant_id


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        pytest.param(
            {}, ["AZURE_TENANT_ID is required", "AZURE_CLIENT_ID is required"], id="missing-ids"
        ),
        pytest.param(
            {"AZURE_CLIENT_SECRET": None}, ["no credential configured"], id="no-credential"
        ),
        pytest.param(
            {"CIGW_LISTEN": "8080"}, ["CIGW_LISTEN must be host:port"], id="listen-no-host"
        ),
        pytest.param(
            {"CIGW_LISTEN": "127.0.0.1:99999"}, ["CIGW_LISTEN must end in a port"], id="port-range"
        ),
        pytest.param(
            {"CIGW_UPSTREAM_URL": "ftp://x/v1"},
            ["CIGW_UPSTREAM_URL must be an absolute http(s) URL"],
            id="upstream-scheme",
        ),
        pytest.param(
            {"CIGW_UPSTREAM_URL": "https://x/v1?a=1"},
            ["CIGW_UPSTREAM_URL must not contain"],
            id="upstream-query",
        ),
        pytest.param(
            {"CIGW_UPSTREAM_TIMEOUT": "0"},
            ["CIGW_UPSTREAM_TIMEOUT must be greater than 0"],
            id="timeout-zero",
        ),
        pytest.param(
            {"CIGW_UPSTREAM_IDLE_TIMEOUT": "0"},
            ["CIGW_UPSTREAM_IDLE_TIMEOUT must be greater than 0"],
            id="idle-timeout-zero",
        ),
        pytest.param(
            {"CIGW_UPSTREAM_MAX_CONNECTION_AGE": "forever"},
            ["CIGW_UPSTREAM_MAX_CONNECTION_AGE"],
            id="max-age-not-a-number",
        ),
        pytest.param(
            {"CIGW_SHUTDOWN_GRACE": "soon"},
            ["CIGW_SHUTDOWN_GRACE must be a number"],
            id="grace-text",
        ),
        pytest.param(
            {"CIGW_INSTANCE_DISCOVERY": "maybe"},
            ["CIGW_INSTANCE_DISCOVERY must be true or false"],
            id="bool",
        ),
        pytest.param({"CIGW_LOG_LEVEL": "loud"}, ["CIGW_LOG_LEVEL must be one of"], id="log-level"),
        pytest.param(
            {"CIGW_LOG_FORMAT": "xml"}, ["CIGW_LOG_FORMAT must be one of"], id="log-format"
        ),
        pytest.param(
            {"AZURE_FEDERATED_TOKEN_FILE": "/nonexistent/token"},
            ["AZURE_FEDERATED_TOKEN_FILE file '/nonexistent/token' does not exist"],
            id="missing-file",
        ),
        pytest.param(
            {"CIGW_SUBSCRIPTION_KEY_SECONDARY": "abcdefgh12"},
            ["CIGW_SUBSCRIPTION_KEY_SECONDARY is set without a primary key"],
            id="secondary-only",
        ),
        pytest.param(
            {"CIGW_RATE_LIMIT_CALLER_RPS": "5"},
            ["CIGW_RATE_LIMIT_CALLER_RPS is set without CIGW_RATE_LIMIT_CALLER_HEADER"],
            id="caller-rps-no-header",
        ),
        pytest.param(
            {"CIGW_RETRY_ATTEMPTS": "-1"},
            ["CIGW_RETRY_ATTEMPTS must be between 0 and 10"],
            id="retries",
        ),
    ],
)
def test_invalid_settings_are_named(env: dict[str, str | None], expected: list[str]) -> None:
    """Each wrong setting produces a message that names it and says what is expected."""
    # The empty case drops the app registration ids to show both are named.
    merged = {**BASE, **env} if env else {"AZURE_CLIENT_SECRET": BASE["AZURE_CLIENT_SECRET"]}
    environ = {name: value for name, value in merged.items() if value is not None}
    with pytest.raises(ConfigError) as caught:
        config.load(environ)
    text = str(caught.value)
    for fragment in expected:
        assert fragment in text


def test_every_problem_is_reported_at_once() -> None:
    """Several wrong settings give one error listing all of them."""
    with pytest.raises(ConfigError) as caught:
        config.load({"CIGW_LISTEN": "x", "CIGW_UPSTREAM_TIMEOUT": "-1", "CIGW_LOG_LEVEL": "loud"})
    problems = caught.value.problems
    assert len(problems) >= 6
    for name in (
        "CIGW_LISTEN",
        "CIGW_UPSTREAM_TIMEOUT",
        "CIGW_LOG_LEVEL",
        "AZURE_TENANT_ID",
        "AZURE_CLIENT_ID",
        "credential",
    ):
        assert any(name in problem for problem in problems), name


def test_two_credential_kinds_are_refused(tmp_path: Path) -> None:
    """A secret and a federated token file together are an error naming both."""
    token = tmp_path / "token"
    token.write_text("assertion")
    with pytest.raises(ConfigError, match="AZURE_CLIENT_SECRET, AZURE_FEDERATED_TOKEN_FILE"):
        config.load({**BASE, "AZURE_FEDERATED_TOKEN_FILE": str(token)})


def test_inline_and_file_key_together_are_refused(tmp_path: Path) -> None:
    """A key given both inline and as a file is ambiguous and refused."""
    key = tmp_path / "key"
    key.write_text("k" * 32)
    with pytest.raises(
        ConfigError, match="both CIGW_SUBSCRIPTION_KEY and CIGW_SUBSCRIPTION_KEY_FILE"
    ):
        config.load(
            {**BASE, "CIGW_SUBSCRIPTION_KEY": "a" * 32, "CIGW_SUBSCRIPTION_KEY_FILE": str(key)}
        )


def test_unknown_yaml_key_is_refused(tmp_path: Path) -> None:
    """A typo in the YAML file is reported instead of silently ignored."""
    file = tmp_path / "g.yaml"
    file.write_text("upstream_timout: 5\n")
    with pytest.raises(ConfigError, match="unknown setting 'upstream_timout'"):
        config.load(BASE, file)


def test_secrets_are_never_echoed() -> None:
    """Secret values appear neither in error messages nor in repr nor in describe()."""
    canary = "canary-key-should-not-print"
    with pytest.raises(ConfigError) as caught:
        config.load({**BASE, "CIGW_SUBSCRIPTION_KEY_SECONDARY": canary, "AZURE_TENANT_ID": ""})
    assert canary not in str(caught.value)
    settings = config.load({**BASE, "CIGW_SUBSCRIPTION_KEY": canary})
    assert canary not in repr(settings)
    assert canary not in str(settings.describe())
    assert BASE["AZURE_CLIENT_SECRET"] not in repr(settings) + str(settings.describe())
    assert settings.describe()["CIGW_SUBSCRIPTION_KEY"] == "(set, redacted)"


def test_certificate_credential_with_password(tmp_path: Path) -> None:
    """An encrypted PEM with the right password loads; a wrong password is a named error."""
    pem, _ = client_certificate(b"canary-cert-password")
    path = tmp_path / "client.pem"
    path.write_bytes(pem)
    env = {
        "AZURE_TENANT_ID": "t",
        "AZURE_CLIENT_ID": "c",
        "AZURE_CLIENT_CERTIFICATE_PATH": str(path),
    }
    settings = config.load({**env, "AZURE_CLIENT_CERTIFICATE_PASSWORD": "canary-cert-password"})
    assert settings.credential.kind is CredentialKind.CERTIFICATE
    with pytest.raises(ConfigError) as caught:
        config.load({**env, "AZURE_CLIENT_CERTIFICATE_PASSWORD": "wrong-password-123"})
    assert "AZURE_CLIENT_CERTIFICATE_PATH" in str(caught.value)
    assert "wrong-password-123" not in str(caught.value)


def test_ca_bundle_from_standard_variables(tmp_path: Path) -> None:
    """REQUESTS_CA_BUNDLE (or SSL_CERT_FILE) is the trust store unless a CIGW_*_CA_FILE is set."""
    bundle, pinned = tmp_path / "bundle.pem", tmp_path / "pinned.pem"
    bundle.write_text("x")
    pinned.write_text("y")
    settings = config.load({**BASE, "SSL_CERT_FILE": str(bundle)})
    assert settings.authority_trust == bundle
    assert settings.upstream_trust == bundle
    settings = config.load(
        {**BASE, "SSL_CERT_FILE": str(bundle), "CIGW_AUTHORITY_CA_FILE": str(pinned)}
    )
    assert settings.authority_trust == pinned
    assert settings.upstream_trust == bundle
