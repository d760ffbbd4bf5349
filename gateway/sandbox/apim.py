"""What Azure API Management does in front of the API: subscription key and bearer checks.

The 401 bodies are APIM's own wording, so the gateway's key-versus-token decision is
exercised against what production sends.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

KEY_HEADER = "Ocp-Apim-Subscription-Key"
MISSING_KEY = (
    "Access denied due to missing subscription key. "
    "Make sure to include subscription key when making requests to an API."
)
INVALID_KEY = (
    "Access denied due to invalid subscription key. "
    "Make sure to provide a valid key for an active subscription."
)
INVALID_TOKEN = "Unauthorized. Access token is missing or invalid."


def new_key() -> str:
    """A key shaped like APIM's: 32 hex characters."""
    return secrets.token_hex(16)


@dataclass(slots=True)
class SubscriptionKeyPair:
    """An APIM subscription's primary and secondary key; admins regenerate either."""

    primary: str = field(default_factory=new_key)
    secondary: str = field(default_factory=new_key)

    def regenerate(self, slot: str) -> str:
        """Replace one key, as the Azure portal's Regenerate button does."""
        value = new_key()
        setattr(self, slot, value)
        return value

    def accepts(self, key: str) -> bool:
        """True for either current key."""
        return any(secrets.compare_digest(key, valid) for valid in (self.primary, self.secondary))


def apim_guard(keys: SubscriptionKeyPair | None, verify_token: Callable[[str], bool]) -> Middleware:
    """Reject like APIM: the key first (missing/invalid), then the bearer token.

    With `keys` None only the bearer token is checked, as an API without APIM in front
    (the Dataverse Web API) does.
    """

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if keys is not None:
            key = request.headers.get(KEY_HEADER) or request.query.get("subscription-key")
            if not key:
                return _denied(MISSING_KEY)
            if not keys.accepts(key):
                return _denied(INVALID_KEY)
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not verify_token(token.strip()):
            return _denied(INVALID_TOKEN, {"WWW-Authenticate": 'Bearer error="invalid_token"'})
        return await handler(request)

    return guard


def _denied(message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"statusCode": 401, "message": message}, status=401, headers=headers)
