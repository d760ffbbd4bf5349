"""Routes: YAML `routes:` validation naming each route's setting, and the longest-prefix match."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from yarl import URL

from gateway import config
from gateway.config import ConfigError, Route
from gateway.ratelimit import ExchangeSlots, RetryBudget, UpstreamHold
from gateway.routing import Router, RouteState

BASE = {
    "AZURE_TENANT_ID": "tenant",
    "AZURE_CLIENT_ID": "client",
    "AZURE_CLIENT_SECRET": "canary-secret-value-1",
}
CI = {
    "prefix": "/ci/",
    "upstream_url": "https://api.ci.ai.dynamics.com/v1",
    "scope": "https://api.ci.ai.microsoft.com/.default",
}
DATAVERSE = {
    "prefix": "/dataverse/",
    "upstream_url": "https://contoso.crm.dynamics.com",
    "scope": "https://contoso.crm.dynamics.com/.default",
}
ROUTE_KEY_CANARY = "canary0route0key000000000007c1d"


def load(tmp_path: Path, routes: Any, env: dict[str, str] | None = None) -> config.Settings:
    """Settings from BASE + `env` and a YAML file holding `routes`."""
    file = tmp_path / "gateway.yaml"
    file.write_text(yaml.safe_dump({"routes": routes}))
    return config.load({**BASE, **(env or {})}, file)


def test_environment_alone_makes_one_implicit_catch_all_route() -> None:
    """Without routes: the single-upstream settings become one route with prefix /."""
    settings = config.load({**BASE, "CIGW_SUBSCRIPTION_KEY": "k" * 12})
    (route,) = settings.routes
    assert route.implicit
    assert route.prefix == "/"
    assert route.upstream_url == settings.upstream_url
    assert route.scope == settings.scope
    assert route.primary_key == settings.primary_key
    assert route.rewrite_links is False
    assert not any(name.startswith("routes[") for name in settings.describe())


def test_routes_are_read_with_their_own_settings(tmp_path: Path) -> None:
    """Each route gets its prefix (slash added), upstream, scope, keys, limit, stripped headers."""
    settings = load(
        tmp_path,
        [
            {**CI, "prefix": "/ci", "subscription_key": ROUTE_KEY_CANARY},
            {
                **DATAVERSE,
                "rate_limit_rps": 5,
                "strip_headers": ["MSCRMCallerID", "CallerObjectId"],
            },
        ],
    )
    ci, dataverse = settings.routes
    assert (ci.prefix, dataverse.prefix) == ("/ci/", "/dataverse/")
    assert ci.primary_key is not None
    assert ci.primary_key.value is not None
    assert ci.primary_key.value.reveal() == ROUTE_KEY_CANARY
    assert dataverse.primary_key is None
    assert (dataverse.rate_limit_rps, dataverse.rate_limit_burst) == (5, 5)
    assert dataverse.strip_headers == frozenset({"mscrmcallerid", "callerobjectid"})
    assert (ci.rewrite_links, dataverse.rewrite_links) == (False, True)


def test_dataverse_headers_with_dots_can_be_stripped(tmp_path: Path) -> None:
    """strip_headers takes Dataverse's dotted header names, e.g. its business-logic bypass."""
    names = ["MSCRM.BypassCustomPluginExecution", "MSCRM.BypassBusinessLogicExecution"]
    (route,) = load(tmp_path, [{**DATAVERSE, "prefix": "/", "strip_headers": names}]).routes
    assert route.strip_headers == frozenset(name.lower() for name in names)


@pytest.mark.parametrize(
    ("route", "expected"),
    [
        pytest.param(DATAVERSE, True, id="crm-host"),
        pytest.param(
            {**DATAVERSE, "upstream_url": "https://org.crm4.dynamics.com"}, True, id="crm4"
        ),
        pytest.param(
            {
                **CI,
                "upstream_url": "https://127.0.0.1:8443",
                "scope": "https://127.0.0.1:8443/.default",
            },
            True,
            id="scope-names-the-upstream",
        ),
        pytest.param(CI, False, id="customer-insights"),
        pytest.param({**DATAVERSE, "rewrite_links": False}, False, id="explicitly-off"),
        pytest.param({**CI, "rewrite_links": True}, True, id="explicitly-on"),
    ],
)
def test_rewrite_links_defaults_to_on_for_dataverse(
    tmp_path: Path, route: dict[str, Any], expected: bool
) -> None:
    """rewrite_links is on by default for a Dataverse organization only; an explicit value wins."""
    (loaded,) = load(tmp_path, [route]).routes
    assert loaded.rewrite_links is expected


