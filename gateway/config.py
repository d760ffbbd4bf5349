"""Settings: defaults < YAML file < environment, validated once into frozen dataclasses.

`load()` is the only place that reads the environment. Every problem is collected and
reported together in one `ConfigError`, each message naming the variable to fix and
never echoing a secret value.
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from yarl import URL

from gateway.credentials import CertificateError, Secret, load_certificate
from gateway.egress import Egress, NoProxy, ProxyServer, ProxyURLError, explicit_egress
from gateway.egress import parse_proxy_url as _parse_proxy_url
from gateway.errors import ConfigError
from gateway.identities import Allowlist
from gateway.tls import TLSFiles, TLSPairError, server_context

__all__ = [
    "ConfigError",
    "Credential",
    "CredentialKind",
    "KeySource",
    "Listen",
    "Route",
    "Secret",
    "Settings",
    "TLSFiles",
    "load",
]

DEFAULT_UPSTREAM = "https://api.ci.ai.dynamics.com/v1"
# The scope Microsoft's server-to-server Customer Insights sample requests.
DEFAULT_SCOPE = "https://api.ci.ai.microsoft.com/.default"
DEFAULT_AUTHORITY = "https://login.microsoftonline.com"
MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Listen:
    """A `host:port` to bind."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


class CredentialKind(enum.StrEnum):
    """How the gateway proves its identity to Entra ID."""

    CLIENT_SECRET = "client_secret"  # noqa: S105 - a kind name, not a secret
    CERTIFICATE = "certificate"
    WORKLOAD_IDENTITY = "workload_identity"


@dataclass(frozen=True, slots=True)
class Credential:
    """Exactly one credential kind with the settings that belong to it."""

    kind: CredentialKind
    secret: Secret | None = None
    secret_file: Path | None = None
    certificate_path: Path | None = None
    certificate_password: Secret | None = None
    federated_token_file: Path | None = None


@dataclass(frozen=True, slots=True)
class KeySource:
    """An APIM subscription key given inline or as a file that is re-read when it changes."""

    value: Secret | None = None
    file: Path | None = None


_DEFAULT_LISTEN = Listen("127.0.0.1", 8080)


@dataclass(frozen=True, slots=True)
class Route:
    """One API behind the gateway: requests under `prefix` go to `upstream_url` with `scope`."""

    prefix: str  # starts and ends with "/"; "/" is the catch-all
    upstream_url: URL
    scope: str
    primary_key: KeySource | None = None
    secondary_key: KeySource | None = None
    upstream_ca_file: Path | None = None
    rate_limit_rps: float = 0.0
    rate_limit_burst: int = 0
    rewrite_links: bool = False
    # Request header names (lower case) never sent to this route's upstream.
    strip_headers: frozenset[str] = frozenset()
    # True for the one route the single-upstream settings (environment) describe.
    implicit: bool = False

    @property
    def name(self) -> str:
        """How logs, metrics and /readyz name the route: its prefix (bounded by the config)."""
        return self.prefix


