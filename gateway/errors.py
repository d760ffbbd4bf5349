"""One exception tree for everything the gateway reports to a caller or an operator.

Lower layers raise these; only the error-mapping middleware turns them into responses.
Each leaf carries its HTTP status and stable error code, and inherits the matching
stdlib exception where one exists, so generic handlers still recognise it.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error the gateway answers with a JSON error body."""

    status: int = 500
    code: str = "internal_error"
    # True when the request's framing cannot be trusted: the answer ends the connection.
    close_connection: bool = False

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequest(GatewayError, ValueError):
    """The caller's request cannot be forwarded as it is."""

    status = 400
    code = "bad_request"


class MalformedRequest(BadRequest):
    """The request is not clean HTTP/1.1 (bad framing, bad header syntax): never forwarded."""

    code = "malformed_request"
    close_connection = True


class BodyIncomplete(MalformedRequest):
    """The request body did not arrive in time, or broke its own framing."""

    code = "body_incomplete"


class UriTooLong(MalformedRequest):
    """The request line exceeds the listener's limit (listener.MAX_LINE_SIZE)."""

    status = 414
    code = "uri_too_long"


class HeaderFieldsTooLarge(MalformedRequest):
    """A header field, or the number of them, exceeds the listener's limits."""

    status = 431
    code = "header_fields_too_large"


class NoRoute(GatewayError):
    """The request's path is under no configured route's prefix."""

    status = 404
    code = "no_route"


class MethodNotAllowed(GatewayError):
    """A method the gateway never forwards (CONNECT)."""

    status = 405
    code = "method_not_allowed"
    # After CONNECT, aiohttp's parser reads the rest of the connection as tunnel bytes.
    close_connection = True


class ExpectationFailed(GatewayError):
    """An Expect header other than 100-continue."""

    status = 417
    code = "expectation_failed"
    close_connection = True  # the body that may follow was never asked for


class CallerUnauthenticated(GatewayError):
    """No caller token, or one that is malformed, expired or not signed by the issuer's keys."""

    status = 401
    code = "caller_unauthenticated"

    def __init__(self, message: str) -> None:
        # RFC 6750 §3: the scheme to use; no error details that would help probe the checks.
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class CallerForbidden(GatewayError):
    """A valid caller token whose service account is not on CIGW_CALLER_ALLOW."""

    status = 403
    code = "caller_forbidden"


class CallerKeysUnavailable(GatewayError):
    """The issuer's key set was never loaded, or is older than the outage allowance."""

    status = 503
    code = "caller_keys_unavailable"


class RequiredHeaderMissing(GatewayError):
    """The request lacks the header CIGW_REQUIRE_HEADER names (a guard against SSRF)."""

    status = 412
    code = "required_header_missing"


class PayloadTooLarge(GatewayError):
    """The request body exceeds CIGW_MAX_BODY_BYTES."""

    status = 413
    code = "payload_too_large"


class RateLimited(GatewayError):
    """Local rate limit or upstream hold: the request was not sent upstream."""

    status = 429
    code = "rate_limited"


class TokenUnavailable(GatewayError):
    """No valid access token: the token endpoint failed and no cached token is left."""

    status = 503
    code = "token_unavailable"


class Overloaded(GatewayError):
    """Every upstream connection slot stayed busy for longer than the wait limit."""

    status = 503
    code = "overloaded"


class UpstreamUnreachable(GatewayError, ConnectionError):
    """The upstream could not be reached or broke the exchange before answering."""

    status = 502
    code = "upstream_unreachable"


class UpstreamTimeout(GatewayError, TimeoutError):
    """The upstream did not answer within CIGW_UPSTREAM_TIMEOUT."""

    status = 504
    code = "upstream_timeout"


class ConfigError(Exception):
    """Invalid configuration: carries every problem found, each naming its setting."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(
            "invalid configuration:\n" + "\n".join(f"  - {problem}" for problem in problems)
        )
