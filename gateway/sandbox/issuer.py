"""An Entra-ID-like token issuer: OIDC discovery and a client-credentials token endpoint.

It is what MSAL talks to in the sandbox and in the test suite, over TLS, exactly as it
talks to login.microsoftonline.com: the gateway under test uses its normal code path.
It mints RS256 JWTs that expire, checks the client's credential (secret, certificate
assertion or federated assertion), counts calls, and can be told to misbehave.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import jwt
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


@dataclass(slots=True)
class IssuerFaults:
    """Switches that make the token endpoint misbehave; all off by default."""

    status: int | None = None  # answer this HTTP status with an OAuth error body
    error: str = "temporarily_unavailable"
    aadsts: str = "AADSTS50000"
    retry_after: int | None = None
    delay: float = 0.0  # seconds to wait before answering
    html: bool = False  # answer 200 with an HTML page instead of JSON
    expires_in: int | None = None  # override the token lifetime

    def clear(self) -> None:
        """Back to a healthy endpoint."""
        self.status, self.retry_after, self.delay, self.html, self.expires_in = (
            None,
            None,
            0.0,
            False,
            None,
        )


@dataclass(slots=True)
class ClientRegistration:
    """The one app registration the issuer knows, with the credentials it accepts."""

    tenant_id: str
    client_id: str
    client_secret: str | None = None
    certificate_pem: bytes | None = None  # accept assertions signed by this certificate's key
    federated_assertion: str | None = None  # accept exactly this federated assertion


@dataclass
class TokenIssuer:
    """The issuer's state; `app()` serves it."""

    registration: ClientRegistration
    lifetime: float = 3600.0
    clock: Callable[[], float] = time.time
    faults: IssuerFaults = field(default_factory=IssuerFaults)
    base_url: str = ""  # set once the server listens, e.g. https://127.0.0.1:8443
    token_calls: int = 0
    discovery_calls: int = 0
    issued: list[str] = field(default_factory=list)
    _key: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )

    @property
    def authority(self) -> str:
        """The authority URL the gateway's AZURE_AUTHORITY_HOST + tenant resolve to."""
        return f"{self.base_url}/{self.registration.tenant_id}"

    def verify(self, token: str) -> bool:
        """True for a token this issuer minted that has not expired (by the issuer's clock)."""
        return self._valid(token, None)

    def verify_audience(self, token: str, audience: str) -> bool:
        """As `verify`, and the token was minted for `audience` (scope `{audience}/.default`)."""
        return self._valid(token, audience)

    def _valid(self, token: str, audience: str | None) -> bool:
        try:
            claims = jwt.decode(
                token,
                self._key.public_key(),
                algorithms=["RS256"],
                audience=audience,
                options={
                    "verify_exp": False,
                    "verify_aud": audience is not None,
                    "verify_iat": False,
                },
            )
        except jwt.PyJWTError:
            return False
        return bool(self.clock() < float(claims.get("exp", 0)))

    def app(self) -> web.Application:
        """The discovery document and token endpoint for the registered tenant."""
        tenant = self.registration.tenant_id
        application = web.Application()
        application.router.add_get(
            f"/{tenant}/v2.0/.well-known/openid-configuration", self._discovery
        )
        application.router.add_post(f"/{tenant}/oauth2/v2.0/token", self._token)
        return application

    async def _discovery(self, _request: web.Request) -> web.Response:
        self.discovery_calls += 1
        authority = self.authority
        return web.json_response(
            {
                "issuer": f"{authority}/v2.0",
                "token_endpoint": f"{authority}/oauth2/v2.0/token",
                "authorization_endpoint": f"{authority}/oauth2/v2.0/authorize",
                "jwks_uri": f"{authority}/discovery/v2.0/keys",
                "token_endpoint_auth_methods_supported": [
                    "client_secret_post",
                    "private_key_jwt",
                ],
            }
        )

    async def _token(self, request: web.Request) -> web.Response:
        self.token_calls += 1
        faults = self.faults
        if faults.delay:
            await asyncio.sleep(faults.delay)
        if faults.html:
            return web.Response(
                text="<html><body><h1>Service Unavailable</h1></body></html>",
                content_type="text/html",
            )
        if faults.status is not None:
            headers = {"Retry-After": str(faults.retry_after)} if faults.retry_after else {}
            return _oauth_error(
                faults.status,
                faults.error,
                f"{faults.aadsts}: injected fault.",
                headers,
            )
        form = await request.post()
        problem = self._check_client(
            {key: str(value) for key, value in form.items()}, str(request.url)
        )
        if problem is not None:
            return problem
        return web.json_response(self._mint(str(form.get("scope", ""))))

    def _check_client(self, form: dict[str, str], url: str) -> web.Response | None:
        reg = self.registration
        if form.get("grant_type") != "client_credentials":
            return _oauth_error(400, "unsupported_grant_type", "AADSTS70003: grant not supported.")
        if form.get("client_id") != reg.client_id:
            return _oauth_error(
                400,
                "unauthorized_client",
                f"AADSTS700016: Application with identifier '{form.get('client_id')}' "
                "was not found in the directory.",
            )
        if not form.get("scope", "").endswith("/.default"):
            return _oauth_error(400, "invalid_scope", "AADSTS1002012: scope must be /.default.")
        if "client_secret" in form:
            if reg.client_secret is None or not secrets.compare_digest(
                form["client_secret"], reg.client_secret
            ):
                return _invalid_client("AADSTS7000215: Invalid client secret provided.")
            return None
        assertion = form.get("client_assertion")
        if assertion is None:
            return _invalid_client("AADSTS7000216: client_assertion or client_secret required.")
        if reg.federated_assertion is not None:
            if secrets.compare_digest(assertion, reg.federated_assertion):
                return None
            return _invalid_client("AADSTS700211: No matching federated identity record found.")
        if reg.certificate_pem is not None and _assertion_signed_by(
            assertion, reg.certificate_pem, reg.client_id, url
        ):
            return None
        return _invalid_client("AADSTS700027: Client assertion failed signature validation.")

    def _mint(self, scope: str) -> dict[str, object]:
        now = self.clock()
        lifetime = self.faults.expires_in or self.lifetime
        resource = scope.removesuffix("/.default") or "api://default"
        token = jwt.encode(
            {
                "aud": resource,
                "iss": f"{self.authority}/v2.0",
                "tid": self.registration.tenant_id,
                "appid": self.registration.client_id,
                "sub": self.registration.client_id,
                "iat": int(now),
                "nbf": int(now),
                "exp": now + lifetime,
                "jti": uuid.uuid4().hex,
            },
            self._key,
            algorithm="RS256",
        )
        self.issued.append(token)
        return {
            "token_type": "Bearer",
            "expires_in": int(lifetime),
            "ext_expires_in": int(lifetime),
            "access_token": token,
        }


