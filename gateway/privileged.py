"""Request headers that borrow the app registration's privileges, removed from callers' requests.

Dataverse lets a request act as another user (CallerObjectId, MSCRMCallerID) or skip
business logic (the MSCRM.Bypass* headers) when the calling app user holds those
privileges; the gateway's app user may hold them, so no caller may send them unless its
verified identity is on CIGW_PRIVILEGED_HEADERS_ALLOW.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

# https://learn.microsoft.com/power-apps/developer/data-platform/impersonate-another-user-web-api
# https://learn.microsoft.com/power-apps/developer/data-platform/bypass-custom-business-logic
DATAVERSE_PRIVILEGED = (
    "CallerObjectId",
    "MSCRMCallerID",
    "MSCRM.BypassCustomPluginExecution",
    "MSCRM.BypassBusinessLogicExecution",
    "MSCRM.BypassBusinessLogicExecutionStepIds",
)


class PrivilegedHeaders:
    """The names removed by default (matched case-insensitively) and who may send them."""

    def __init__(self, extra: Iterable[str] = ()) -> None:
        by_lower: dict[str, str] = {}
        for name in (*DATAVERSE_PRIVILEGED, *extra):
            by_lower.setdefault(name.lower(), name)
        # The configured spelling names the metric label and the log field: bounded.
        self._names = tuple(by_lower.values())
        self.lower = frozenset(by_lower)

    @property
    def names(self) -> tuple[str, ...]:
        """Every stripped name as configured (the metric's label values)."""
        return self._names

    def present(self, headers: Mapping[str, str]) -> list[str]:
        """The privileged names `headers` (case-insensitive) carries, as configured."""
        return [name for name in self._names if name in headers]