@pytest.mark.parametrize(
    ("routes", "expected"),
    [
        pytest.param([{**CI, "scope": ""}], ["routes[0].scope: is required"], id="scope-missing"),
        pytest.param(
            [CI, {**DATAVERSE, "upstream_url": "ftp://x"}],
            ["routes[1].upstream_url: must be an absolute http(s) URL"],
            id="url-scheme",
        ),
        pytest.param(
            [CI, {**DATAVERSE, "prefix": "/ci"}],
            ["routes[1].prefix: '/ci/' is also routes[0]'s"],
            id="duplicate-prefix",
        ),
        pytest.param(
            [{**CI, "prefix": "ci"}], ["routes[0].prefix: must start with '/'"], id="relative"
        ),
        pytest.param([{**CI, "prefix": "/a/../b"}], ["routes[0].prefix: must be plain"], id="dots"),
        pytest.param(
            [{**CI, "prefix": "/a%2f/"}], ["routes[0].prefix: must be plain"], id="percent"
        ),
        pytest.param(
            [{**CI, "colour": "blue"}], ["routes[0]: unknown setting 'colour'"], id="unknown"
        ),
        pytest.param(
            [{**CI, "subscription_key_secondary": "secondary-key-1"}],
            ["routes[0].subscription_key_secondary: is set without a primary key"],
            id="secondary-only",
        ),
        pytest.param(
            [{**CI, "rate_limit_burst": 3}],
            ["routes[0].rate_limit_burst: is set but rate_limit_rps is 0"],
            id="burst-without-rps",
        ),
        pytest.param(
            [{**CI, "strip_headers": ["X_Bad"]}],
            ["routes[0].strip_headers: must be an HTTP header"],
            id="header-name",
        ),
        pytest.param([], ["routes must be a non-empty list"], id="empty"),
        pytest.param(["/ci/"], ["routes[0] must be a mapping"], id="not-a-mapping"),
        pytest.param(
            [{**CI, "scope": ""}, {**DATAVERSE, "rewrite_links": "sometimes"}],
            ["routes[0].scope: is required", "routes[1].rewrite_links: must be true or false"],
            id="every-problem-at-once",
        ),
    ],
)
def test_route_errors_name_the_route_and_setting(
    tmp_path: Path, routes: list[Any], expected: list[str]
) -> None:
    """Each wrong route setting is reported as routes[i].key, all in one ConfigError."""
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, routes)
    assert len(caught.value.problems) == len(expected), caught.value.problems
    for problem, text in zip(caught.value.problems, expected, strict=True):
        assert text in problem


@pytest.mark.parametrize(
    "env",
    ["CIGW_UPSTREAM_URL", "CIGW_SCOPE", "CIGW_SUBSCRIPTION_KEY", "CIGW_SUBSCRIPTION_KEY_SECONDARY"],
)
def test_single_route_settings_conflict_with_routes(tmp_path: Path, env: str) -> None:
    """With routes:, a single-route setting is an error naming both it and the route key."""
    value = "https://x.example/v1" if env == "CIGW_UPSTREAM_URL" else "some-value-123"
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, [CI], {env: value})
    assert any(env in problem and "routes" in problem for problem in caught.value.problems)


def test_describe_lists_routes_with_keys_redacted(tmp_path: Path) -> None:
    """check-config's view shows every route's settings, never a key, and no single-route rows."""
    settings = load(
        tmp_path,
        [{**CI, "subscription_key": ROUTE_KEY_CANARY}, DATAVERSE],
    )
    shown = settings.describe()
    assert shown["routes[0].subscription_key"] == "(set, redacted)"
    assert shown["routes[1].upstream_url"] == "https://contoso.crm.dynamics.com"
    assert shown["routes[1].rewrite_links"] == "true"
    assert "CIGW_UPSTREAM_URL" not in shown
    assert ROUTE_KEY_CANARY not in str(shown) + repr(settings)


def _router(*prefixes: str) -> Router:
    def state(prefix: str) -> RouteState:
        route = Route(prefix, URL(f"https://{prefix.strip('/') or 'root'}.example/base"), "s")
        return RouteState(
            route,
            tokens=None,  # type: ignore[arg-type]  # matching never touches them
            keys=None,  # type: ignore[arg-type]
            hold=UpstreamHold(),
            budget=RetryBudget(),
            slots=ExchangeSlots(1),
        )

    return Router([state(prefix) for prefix in prefixes])


@pytest.mark.parametrize(
    ("prefixes", "target", "expected"),
    [
        pytest.param(("/",), "/a/b?c=1", ("/", "/a/b?c=1"), id="catch-all"),
        pytest.param(("/ci/", "/"), "/ci/x", ("/ci/", "/x"), id="prefix-removed"),
        pytest.param(("/ci/", "/ci/deep/"), "/ci/deep/x", ("/ci/deep/", "/x"), id="longest"),
        pytest.param(("/ci/deep/", "/ci/"), "/ci/deeper", ("/ci/", "/deeper"), id="segment-bound"),
        pytest.param(("/ci/",), "/ci", ("/ci/", "/"), id="root-without-slash"),
        pytest.param(("/ci/",), "/ci?$top=1", ("/ci/", "/?$top=1"), id="root-with-query"),
        pytest.param(("/ci/",), "/cix", None, id="no-match"),
        pytest.param(("/ci/",), "/CI/x", None, id="case-sensitive"),
        pytest.param(("/ci/",), "http://evil/ci/x", None, id="absolute-form"),
        pytest.param(("/ci/", "/"), "/%63i/x", ("/", "/%63i/x"), id="encoded-is-not-the-prefix"),
    ],
)
def test_longest_prefix_match(
    prefixes: tuple[str, ...], target: str, expected: tuple[str, str] | None
) -> None:
    """The longest prefix that the raw target starts with wins; its prefix is removed."""
    found = _router(*prefixes).match(target)
    assert (None if found is None else (found[0].name, found[1])) == expected


def test_example_yaml_documents_every_route_key() -> None:
    """config/gateway.example.yaml names every key a route accepts."""
    example = Path(__file__).parents[2] / "config" / "gateway.example.yaml"
    text = example.read_text()
    for key in config.route_keys():
        assert f"#     {key}:" in text or f"#     # {key}:" in text or f"- {key}:" in text, key