def _oauth_error(
    status: int, error: str, description: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(
        {
            "error": error,
            "error_description": f"{description}\r\nTrace ID: {uuid.uuid4()}",
            "error_codes": [int(description[6:].split(":", 1)[0] or 0)]
            if description.startswith("AADSTS")
            else [],
            "trace_id": str(uuid.uuid4()),
        },
        status=status,
        headers=headers,
    )


def _invalid_client(description: str) -> web.Response:
    return _oauth_error(401, "invalid_client", description)


def _assertion_signed_by(assertion: str, certificate_pem: bytes, client_id: str, url: str) -> bool:
    certificate = x509.load_pem_x509_certificate(certificate_pem)
    der = certificate.public_bytes(serialization.Encoding.DER)
    thumbprints = {
        base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        for digest in (hashlib.sha1(der).digest(), hashlib.sha256(der).digest())  # noqa: S324 - x5t is SHA-1 by protocol
    }
    try:
        header = jwt.get_unverified_header(assertion)
        claims = jwt.decode(
            assertion,
            certificate.public_key(),  # type: ignore[arg-type]
            algorithms=["RS256", "PS256"],
            audience=url,
        )
    except jwt.PyJWTError:
        return False
    x5t = str(header.get("x5t") or header.get("x5t#S256") or "").rstrip("=")
    return bool(claims.get("iss") == client_id == claims.get("sub") and x5t in thumbprints)
