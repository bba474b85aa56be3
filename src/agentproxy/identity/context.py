"""The signed context forwarded upstream in `X-Agentproxy-Context`.

The upstream learns who is calling (agent, user, earlier actors), for which task and under
which rule, from a short-lived JWT it verifies with our published JWKS, instead of receiving
the agent's or user's own credential. Each token is minted for one call: its `jti` is the
call's decision id, and it names the decided action and the method and path forwarded
(`htm`, `htu`, as DPoP, RFC 9449 §4.2, names them), so a tool can check that the token it
received was minted for the request it received, and refuse a `jti` it has seen (a replay)
within the token's short lifetime. Signing costs ~29 µs with EdDSA, once per call.

The token is compact JWS (RFC 7515 §7.1) written here rather than by `jwt.encode`: its
header is the same for every token, so it is encoded once at load, and the call's claims
are serialized with orjson and signed with `cryptography` directly. PyJWT spent ~25 µs per
token around the ~32 µs signature (validating headers, json.dumps, looking up and
preparing the algorithm and key); the tokens are the same format, and PyJWT verifies them.

An Ed25519 signature is made by libsodium (PyNaCl) rather than OpenSSL: the same signature
(Ed25519 is deterministic, RFC 8032 §5.1.6) in 29 µs instead of 63 on the benchmark machine
(OpenSSL 3 sets up an EVP context for every signature), the largest single cost of a
forwarded call.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from nacl.signing import SigningKey

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
        # Sorted and compact, as PyJWT writes it: the same bytes for every token.
        header = {"alg": self.algorithm, "kid": self.kid, "typ": "JWT"}
        self._header = _segment(orjson.dumps(header, option=orjson.OPT_SORT_KEYS)) + b"."
        self._signature = _signature_of(key)

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
            "chain": principal.chain,  # a tuple: orjson writes it as the array it is
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
        signing_input = self._header + _segment(orjson.dumps(claims))
        return (signing_input + b"." + _segment(self._signature(signing_input))).decode("ascii")


def _segment(data: bytes) -> bytes:
    """base64url without padding (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _signature_of(key: ContextKey) -> Callable[[bytes], bytes]:
    """The JWS signature function of `key` (RFC 8037 §3.1 EdDSA, RFC 7518 §3.4 ES256)."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        seed = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        signing_key = SigningKey(seed)

        def eddsa(data: bytes) -> bytes:
            return signing_key.sign(data).signature

        return eddsa
    ecdsa = ec.ECDSA(hashes.SHA256())

    def es256(data: bytes) -> bytes:
        # RFC 7518 §3.4: R and S as 32-byte big-endian integers, concatenated (not the DER
        # sequence cryptography returns).
        r, s = decode_dss_signature(key.sign(data, ecdsa))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    return es256


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