@dataclass(frozen=True, slots=True)
class Settings:
    """The gateway's whole configuration, validated."""

    tenant_id: str
    client_id: str
    credential: Credential
    listen: Listen = field(default_factory=lambda: _DEFAULT_LISTEN)
    admin_listen: Listen = Listen("0.0.0.0", 9090)
    upstream_url: URL = field(default_factory=lambda: URL(DEFAULT_UPSTREAM))
    scope: str = DEFAULT_SCOPE
    authority_host: str = DEFAULT_AUTHORITY
    instance_discovery: bool = True
    authority_ca_file: Path | None = None
    upstream_ca_file: Path | None = None
    primary_key: KeySource | None = None
    secondary_key: KeySource | None = None
    upstream_timeout: float = 60.0
    # Seconds a pooled upstream connection may stay idle, and live at most (upstream.py
    # says why these defaults).
    upstream_idle_timeout: float = 4.0
    upstream_max_connection_age: float = 300.0
    token_timeout: float = 10.0
    shutdown_grace: float = 20.0
    key_reload_interval: float = 2.0
    log_level: str = "info"
    log_format: str = "auto"
    rate_limit_rps: float = 0.0
    rate_limit_burst: int = 0
    rate_limit_caller_header: str | None = None
    rate_limit_caller_rps: float = 0.0
    rate_limit_caller_burst: int = 0
    retry_attempts: int = 2
    max_body_bytes: int = 100 * MIB
    max_connections: int = 100
    connection_wait: float = 5.0
    client_timeout: float = 30.0
    workers: int = 1
    # HTTPS on the proxy listener when set (CIGW_TLS_CERT_FILE and CIGW_TLS_KEY_FILE).
    tls: TLSFiles | None = None
    # Fleet mode (gateway/fleet.py): absent URL, no fleet; the URL may carry the password.
    redis_url: Secret | None = None
    redis_password_file: Path | None = None
    redis_ca_file: Path | None = None
    redis_timeout: float = 0.02
    fleet_name_setting: str | None = None
    # Caller authentication (issue 13): "none" or "kubernetes" (projected SA tokens).
    caller_auth: str = "none"
    caller_issuer: str | None = None
    caller_jwks_url: URL | None = None
    caller_ca_file: Path | None = None
    caller_audience: str = "ci-gateway"
    caller_allow: tuple[str, ...] = ()
    allow_unauthenticated_callers: bool = False
    require_header: tuple[str, str] | None = None
    # (identity or namespace/*, rps, burst) on top of CIGW_RATE_LIMIT_CALLER_RPS.
    rate_limit_callers: tuple[tuple[str, float, int], ...] = ()
    strip_headers: tuple[str, ...] = ()
    privileged_headers_allow: tuple[str, ...] = ()
    # REQUESTS_CA_BUNDLE or SSL_CERT_FILE: the trust store both clients use unless a
    # CIGW_*_CA_FILE names a more specific one.
    ca_bundle: Path | None = None
    # Proxy or direct, per destination: CIGW_EGRESS_PROXY, else HTTPS_PROXY & co. and NO_PROXY.
    egress: Egress = field(default_factory=Egress)
    # Never empty once built: without YAML `routes:` the single-upstream settings above
    # become one implicit route with prefix "/", so the request path has one shape.
    routes: tuple[Route, ...] = ()
    source: str = field(default="defaults", compare=False)

    def __post_init__(self) -> None:
        if not self.routes:
            implicit = Route(
                prefix="/",
                upstream_url=self.upstream_url,
                scope=self.scope,
                primary_key=self.primary_key,
                secondary_key=self.secondary_key,
                upstream_ca_file=self.upstream_ca_file,
                implicit=True,
            )
            object.__setattr__(self, "routes", (implicit,))  # frozen: set once, here

    def route_trust(self, route: Route) -> Path | None:
        """The CA bundle for `route`'s upstream."""
        return route.upstream_ca_file or self.ca_bundle

    @property
    def authority_trust(self) -> Path | None:
        """The CA bundle for the token endpoint."""
        return self.authority_ca_file or self.ca_bundle

    @property
    def upstream_trust(self) -> Path | None:
        """The CA bundle for the upstream."""
        return self.upstream_ca_file or self.ca_bundle

    @property
    def fleet_name(self) -> str:
        """The namespace of this fleet's Redis keys.

        By default a digest of upstream URLs, tenant and client ID: gateways for another API
        or another app registration never share a budget, and nothing is echoed in clear.
        """
        if self.fleet_name_setting:
            return self.fleet_name_setting
        upstreams = "|".join(str(route.upstream_url) for route in self.routes)
        origin = f"{upstreams}|{self.tenant_id}|{self.client_id}"
        return hashlib.sha256(origin.encode()).hexdigest()[:16]

    @property
    def caller_trust(self) -> Path | None:
        """The CA bundle for the caller-token issuer."""
        return self.caller_ca_file or self.ca_bundle

    @property
    def authority(self) -> str:
        """The MSAL authority URL for the tenant."""
        return f"{self.authority_host.rstrip('/')}/{self.tenant_id}"

    def egress_for(self, url: URL) -> ProxyServer | None:
        """The proxy through which `url` is reached, or None for a direct connection."""
        return self.egress.proxy_for(url.scheme, url.host or "", url.port)

    def egress_destinations(self) -> dict[str, URL]:
        """Each destination the gateway connects to, by the name the log and check-config use."""
        destinations = {"token endpoint": URL(self.authority_host)}
        for route in self.routes:
            name = "upstream" if route.implicit else f"upstream {route.prefix}"
            destinations[name] = route.upstream_url
        return destinations

    def describe(self) -> dict[str, str]:
        """The effective configuration by variable name, every secret redacted."""
        shown = {opt.env: opt.describe(getattr(self, opt.attr)) for opt in _OPTIONS if opt.attr}
        egress = self.egress
        shown["CIGW_EGRESS_PROXY"] = "(unset: the proxy variables decide)"
        for slot, variable in egress.sources:  # proxy URLs with their credentials redacted
            if slot == "no":
                shown[variable] = egress.no_proxy.text
            else:
                shown[variable] = str(getattr(egress, f"{slot}_proxy", None) or "none")
        for destination, url in self.egress_destinations().items():
            shown[f"egress: {destination}"] = self.egress.explain(
                url.scheme, url.host or "", url.port
            )
        cred = self.credential
        shown["credential kind"] = cred.kind.value
        for env, value in (
            ("AZURE_CLIENT_SECRET", cred.secret),
            ("CIGW_CLIENT_SECRET_FILE", cred.secret_file),
            ("AZURE_CLIENT_CERTIFICATE_PATH", cred.certificate_path),
            ("AZURE_CLIENT_CERTIFICATE_PASSWORD", cred.certificate_password),
            ("AZURE_FEDERATED_TOKEN_FILE", cred.federated_token_file),
        ):
            shown[env] = _BY_ENV[env].describe(value)
        for env, key in (
            ("CIGW_SUBSCRIPTION_KEY", self.primary_key),
            ("CIGW_SUBSCRIPTION_KEY_SECONDARY", self.secondary_key),
        ):
            shown[env] = _BY_ENV[env].describe(key.value if key else None)
            shown[f"{env}_FILE"] = _BY_ENV[f"{env}_FILE"].describe(key.file if key else None)
        shown["CIGW_TLS_CERT_FILE"] = str(self.tls.cert_file) if self.tls else "(unset)"
        shown["CIGW_TLS_KEY_FILE"] = str(self.tls.key_file) if self.tls else "(unset)"
        if not self.routes[0].implicit:
            # The single-route settings do not apply: each route shows its own.
            for env, _ in _SINGLE_ROUTE:
                shown.pop(env, None)
            for index, route in enumerate(self.routes):
                shown.update(_describe_route(index, route))
        if self.redis_url is not None:
            shown["fleet name"] = self.fleet_name
        shown["source"] = self.source
        return shown


def _describe_route(index: int, route: Route) -> dict[str, str]:
    """A route's settings under `routes[i].key`, every key redacted."""
    at = f"routes[{index}]."
    shown = {
        f"{at}prefix": route.prefix,
        f"{at}upstream_url": str(route.upstream_url),
        f"{at}scope": route.scope,
    }
    for name, key in (
        ("subscription_key", route.primary_key),
        ("subscription_key_secondary", route.secondary_key),
    ):
        shown[f"{at}{name}"] = "(set, redacted)" if key and key.value else "(unset)"
        shown[f"{at}{name}_file"] = str(key.file) if key and key.file else "(unset)"
    shown[f"{at}upstream_ca_file"] = str(route.upstream_ca_file or "(unset)")
    shown[f"{at}rate_limit_rps"] = f"{route.rate_limit_rps:g}"
    shown[f"{at}rate_limit_burst"] = str(route.rate_limit_burst)
    shown[f"{at}rewrite_links"] = str(route.rewrite_links).lower()
    shown[f"{at}strip_headers"] = ", ".join(sorted(route.strip_headers)) or "(none)"
    return shown


# --------------------------------------------------------------------------- parsing

