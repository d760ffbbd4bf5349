"""Routes at run time: each configured API's services, and the longest-prefix match.

Every request goes through one route (without YAML `routes:` the environment's settings
are one implicit route with prefix "/"), so the request path has one shape. The match
is a few `str.startswith` calls over prefixes sorted longest first, computed once: no
regular expression and no allocation per request beyond the remainder's slice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from gateway.batch_requests import BatchRequestRewriter
from gateway.config import Route
from gateway.links import LinkRewriter
from gateway.ratelimit import ExchangeSlots, Limiter, RetryBudget, UpstreamHold
from gateway.state import KeySource, TokenSource
from gateway.upstream import UpstreamClient


@dataclass(slots=True)
class RouteState:
    """One route's configuration and the services that are its own: a 429 on one holds only it."""

    route: Route
    tokens: TokenSource
    keys: KeySource
    hold: UpstreamHold
    budget: RetryBudget
    slots: ExchangeSlots
    limiter: Limiter | None = None  # the route's own budget (rate_limit_rps), if any
    client: UpstreamClient | None = None  # set by its resource before serving
    drop_headers: frozenset[str] = frozenset()  # request headers never sent upstream
    # The same for callers allowed the privileged headers (CIGW_PRIVILEGED_HEADERS_ALLOW).
    privileged_drop_headers: frozenset[str] = frozenset()
    base_path: str = field(init=False)
    links: LinkRewriter | None = field(init=False)  # with rewrite_links
    batch_requests: BatchRequestRewriter | None = field(init=False)  # with rewrite_links

    def __post_init__(self) -> None:
        self.base_path = self.route.upstream_url.raw_path.rstrip("/")
        route = self.route
        self.links = LinkRewriter(route.upstream_url, route.prefix) if route.rewrite_links else None
        self.batch_requests = (
            BatchRequestRewriter(route.upstream_url, route.prefix) if route.rewrite_links else None
        )

    @property
    def name(self) -> str:
        """The route's label: its configured prefix."""
        return self.route.prefix


class Router:
    """Finds the route with the longest prefix that a request target starts with."""

    __slots__ = ("_catch_all", "_entries", "routes")

    def __init__(self, routes: Sequence[RouteState]) -> None:
        if not routes:
            raise ValueError("a router needs at least one route")
        self.routes = tuple(routes)
        # (prefix, prefix without its final "/", route), longest prefix first.
        self._entries = tuple(
            (state.route.prefix, state.route.prefix[:-1], state)
            for state in sorted(routes, key=lambda s: len(s.route.prefix), reverse=True)
            if state.route.prefix != "/"
        )
        self._catch_all = next((s for s in routes if s.route.prefix == "/"), None)

    def match(self, target: str) -> tuple[RouteState, str] | None:
        """(route, the target with the prefix removed, starting with "/"), or None."""
        for prefix, stem, state in self._entries:
            if target.startswith(prefix):
                return state, target[len(stem) :]
            # "/dataverse" and "/dataverse?x" name the route's root too.
            if target.startswith(stem) and target[len(stem) : len(stem) + 1] in ("", "?"):
                return state, "/" + target[len(stem) :]
        if self._catch_all is not None:
            return self._catch_all, target
        return None
