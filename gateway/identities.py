"""Caller identities: `namespace/serviceaccount` allowlists and the verified caller.

Apart from gateway/callers.py so that configuration and the request handler can use them
without importing PyJWT and cryptography: a sidecar without caller authentication never
loads those (they cost several MB of resident memory in every pod).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")  # a Kubernetes object name


@dataclass(frozen=True, slots=True)
class Allowlist:
    """`namespace/serviceaccount` entries, and `namespace/*` for a whole namespace."""

    exact: frozenset[str]
    namespaces: frozenset[str]

    @classmethod
    def parse(cls, entries: Iterable[str]) -> Allowlist:
        """From entries already split on commas; ValueError names a malformed one."""
        exact: set[str] = set()
        namespaces: set[str] = set()
        for entry in entries:
            namespace, slash, name = entry.partition("/")
            if not slash or not NAME.fullmatch(namespace):
                raise ValueError(f"{entry!r} is not namespace/serviceaccount or namespace/*")
            if name == "*":
                namespaces.add(namespace)
            elif NAME.fullmatch(name):
                exact.add(entry)
            else:
                raise ValueError(f"{entry!r} is not namespace/serviceaccount or namespace/*")
        return cls(frozenset(exact), frozenset(namespaces))

    def __bool__(self) -> bool:
        return bool(self.exact or self.namespaces)

    def label(self, identity: str) -> str | None:
        """The entry `identity` matches (itself or `namespace/*`), or None when not listed."""
        if identity in self.exact:
            return identity
        namespace = identity.partition("/")[0]
        return f"{namespace}/*" if namespace in self.namespaces else None

    def labels(self) -> list[str]:
        """Every value label() can return: the bounded set of metric labels."""
        return sorted(self.exact) + sorted(f"{namespace}/*" for namespace in self.namespaces)


@dataclass(frozen=True, slots=True)
class Caller:
    """A verified caller: its identity, and the allowlist entry it matched (its label)."""

    identity: str  # namespace/serviceaccount, from the token
    label: str  # from the allowlist, so metric labels stay bounded
