"""The signed context forwarded upstream in `X-Agentproxy-Context`.

The upstream learns who is calling (agent, user, earlier actors), for which task and under
which rule, from a short-lived JWT it verifies with our published JWKS, instead of receiving
the agent's or user's own credential. Each token is minted for one call: its `jti` is the
call's decision id, and it names the decided action and the method and path forwarded
(`htm`, `htu`, as DPoP, RFC 9449 §4.2, names them), so a tool can check that the token it
received was minted for the request it received, and refuse a `jti` it has seen (a replay)
within the token's short lifetime. Signing costs ~27 µs with EdDSA, once per call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from agentproxy.config.model import ContextToken
from agentproxy.core import Principal
from agentproxy.identity.keys import (
    load_private_key,
    public_jwk,
    signing_algorithm,
    thumbprint,
)

ISSUER = "agentproxy"

ContextKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey


class ContextSigner:
    """Signs context tokens with one Ed25519 or P-256 key, named by its RFC 7638 thumbprint."""

    def __init__(self, key: ContextKey, settings: ContextToken) -> None:
        """Raises ValueError for a key other than Ed25519 or EC P-256."""
        self.algorithm = signing_algorithm(key)
        if self.algorithm not in ("EdDSA", "ES256"):
            raise ValueError(f"context keys are Ed25519 or EC P-256, not {self.algorithm}")
        self._key = key
        self._settings = settings
        self._public_jwk = public_jwk(key.public_key())
        self.kid = thumbprint(self._public_jwk)

    @classmethod
    def load(cls, settings: ContextToken) -> ContextSigner:
        """The signer for `settings`: its key file, or a fresh Ed25519 key if none is set.

        An ephemeral key changes at every start; upstreams then fetch the new JWKS.
        Raises ValueError naming the file if it cannot be read or holds an unsuitable key.
        """
        path = settings.signing_key_file
        if path is None:
            return cls(ed25519.Ed25519PrivateKey.generate(), settings)
        return cls(_load_context_key(path), settings)

    def jwks(self) -> dict[str, Any]:
        """The public key set (RFC 7517 §5) to publish at `/.well-known/jwks.json`."""
        jwk = {**self._public_jwk, "kid": self.kid, "alg": self.algorithm, "use": "sig"}
        return {"keys": [jwk]}

    def sign(
        self,
        *,
        principal: Principal,
        task: str | None,
        rule: str | None,
        upstream: str,
        now: float,
        decision_id: str,
        action: str,
        method: str | None = None,
        path: str | None = None,
        approval: str | None = None,
    ) -> str:
        """The context token of one call (decision `decision_id`, deciding `action`)
        forwarded to `upstream` at `now` as `method path` (path without its query)."""
        issued_at = int(now)
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "aud": self._settings.audience,
            "iat": issued_at,
            "nbf": issued_at,
            "exp": int(now + self._settings.ttl),
            "jti": decision_id,
            "sub": principal.agent,
            "agent": principal.agent,
            "chain": list(principal.chain),
            "upstream": upstream,
            "decision_id": decision_id,
            "action": action,
        }
        if principal.acting_for is not None:
            claims["user"] = principal.acting_for
        if task is not None:
            claims["task"] = task
        if rule is not None:
            claims["rule"] = rule
        if method is not None:
            claims["htm"] = method
        if path is not None:
            claims["htu"] = path
        if approval is not None:
            claims["approval"] = approval
        return jwt.encode(claims, self._key, algorithm=self.algorithm, headers={"kid": self.kid})


def _load_context_key(path: Path) -> ContextKey:
    """Raises ValueError naming `path` if it is unreadable or not an Ed25519 or P-256 key."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the context signing key: {exc}") from exc
    key = load_private_key(data, path)
    if isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(
            f"{path}: RSA keys are refused for context tokens: an RS256 signature costs"
            " ~225 µs on every forwarded call against ~27 µs for Ed25519; use an Ed25519 key"
        )
    return key
