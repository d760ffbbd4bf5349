"""A Kubernetes-like service-account issuer: OIDC discovery + JWKS over TLS, and its tokens.

Tokens are shaped as a kubelet-projected token is (claims of a real one: aud list, exp,
iat, nbf, iss, jti, sub, and the kubernetes.io claim naming namespace, node, pod and
service account with their uids, and warnafter), signed RS256 or ES256 with a `kid`.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

AUDIENCE = "ci-gateway"


@dataclass
class SigningKey:
    """A private key the issuer signs with, and its public JWK."""

    kid: str
    algorithm: str  # RS256 or ES256
    private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

    @classmethod
    def generate(cls, algorithm: str = "RS256", kid: str | None = None) -> SigningKey:
        """A fresh key: RSA 2048 for RS256, P-256 for ES256."""
        private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = (
            rsa.generate_private_key(public_exponent=65537, key_size=2048)
            if algorithm == "RS256"
            else ec.generate_private_key(ec.SECP256R1())
        )
        return cls(kid or uuid.uuid4().hex[:16], algorithm, private)

    def jwk(self) -> dict[str, Any]:
        """The public key as the API server publishes it (kty, alg, use, kid, key params)."""
        public = self.private.public_key()
        data: dict[str, Any] = json.loads(
            RSAAlgorithm.to_jwk(public)
            if isinstance(public, rsa.RSAPublicKey)
            else ECAlgorithm.to_jwk(public)
        )
        return {**data, "use": "sig", "alg": self.algorithm, "kid": self.kid}

    def public_pem(self) -> bytes:
        """The public key in PEM (what an HS256 confusion attack signs with)."""
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def projected_claims(
    issuer: str,
    namespace: str,
    account: str,
    *,
    audience: str | list[str] = AUDIENCE,
    now: float | None = None,
    lifetime: int = 3607,
) -> dict[str, Any]:
    """The claims of a kubelet-projected service-account token."""
    issued = int(time.time() if now is None else now)
    return {
        "aud": [audience] if isinstance(audience, str) else audience,
        "exp": issued + lifetime,
        "iat": issued,
        "iss": issuer,
        "jti": str(uuid.uuid4()),
        "kubernetes.io": {
            "namespace": namespace,
            "node": {"name": "worker-1", "uid": str(uuid.uuid4())},
            "pod": {"name": f"{account}-7d9f8b6c5-x2x4q", "uid": str(uuid.uuid4())},
            "serviceaccount": {"name": account, "uid": str(uuid.uuid4())},
            "warnafter": issued + int(lifetime * 0.8),
        },
        "nbf": issued,
        "sub": f"system:serviceaccount:{namespace}:{account}",
    }


def sign(claims: dict[str, Any], key: SigningKey, **header: Any) -> str:
    """A JWS of `claims` by `key` (header: kid and alg, overridable)."""
    headers = {"kid": key.kid, **header}
    # PyJWS, not jwt.encode: tests sign claims that jwt.encode refuses (a non-string iss).
    payload = json.dumps(claims, separators=(",", ":")).encode()
    return jwt.api_jws.encode(payload, key.private, algorithm=key.algorithm, headers=headers)


def unsigned(claims: dict[str, Any], kid: str) -> str:
    """An `alg: none` token."""

    def part(data: dict[str, Any]) -> str:
        raw = json.dumps(data, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT', 'kid': kid})}.{part(claims)}."


@dataclass
class ServiceAccountIssuer:
    """Serves discovery and the key set; counts fetches; can be taken down and rotated."""

    keys: list[SigningKey] = field(default_factory=lambda: [SigningKey.generate()])
    base_url: str = ""
    jwks_fetches: int = 0
    discovery_fetches: int = 0
    down: bool = False
    minted: list[str] = field(default_factory=list)

    @property
    def issuer(self) -> str:
        """The `iss` of its tokens: its own base URL, as an API server's issuer is."""
        return self.base_url

    def app(self) -> web.Application:
        """Discovery at /.well-known/openid-configuration, keys at /openid/v1/jwks."""
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/openid/v1/jwks", self._jwks)
        return app

    async def _discovery(self, _request: web.Request) -> web.Response:
        self.discovery_fetches += 1
        if self.down:
            return web.Response(status=503)
        return web.json_response(
            {
                "issuer": self.issuer,
                "jwks_uri": f"{self.base_url}/openid/v1/jwks",
                "response_types_supported": ["id_token"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
            }
        )

    async def _jwks(self, _request: web.Request) -> web.Response:
        self.jwks_fetches += 1
        if self.down:
            return web.Response(status=503)
        return web.json_response({"keys": [key.jwk() for key in self.keys]})

    def rotate(self, algorithm: str = "RS256") -> SigningKey:
        """A new signing key replaces the old ones."""
        key = SigningKey.generate(algorithm)
        self.keys = [key]
        return key

    def token(self, namespace: str, account: str, **overrides: Any) -> str:
        """A valid projected token for namespace/account (claims overridable), remembered."""
        claims = projected_claims(self.issuer, namespace, account)
        claims.update(overrides)
        token = sign(claims, self.keys[0])
        self.minted.append(token)
        return token
