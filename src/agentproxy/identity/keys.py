"""Signing keys: loading PEM private keys, their public JWKs and RFC 7638 thumbprints."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import orjson
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from jwt.utils import base64url_encode

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey

# RFC 7518 §3.4: each ECDSA algorithm is bound to one curve.
_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}

# RFC 7638 §3.2 (RSA, EC) and RFC 8037 §2 (OKP): the members a thumbprint hashes.
_REQUIRED_MEMBERS = {
    "RSA": ("e", "kty", "n"),
    "EC": ("crv", "kty", "x", "y"),
    "OKP": ("crv", "kty", "x"),
}


def load_private_key(data: bytes, source: Path) -> PrivateKey:
    """Parse an unencrypted PEM RSA, EC or Ed25519 private key.

    Raises ValueError naming `source` if `data` is not one.
    """
    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        # TypeError: the key is encrypted; we have no passphrase to give.
        raise ValueError(f"{source}: not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, PrivateKey):
        raise ValueError(f"{source}: {type(key).__name__} cannot sign JWTs (use Ed25519, EC, RSA)")
    return key


def signing_algorithm(key: PrivateKey) -> str:
    """The JWS algorithm (RFC 7518 §3.1, RFC 8037 §3.1) a key signs with.

    Raises ValueError for an EC curve that JWS does not define.
    """
    if isinstance(key, rsa.RSAPrivateKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        try:
            return _EC_ALGORITHMS[key.curve.name]
        except KeyError:
            raise ValueError(f"EC curve {key.curve.name} has no JWS algorithm") from None
    return "EdDSA"


def public_jwk(key: PublicKey) -> dict[str, Any]:
    """The public JWK (RFC 7517) of `key`, without `kid`, `alg` or `use`."""
    if isinstance(key, rsa.RSAPublicKey):
        return RSAAlgorithm.to_jwk(key, as_dict=True)
    if isinstance(key, ec.EllipticCurvePublicKey):
        return ECAlgorithm.to_jwk(key, as_dict=True)
    return OKPAlgorithm.to_jwk(key, as_dict=True)


def thumbprint(jwk: dict[str, Any]) -> str:
    """The RFC 7638 SHA-256 thumbprint of a public JWK, base64url without padding.

    Raises KeyError if `jwk` lacks a member its key type requires.
    """
    members = {name: jwk[name] for name in _REQUIRED_MEMBERS[jwk["kty"]]}
    # RFC 7638 §3.3: members in lexicographic order, no whitespace, UTF-8.
    canonical = orjson.dumps(members, option=orjson.OPT_SORT_KEYS)
    return base64url_encode(hashlib.sha256(canonical).digest()).decode("ascii")
