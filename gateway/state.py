"""Typed application and request state, and the protocols the proxy reaches services through."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from aiohttp import web

from gateway.group_metrics import WorkerGroup
from gateway.metrics import Metrics


class TokenSource(Protocol):
    """Hands out the current access token."""

    @property
    def valid(self) -> bool:
        """True while a token that has not expired is held."""

    @property
    def problem(self) -> str | None:
        """Why no token is available, in words safe to show a caller."""

    async def token(self) -> str:
        """The current token; waits only for a first acquisition already under way."""

    async def replace(self, rejected: str) -> str:
        """A token other than `rejected`, acquiring a fresh one if needed."""


class KeySource(Protocol):
    """Hands out APIM subscription keys and learns which ones APIM rejects."""

    def current(self) -> tuple[str, str] | None:
        """(slot, key) to send first, or None when no key is configured."""

    def fallback(self, rejected_slot: str) -> tuple[str, str] | None:
        """The other slot after APIM rejected `rejected_slot`, or None when there is none."""


@dataclass(slots=True)
class Readiness:
    """What /readyz reports: draining is set on SIGTERM, every route's token source is consulted."""

    tokens: Mapping[str, TokenSource]  # by route name
    named: bool = False  # name the route in the reason (with YAML routes:)
    draining: bool = False
    # More reasons not to be ready (the caller-token key set not loaded yet); None: fine.
    checks: tuple[Callable[[], str | None], ...] = ()

    def reason(self) -> str | None:
        """None when ready, else why not (naming each route that is not ready)."""
        if self.draining:
            return "draining: shutting down"
        reasons = [
            f"{f'route {name}: ' if self.named else ''}no valid token: "
            f"{tokens.problem or 'first token not acquired yet'}"
            for name, tokens in self.tokens.items()
            if not tokens.valid
        ]
        if reasons:
            return "; ".join(reasons)
        for check in self.checks:
            problem = check()
            if problem is not None:
                return problem
        return None


@dataclass(slots=True)
class RequestContext:
    """Per-request facts gathered on the way through, for the access log and metrics."""

    request_id: str
    started: float = field(default_factory=time.perf_counter)
    upstream_status: int | None = None
    key_slot: str | None = None
    response_started: bool = False
    error_code: str | None = None
    caller: str | None = None  # the verified namespace/serviceaccount (caller authentication)
    caller_label: str = ""  # the allowlist entry it matched: the metric label
    privileged: bool = False  # may send the privileged headers (CIGW_PRIVILEGED_HEADERS_ALLOW)


METRICS = web.AppKey("metrics", Metrics)
READINESS = web.AppKey("readiness", Readiness)
# Set with CIGW_WORKERS>1: /metrics reports the whole group (gateway/group_metrics.py).
WORKER_GROUP = web.AppKey("worker_group", WorkerGroup)
CONTEXT = web.RequestKey("context", RequestContext)
# Set on an answer after which the connection must end at once (its framing is not trusted).
CLOSE_CONNECTION = web.ResponseKey("close_connection", bool)