T = TypeVar("T")
Parser = Callable[[str], T]


class _InvalidError(ValueError):
    """A single value is wrong; the message says what is expected."""


def _text(raw: str) -> str:
    return raw.strip()


def _secret(raw: str) -> Secret:
    return Secret(raw.strip())


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise _InvalidError("must be true or false")


def _number(low: float, *, strict_low: bool = False, high: float = math.inf) -> Parser[float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise _InvalidError("must be a number") from None
        if not math.isfinite(value) or value < low or (strict_low and value == low):
            bound = f"greater than {low:g}" if strict_low else f"at least {low:g}"
            raise _InvalidError(f"must be {bound}")
        if value > high:
            raise _InvalidError(f"must be at most {high:g}")
        return value

    return parse


def _integer(low: int, high: int = 2**62) -> Parser[int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise _InvalidError("must be a whole number") from None
        if not low <= value <= high:
            raise _InvalidError(f"must be between {low} and {high}")
        return value

    return parse


def _listen(raw: str) -> Listen:
    host, sep, port_text = raw.strip().rpartition(":")
    if not sep or not host:
        raise _InvalidError("must be host:port, for example 127.0.0.1:8080")
    host = host.removeprefix("[").removesuffix("]")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise _InvalidError("must end in a port number from 0 to 65535")
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise _InvalidError("host must be an IP address or localhost") from None
    return Listen(host, int(port_text))


def _http_url(raw: str) -> URL:
    url = URL(raw.strip())
    if url.scheme not in {"http", "https"} or not url.host:
        raise _InvalidError(
            "must be an absolute http(s) URL, for example https://api.example.com/v1"
        )
    if url.raw_query_string or url.raw_fragment or url.user or url.password:
        raise _InvalidError("must not contain credentials, a query or a fragment")
    return url


def _readable_file(raw: str) -> Path:
    path = Path(raw.strip())
    if not path.is_file():
        raise _InvalidError(f"file {str(path)!r} does not exist or is not a regular file")
    try:
        with path.open("rb") as handle:
            handle.read(1)
    except OSError as exc:
        raise _InvalidError(f"file {str(path)!r} cannot be read ({exc.strerror})") from None
    return path


def _nonempty_file(raw: str) -> Path:
    path = _readable_file(raw)
    if not path.read_text(encoding="utf-8", errors="replace").strip():
        raise _InvalidError(f"file {str(path)!r} is empty")
    return path


def _redis_url(raw: str) -> Secret:
    # Messages never quote the URL: it may carry the password.
    url = URL(raw.strip())
    if url.scheme not in {"redis", "rediss"} or not url.host:
        raise _InvalidError("must be redis://host:port/db or rediss://host:port/db")
    if url.path not in {"", "/"} and not url.path.strip("/").isdigit():
        raise _InvalidError("must name the database as a number, e.g. redis://host:6379/0")
    if url.raw_query_string or url.raw_fragment:
        raise _InvalidError("must not contain a query or a fragment")
    return Secret(raw.strip())


_FLEET_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _fleet_name(raw: str) -> str:
    value = raw.strip()
    if not _FLEET_NAME.fullmatch(value):
        raise _InvalidError("must be 1 to 64 letters, digits, '.', '_' or '-'")
    return value


def _choice(*choices: str) -> Parser[str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise _InvalidError(f"must be one of {', '.join(choices)}")
        return value

    return parse


def _header_name(raw: str) -> str:
    value = raw.strip()
    # No underscores: the proxy refuses header names with them (a smuggling vector).
    # Dots are allowed: Dataverse's own headers have them (MSCRM.BypassCustomPluginExecution).
    if not value or not value.isascii() or not all(c.isalnum() or c in "-." for c in value):
        raise _InvalidError(
            "must be an HTTP header name of letters, digits, '-' and '.', e.g. X-Caller"
        )
    return value


def _egress_override(raw: str) -> Egress:
    try:
        return explicit_egress(raw)
    except ProxyURLError as exc:
        raise _InvalidError(f"{exc} (or 'none' for no proxy)") from None


def _list(item: Parser[T]) -> Parser[tuple[T, ...]]:
    def parse(raw: str) -> tuple[T, ...]:
        # Spaces around commas are ignored and empty items skipped, as in every list here.
        return tuple(item(piece.strip()) for piece in raw.split(",") if piece.strip())

    return parse


def _identity(raw: str) -> str:
    try:
        Allowlist.parse([raw])
    except ValueError:
        raise _InvalidError(
            f"entry {raw!r} must be namespace/serviceaccount or namespace/*"
        ) from None
    return raw


def _caller_rate(raw: str) -> tuple[str, float, int]:
    identity, sep, rate = raw.partition("=")
    rps_text, _, burst_text = rate.partition(":")
    try:
        rps = float(rps_text)
        burst = int(burst_text) if burst_text else max(1, math.ceil(rps))
    except ValueError:
        rps, burst = -1.0, 0
    if not sep or not math.isfinite(rps) or rps <= 0 or burst < 1:
        raise _InvalidError(f"entry {raw!r} must be namespace/serviceaccount=rps[:burst]")
    return _identity(identity.strip()), rps, burst


def _strip_name(raw: str) -> str:
    # Dataverse's own privileged names contain dots (MSCRM.BypassCustomPluginExecution).
    if not raw or not raw.isascii() or not all(c.isalnum() or c in "-." for c in raw):
        raise _InvalidError(f"entry {raw!r} must be a header name of letters, digits, '-', '.'")
    return raw


def _header_line(raw: str) -> tuple[str, str]:
    name, sep, value = raw.partition(":")
    if not sep or not value.strip():
        raise _InvalidError("must be 'Name: value', for example 'X-Gateway-Caller: app'")
    return _header_name(name), value.strip()


def _https_url(raw: str) -> str:
    url = _http_url(raw)
    if url.scheme != "https":
        raise _InvalidError("must be an https URL (tokens are checked against its keys)")
    return raw.strip()


@dataclass(frozen=True, slots=True)
class _Option(Generic[T]):
    env: str
    parse: Parser[T]
    attr: str = ""
    secret: bool = False

    @property
    def yaml_key(self) -> str:
        return self.env.lower().removeprefix("cigw_")

    def describe(self, value: object) -> str:
        if value is None:
            return "(unset)"
        if self.secret or isinstance(value, Secret):
            return "(set, redacted)"
        return str(value)


_OPTIONS: tuple[_Option[Any], ...] = (
    _Option("CIGW_LISTEN", _listen, "listen"),
    _Option("CIGW_ADMIN_LISTEN", _listen, "admin_listen"),
    _Option("CIGW_UPSTREAM_URL", _http_url, "upstream_url"),
    _Option("CIGW_UPSTREAM_CA_FILE", _readable_file, "upstream_ca_file"),
    _Option("CIGW_SCOPE", _text, "scope"),
    _Option("AZURE_TENANT_ID", _text, "tenant_id"),
    _Option("AZURE_CLIENT_ID", _text, "client_id"),
    _Option("AZURE_CLIENT_SECRET", _secret, secret=True),
    _Option("CIGW_CLIENT_SECRET_FILE", _nonempty_file),
    _Option("AZURE_CLIENT_CERTIFICATE_PATH", _readable_file),
    _Option("AZURE_CLIENT_CERTIFICATE_PASSWORD", _secret, secret=True),
    _Option("AZURE_FEDERATED_TOKEN_FILE", _readable_file),
    _Option("AZURE_AUTHORITY_HOST", _http_url, "authority_host"),
    _Option("CIGW_AUTHORITY_CA_FILE", _readable_file, "authority_ca_file"),
    _Option("CIGW_INSTANCE_DISCOVERY", _bool, "instance_discovery"),
    _Option("CIGW_SUBSCRIPTION_KEY", _secret, secret=True),
    _Option("CIGW_SUBSCRIPTION_KEY_FILE", _nonempty_file),
    _Option("CIGW_SUBSCRIPTION_KEY_SECONDARY", _secret, secret=True),
    _Option("CIGW_SUBSCRIPTION_KEY_SECONDARY_FILE", _nonempty_file),
    _Option("CIGW_KEY_RELOAD_INTERVAL", _number(0.1, high=300), "key_reload_interval"),
    _Option("CIGW_UPSTREAM_TIMEOUT", _number(0, strict_low=True), "upstream_timeout"),
    _Option("CIGW_UPSTREAM_IDLE_TIMEOUT", _number(0, strict_low=True), "upstream_idle_timeout"),
    _Option(
        "CIGW_UPSTREAM_MAX_CONNECTION_AGE",
        _number(0, strict_low=True),
        "upstream_max_connection_age",
    ),
    _Option("CIGW_TOKEN_TIMEOUT", _number(0, strict_low=True), "token_timeout"),
    _Option("CIGW_SHUTDOWN_GRACE", _number(0), "shutdown_grace"),
    _Option("CIGW_CLIENT_TIMEOUT", _number(0, strict_low=True), "client_timeout"),
    _Option("CIGW_LOG_LEVEL", _choice("debug", "info", "warning", "error"), "log_level"),
    _Option("CIGW_LOG_FORMAT", _choice("json", "console", "auto"), "log_format"),
    _Option("CIGW_RATE_LIMIT_RPS", _number(0), "rate_limit_rps"),
    _Option("CIGW_RATE_LIMIT_BURST", _integer(1), "rate_limit_burst"),
    _Option("CIGW_RATE_LIMIT_CALLER_HEADER", _header_name, "rate_limit_caller_header"),
    _Option("CIGW_RATE_LIMIT_CALLER_RPS", _number(0), "rate_limit_caller_rps"),
    _Option("CIGW_RATE_LIMIT_CALLER_BURST", _integer(1), "rate_limit_caller_burst"),
    _Option("CIGW_RETRY_ATTEMPTS", _integer(0, 10), "retry_attempts"),
    _Option("CIGW_MAX_BODY_BYTES", _integer(0), "max_body_bytes"),
    _Option("CIGW_MAX_CONNECTIONS", _integer(1, 100_000), "max_connections"),
    _Option("CIGW_CONNECTION_WAIT", _number(0), "connection_wait"),
    _Option("CIGW_WORKERS", _integer(1, 64), "workers"),
    _Option("CIGW_TLS_CERT_FILE", _readable_file),
    _Option("CIGW_TLS_KEY_FILE", _readable_file),
    # A URL that may hold proxy credentials: never echoed, shown redacted by describe().
    _Option("CIGW_EGRESS_PROXY", _egress_override, secret=True),
    _Option("CIGW_REDIS_URL", _redis_url, "redis_url", secret=True),
    _Option("CIGW_REDIS_PASSWORD_FILE", _nonempty_file, "redis_password_file"),
    _Option("CIGW_REDIS_CA_FILE", _readable_file, "redis_ca_file"),
    _Option("CIGW_REDIS_TIMEOUT", _number(0, strict_low=True, high=10), "redis_timeout"),
    _Option("CIGW_FLEET_NAME", _fleet_name, "fleet_name_setting"),
    _Option("CIGW_CALLER_AUTH", _choice("none", "kubernetes"), "caller_auth"),
    _Option("CIGW_CALLER_ISSUER", _https_url, "caller_issuer"),
    _Option("CIGW_CALLER_JWKS_URL", _http_url, "caller_jwks_url"),
    _Option("CIGW_CALLER_CA_FILE", _readable_file, "caller_ca_file"),
    _Option("CIGW_CALLER_AUDIENCE", _text, "caller_audience"),
    _Option("CIGW_CALLER_ALLOW", _list(_identity), "caller_allow"),
    _Option("CIGW_ALLOW_UNAUTHENTICATED_CALLERS", _bool, "allow_unauthenticated_callers"),
    _Option("CIGW_REQUIRE_HEADER", _header_line, "require_header"),
    _Option("CIGW_RATE_LIMIT_CALLERS", _list(_caller_rate), "rate_limit_callers"),
    _Option("CIGW_STRIP_HEADERS", _list(_strip_name), "strip_headers"),
    _Option("CIGW_PRIVILEGED_HEADERS_ALLOW", _list(_identity), "privileged_headers_allow"),
)
_BY_ENV = {opt.env: opt for opt in _OPTIONS}
_BY_YAML = {opt.yaml_key: opt for opt in _OPTIONS}


def yaml_keys() -> dict[str, str]:
    """YAML key → environment variable, for documentation and tests."""
    return {opt.yaml_key: opt.env for opt in _OPTIONS}


# --------------------------------------------------------------------------- loading


def load(environ: Mapping[str, str], config_file: Path | None = None) -> Settings:
    """Build Settings from defaults, an optional YAML file and the environment."""
    problems: list[str] = []
    raw, source, routes_document = _merge_sources(environ, config_file, problems)
    values: dict[str, Any] = {}
    for env, text in raw.items():
        option = _BY_ENV[env]
        try:
            values[env] = option.parse(text)
        except _InvalidError as exc:
            shown = "" if option.secret else f" (got {text!r})"
            problems.append(f"{env} {exc}{shown}")

    credential = _credential(values, raw, problems)
    for env in ("AZURE_TENANT_ID", "AZURE_CLIENT_ID"):
        if not values.get(env) and env not in raw:
            problems.append(f"{env} is required")
        elif env in raw and not values.get(env):
            problems.append(f"{env} must not be empty")
    primary = _key_source(values, "CIGW_SUBSCRIPTION_KEY", problems)
    secondary = _key_source(values, "CIGW_SUBSCRIPTION_KEY_SECONDARY", problems)
    if secondary and not primary:
        problems.append(
            "CIGW_SUBSCRIPTION_KEY_SECONDARY is set without a primary key: "
            "set CIGW_SUBSCRIPTION_KEY or CIGW_SUBSCRIPTION_KEY_FILE too"
        )
    _check_rate_limits(values, problems)
    _check_callers(values, problems)
    tls = _tls_files(values, raw, problems)
    # CIGW_EGRESS_PROXY replaces the proxy environment: then none of it is read (or checked).
    egress = (
        values.get("CIGW_EGRESS_PROXY", Egress())
        if "CIGW_EGRESS_PROXY" in raw
        else _environment_egress(environ, problems)
    )
    routes: tuple[Route, ...] = ()
    if routes_document is not None:
        _check_single_route_unset(raw, problems)
        routes = _routes(routes_document, problems)
    _check_fleet(values, problems)
    if problems or credential is None:
        raise ConfigError(problems or ["no credential configured"])

    kwargs = {
        option.attr: values[option.env]
        for option in _OPTIONS
        if option.attr and option.env in values
    }
    kwargs.setdefault("rate_limit_burst", _default_burst(values.get("CIGW_RATE_LIMIT_RPS")))
    kwargs.setdefault(
        "rate_limit_caller_burst", _default_burst(values.get("CIGW_RATE_LIMIT_CALLER_RPS"))
    )
    if "authority_host" in kwargs:
        kwargs["authority_host"] = str(kwargs["authority_host"]).rstrip("/")
    return Settings(
        ca_bundle=_ca_bundle(environ),
        egress=egress,
        credential=credential,
        primary_key=primary,
        secondary_key=secondary,
        tls=tls,
        routes=routes,
        source=source,
        **kwargs,
    )


def _merge_sources(
    environ: Mapping[str, str], config_file: Path | None, problems: list[str]
) -> tuple[dict[str, str], str, object | None]:
    raw: dict[str, str] = {}
    routes: object | None = None
    if config_file is None and environ.get("CIGW_CONFIG"):
        config_file = Path(environ["CIGW_CONFIG"])
    source = "defaults"
    if config_file is not None:
        settings, routes = _read_yaml(config_file, problems)
        raw.update(settings)
        source = f"defaults < {config_file}"
    # An empty variable counts as unset: Kubernetes renders optional values that way.
    env_values = {name: environ[name] for name in _BY_ENV if environ.get(name, "") != ""}
    if env_values:
        source += " < environment"
    raw.update(env_values)
    return raw, source, routes


def _read_yaml(path: Path, problems: list[str]) -> tuple[dict[str, str], object | None]:
    """The file's single-value settings by variable name, and its `routes:` list if any."""
    import yaml  # only with a config file: most pods are configured by environment alone

    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        problems.append(f"--config/CIGW_CONFIG file {str(path)!r} cannot be read ({exc.strerror})")
        return {}, None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problems.append(f"--config/CIGW_CONFIG file {str(path)!r} is not valid YAML{where}")
        return {}, None
    if document is None:
        return {}, None
    if not isinstance(document, dict):
        problems.append(f"--config/CIGW_CONFIG file {str(path)!r} must be a mapping of settings")
        return {}, None
    raw: dict[str, str] = {}
    routes: object | None = None
    for key, value in document.items():
        if str(key).lower() == "routes":
            routes = value
            continue
        option = _BY_YAML.get(str(key).lower())
        if option is None:
            problems.append(
                f"unknown setting {key!r} in {path} (YAML keys: see gateway.example.yaml)"
            )
        elif isinstance(value, dict | list):
            problems.append(f"{option.env} (YAML key {key!r}) must be a single value")
        elif value is not None and str(value) != "":
            raw[option.env] = str(value).lower() if isinstance(value, bool) else str(value)
    return raw, routes


def _credential(
    values: Mapping[str, Any], raw: Mapping[str, str], problems: list[str]
) -> Credential | None:
    given = {
        CredentialKind.CLIENT_SECRET: [
            e for e in ("AZURE_CLIENT_SECRET", "CIGW_CLIENT_SECRET_FILE") if e in raw
        ],
        CredentialKind.CERTIFICATE: [e for e in ("AZURE_CLIENT_CERTIFICATE_PATH",) if e in raw],
        CredentialKind.WORKLOAD_IDENTITY: [e for e in ("AZURE_FEDERATED_TOKEN_FILE",) if e in raw],
    }
    chosen = [kind for kind, names in given.items() if names]
    if not chosen:
        problems.append(
            "no credential configured: set exactly one of AZURE_CLIENT_SECRET, "
            "CIGW_CLIENT_SECRET_FILE, AZURE_CLIENT_CERTIFICATE_PATH or AZURE_FEDERATED_TOKEN_FILE"
        )
        return None
    if len(chosen) > 1 or len(given[CredentialKind.CLIENT_SECRET]) > 1:
        names = [name for kind in chosen for name in given[kind]]
        problems.append(f"more than one credential configured ({', '.join(names)}): keep one")
        return None
    if "AZURE_CLIENT_CERTIFICATE_PASSWORD" in raw and chosen[0] != CredentialKind.CERTIFICATE:
        problems.append(
            "AZURE_CLIENT_CERTIFICATE_PASSWORD is set without AZURE_CLIENT_CERTIFICATE_PATH"
        )
    kind = chosen[0]
    if kind is CredentialKind.CERTIFICATE:
        path = values.get("AZURE_CLIENT_CERTIFICATE_PATH")
        password = values.get("AZURE_CLIENT_CERTIFICATE_PASSWORD")
        if path is not None:
            try:
                load_certificate(path, password)
            except CertificateError as exc:
                problems.append(f"AZURE_CLIENT_CERTIFICATE_PATH: {exc}")
        return Credential(kind, certificate_path=path, certificate_password=password)
    if kind is CredentialKind.WORKLOAD_IDENTITY:
        return Credential(kind, federated_token_file=values.get("AZURE_FEDERATED_TOKEN_FILE"))
    return Credential(
        kind,
        secret=values.get("AZURE_CLIENT_SECRET"),
        secret_file=values.get("CIGW_CLIENT_SECRET_FILE"),
    )


def _key_source(values: Mapping[str, Any], env: str, problems: list[str]) -> KeySource | None:
    inline, file = values.get(env), values.get(f"{env}_FILE")
    if inline is not None and file is not None:
        problems.append(f"both {env} and {env}_FILE are set: keep one")
        return None
    if inline is not None and not inline.reveal():
        problems.append(f"{env} must not be blank")
        return None
    if inline is None and file is None:
        return None
    return KeySource(value=inline, file=file)


def _check_rate_limits(values: Mapping[str, Any], problems: list[str]) -> None:
    if "CIGW_RATE_LIMIT_BURST" in values and not values.get("CIGW_RATE_LIMIT_RPS"):
        problems.append("CIGW_RATE_LIMIT_BURST is set but CIGW_RATE_LIMIT_RPS is 0 (limit off)")
    header = values.get("CIGW_RATE_LIMIT_CALLER_HEADER")
    caller_rps = values.get("CIGW_RATE_LIMIT_CALLER_RPS")
    kubernetes = values.get("CIGW_CALLER_AUTH") == "kubernetes"
    if header and kubernetes:
        problems.append(
            "CIGW_RATE_LIMIT_CALLER_HEADER conflicts with CIGW_CALLER_AUTH=kubernetes: callers "
            "are then rate-limited by their verified identity; remove the header setting"
        )
    if caller_rps and not header and not kubernetes:
        problems.append(
            "CIGW_RATE_LIMIT_CALLER_RPS is set without CIGW_RATE_LIMIT_CALLER_HEADER "
            "(the header that names the calling service)"
        )
    if header and not caller_rps:
        problems.append("CIGW_RATE_LIMIT_CALLER_HEADER is set without CIGW_RATE_LIMIT_CALLER_RPS")
    if "CIGW_RATE_LIMIT_CALLER_BURST" in values and not caller_rps:
        problems.append("CIGW_RATE_LIMIT_CALLER_BURST is set without CIGW_RATE_LIMIT_CALLER_RPS")


_LOOPBACK = ("127.", "::1", "localhost")


def _check_callers(values: Mapping[str, Any], problems: list[str]) -> None:
    kubernetes = values.get("CIGW_CALLER_AUTH") == "kubernetes"
    listen: Listen = values.get("CIGW_LISTEN", _DEFAULT_LISTEN)
    if (
        not kubernetes
        and not listen.host.startswith(_LOOPBACK)
        and not values.get("CIGW_ALLOW_UNAUTHENTICATED_CALLERS")
    ):
        problems.append(
            f"CIGW_LISTEN is {listen}, beyond loopback, with CIGW_CALLER_AUTH=none: anyone who "
            "reaches the port would use the gateway's credentials. Set CIGW_CALLER_AUTH="
            "kubernetes, or CIGW_ALLOW_UNAUTHENTICATED_CALLERS=true if a network policy is "
            "deliberately the only guard"
        )
    needs_auth = (
        "CIGW_CALLER_ISSUER",
        "CIGW_CALLER_JWKS_URL",
        "CIGW_CALLER_CA_FILE",
        "CIGW_CALLER_AUDIENCE",
        "CIGW_CALLER_ALLOW",
        "CIGW_RATE_LIMIT_CALLERS",
        "CIGW_PRIVILEGED_HEADERS_ALLOW",
    )
    if not kubernetes:
        problems.extend(
            f"{env} is set but CIGW_CALLER_AUTH is none (it needs verified caller identities)"
            for env in needs_auth
            if env in values
        )
        return
    if "CIGW_CALLER_ISSUER" not in values:
        problems.append(
            "CIGW_CALLER_AUTH=kubernetes needs CIGW_CALLER_ISSUER (the cluster's service-account "
            "issuer, e.g. https://kubernetes.default.svc.cluster.local)"
        )
    if not values.get("CIGW_CALLER_ALLOW"):
        problems.append(
            "CIGW_CALLER_AUTH=kubernetes needs CIGW_CALLER_ALLOW (namespace/serviceaccount "
            "entries, or namespace/*)"
        )
    if "CIGW_CALLER_AUDIENCE" in values and not values["CIGW_CALLER_AUDIENCE"]:
        problems.append("CIGW_CALLER_AUDIENCE must not be empty")
    allow = Allowlist.parse(values.get("CIGW_CALLER_ALLOW", ()))
    for identity, _, _ in values.get("CIGW_RATE_LIMIT_CALLERS", ()):
        wildcard = identity.endswith("/*")
        if not (
            identity.removesuffix("/*") in allow.namespaces
            if wildcard
            else allow.label(identity) is not None
        ):
            problems.append(f"CIGW_RATE_LIMIT_CALLERS names {identity}, not in CIGW_CALLER_ALLOW")


def _tls_files(
    values: Mapping[str, Any], raw: Mapping[str, str], problems: list[str]
) -> TLSFiles | None:
    given = [env for env in ("CIGW_TLS_CERT_FILE", "CIGW_TLS_KEY_FILE") if env in raw]
    if not given:
        return None
    if len(given) == 1:
        (missing,) = {"CIGW_TLS_CERT_FILE", "CIGW_TLS_KEY_FILE"} - set(given)
        problems.append(f"{given[0]} is set without {missing}: HTTPS needs both")
        return None
    cert, key = values.get("CIGW_TLS_CERT_FILE"), values.get("CIGW_TLS_KEY_FILE")
    if cert is None or key is None:
        return None  # unreadable: already reported
    files = TLSFiles(cert, key)
    try:
        server_context(files)  # the listener would fail later, after the pod looked started
    except TLSPairError as exc:
        problems.append(f"CIGW_TLS_CERT_FILE/CIGW_TLS_KEY_FILE: {exc}")
        return None
    return files


def _environment_egress(environ: Mapping[str, str], problems: list[str]) -> Egress:
    """HTTPS_PROXY, HTTP_PROXY, ALL_PROXY and NO_PROXY, read as curl and requests read them."""
    proxies: dict[str, ProxyServer] = {}
    sources: list[tuple[str, str]] = []
    for slot in ("https", "http", "all"):
        found = _proxy_variable(environ, f"{slot}_proxy")
        if found is None:
            continue
        name, value = found
        try:
            proxies[slot] = _parse_proxy_url(value)
        except ProxyURLError as exc:
            # Never the value: it may hold the proxy's credentials.
            problems.append(
                f"{name} {exc}; or set CIGW_EGRESS_PROXY to override the proxy environment"
            )
            continue
        sources.append((slot, name))
    no_proxy = NoProxy()
    found = _proxy_variable(environ, "no_proxy")
    if found is not None:
        no_proxy = NoProxy.parse(found[1])
        sources.append(("no", found[0]))
    return Egress(
        https_proxy=proxies.get("https"),
        http_proxy=proxies.get("http"),
        all_proxy=proxies.get("all"),
        no_proxy=no_proxy,
        sources=tuple(sources),
    )


def _proxy_variable(environ: Mapping[str, str], lower_name: str) -> tuple[str, str] | None:
    """(name, value) of `lower_name` or its upper-case twin, lower case first (curl, requests).

    Empty counts as unset, as for every setting here. urllib would let an empty lower-case
    variable hide the upper-case one (SECURITY.md).
    """
    for name in (lower_name, lower_name.upper()):
        value = environ.get(name, "")
        if value.strip():
            return name, value
    return None


def _check_fleet(values: Mapping[str, Any], problems: list[str]) -> None:
    url: Secret | None = values.get("CIGW_REDIS_URL")
    if url is None:
        problems.extend(
            f"{env} is set without CIGW_REDIS_URL (fleet mode is off)"
            for env in (
                "CIGW_REDIS_PASSWORD_FILE",
                "CIGW_REDIS_CA_FILE",
                "CIGW_REDIS_TIMEOUT",
                "CIGW_FLEET_NAME",
            )
            if env in values
        )
        return
    parsed = URL(url.reveal())
    if "CIGW_REDIS_CA_FILE" in values and parsed.scheme != "rediss":
        problems.append("CIGW_REDIS_CA_FILE is set but CIGW_REDIS_URL is not rediss:// (TLS)")
    if "CIGW_REDIS_PASSWORD_FILE" in values and parsed.password:
        problems.append(
            "CIGW_REDIS_URL carries a password and CIGW_REDIS_PASSWORD_FILE is set: keep one"
        )


def _ca_bundle(environ: Mapping[str, str]) -> Path | None:
    for name in ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        if environ.get(name) and Path(environ[name]).is_file():
            return Path(environ[name])
    return None


def _default_burst(rps: float | None) -> int:
    return max(1, math.ceil(rps)) if rps else 0


# --------------------------------------------------------------------------- routes

# Settings that describe the single implicit route; with `routes:` each route has its own.
_SINGLE_ROUTE = (
    ("CIGW_UPSTREAM_URL", "upstream_url"),
    ("CIGW_SCOPE", "scope"),
    ("CIGW_UPSTREAM_CA_FILE", "upstream_ca_file"),
    ("CIGW_SUBSCRIPTION_KEY", "subscription_key"),
    ("CIGW_SUBSCRIPTION_KEY_FILE", "subscription_key_file"),
    ("CIGW_SUBSCRIPTION_KEY_SECONDARY", "subscription_key_secondary"),
    ("CIGW_SUBSCRIPTION_KEY_SECONDARY_FILE", "subscription_key_secondary_file"),
)
_ROUTE_KEYS = frozenset(
    {
        "prefix",
        "upstream_url",
        "scope",
        "subscription_key",
        "subscription_key_file",
        "subscription_key_secondary",
        "subscription_key_secondary_file",
        "upstream_ca_file",
        "rate_limit_rps",
        "rate_limit_burst",
        "rewrite_links",
        "strip_headers",
    }
)
_SECRET_ROUTE_KEYS = frozenset({"subscription_key", "subscription_key_secondary"})
# A path prefix of plain segments: no dot-segments, no percent-encoding, no query.
_PREFIX = re.compile(r"/(?:[A-Za-z0-9_~!$&'()*+,;=:@-][A-Za-z0-9._~!$&'()*+,;=:@-]*/)*")
# Dataverse organizations: {org}.crm{N}.dynamics.com and the sovereign clouds' hosts.
_DATAVERSE_HOST = re.compile(
    r".+\.crm\d*\.(?:dynamics\.com|microsoftdynamics\.(?:de|us)|appsplatform\.us"
    r"|dynamics\.cn)",
    re.IGNORECASE,
)


def route_keys() -> frozenset[str]:
    """The keys a `routes:` entry accepts, for documentation and tests."""
    return _ROUTE_KEYS


def _check_single_route_unset(raw: Mapping[str, str], problems: list[str]) -> None:
    for env, key in _SINGLE_ROUTE:
        if env in raw:
            problems.append(
                f"{env} (YAML key {env.lower().removeprefix('cigw_')!r}) is set together with "
                f"routes:, which gives every route its own: move it into the routes as "
                f"routes[i].{key}"
            )


def _routes(document: object, problems: list[str]) -> tuple[Route, ...]:
    if not isinstance(document, list) or not document:
        problems.append("routes must be a non-empty list of routes (each a mapping)")
        return ()
    routes: list[Route] = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(document):
        route = _route(index, entry, problems)
        if route is None:
            continue
        if route.prefix in seen:
            problems.append(
                f"routes[{index}].prefix: {route.prefix!r} is also routes[{seen[route.prefix]}]'s"
            )
            continue
        seen[route.prefix] = index
        routes.append(route)
    return tuple(routes)


def _route(index: int, entry: object, problems: list[str]) -> Route | None:
    at = f"routes[{index}]"
    if not isinstance(entry, dict):
        problems.append(f"{at} must be a mapping with prefix, upstream_url and scope")
        return None
    before = len(problems)
    given = _route_entry(at, entry, problems)

    def parsed(key: str, parse: Parser[T]) -> T | None:
        if key not in given:
            return None
        value = given[key]
        if isinstance(value, dict | list):
            problems.append(f"{at}.{key}: must be a single value")
            return None
        text = str(value).lower() if isinstance(value, bool) else str(value)
        try:
            return parse(text)
        except _InvalidError as exc:
            shown = "" if key in _SECRET_ROUTE_KEYS else f" (got {text!r})"
            problems.append(f"{at}.{key}: {exc}{shown}")
            return None

    prefix = parsed("prefix", _route_prefix)
    url = parsed("upstream_url", _http_url)
    scope = parsed("scope", _text)
    if "scope" in given and scope == "":
        problems.append(f"{at}.scope: must not be empty")
    keys: dict[str, KeySource | None] = {}
    for name in ("subscription_key", "subscription_key_secondary"):
        inline, file = parsed(name, _secret), parsed(f"{name}_file", _nonempty_file)
        if inline is not None and file is not None:
            problems.append(f"{at}.{name}: both {name} and {name}_file are set: keep one")
        elif inline is not None and not inline.reveal():
            problems.append(f"{at}.{name}: must not be blank")
        keys[name] = KeySource(inline, file) if inline is not None or file is not None else None
    if keys["subscription_key_secondary"] and not keys["subscription_key"]:
        problems.append(
            f"{at}.subscription_key_secondary: is set without a primary key "
            "(subscription_key or subscription_key_file)"
        )
    ca_file = parsed("upstream_ca_file", _readable_file)
    rps = parsed("rate_limit_rps", _number(0)) or 0.0
    burst = parsed("rate_limit_burst", _integer(1))
    if burst is not None and not rps:
        problems.append(f"{at}.rate_limit_burst: is set but rate_limit_rps is 0 (limit off)")
    rewrite = parsed("rewrite_links", _bool)
    strip = _strip_headers(at, given.get("strip_headers"), problems)
    if len(problems) > before or prefix is None or url is None or not scope:
        return None
    return Route(
        prefix=prefix,
        upstream_url=url,
        scope=scope,
        primary_key=keys["subscription_key"],
        secondary_key=keys["subscription_key_secondary"],
        upstream_ca_file=ca_file,
        rate_limit_rps=rps,
        rate_limit_burst=burst if burst is not None else _default_burst(rps),
        rewrite_links=rewrite if rewrite is not None else is_dataverse(url, scope),
        strip_headers=strip,
    )


def _route_entry(at: str, entry: dict[Any, Any], problems: list[str]) -> dict[str, object]:
    """The entry's values by lower-case key; unknown and missing required keys reported."""
    given: dict[str, object] = {}
    for key, value in entry.items():
        name = str(key).lower()
        if name not in _ROUTE_KEYS:
            problems.append(f"{at}: unknown setting {key!r} (route keys: see gateway.example.yaml)")
        elif value is not None and value != "":
            given[name] = value
    for required in ("prefix", "upstream_url", "scope"):
        if required not in given:
            problems.append(f"{at}.{required}: is required")
    return given


def _route_prefix(raw: str) -> str:
    value = raw.strip()
    if not value.startswith("/"):
        raise _InvalidError("must start with '/', for example /dataverse/")
    if not value.endswith("/"):
        value += "/"
    if not _PREFIX.fullmatch(value) or "/./" in value or "/../" in value:
        raise _InvalidError(
            "must be plain path segments (letters, digits, -._~ and the like; no '%', "
            "'?', '#', empty or dot segments), for example /dataverse/"
        )
    return value


def _strip_headers(at: str, value: object, problems: list[str]) -> frozenset[str]:
    if value is None:
        return frozenset()
    names = value if isinstance(value, list) else str(value).split(",")
    stripped: set[str] = set()
    for name in names:
        try:
            stripped.add(_header_name(str(name)).lower())
        except _InvalidError as exc:
            problems.append(f"{at}.strip_headers: {exc} (got {str(name)!r})")
    return frozenset(stripped)


def is_dataverse(url: URL, scope: str) -> bool:
    """True for a Dataverse organization: its well-known hosts, or a scope of `{org}/.default`.

    Dataverse's resource is the organization URL itself, so its scope names the upstream's
    origin; Customer Insights and APIM-fronted APIs use a resource of their own.
    """
    origin = str(url.origin()).rstrip("/").lower()
    scope = scope.strip().lower()
    return bool(_DATAVERSE_HOST.fullmatch(url.host or "")) or scope in {
        f"{origin}/.default",
        f"{origin}//.default",
    }
