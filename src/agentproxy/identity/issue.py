"""Mint test and demo tokens (`agentproxy token`) and make a demo key pair.

Real deployments get tokens from their identity provider; these exist so that a demo or a
test can run without one.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from agentproxy.identity.keys import (
    PrivateKey,
    load_private_key,
    public_jwk,
    signing_algorithm,
    thumbprint,
)

# Claims the other arguments set; `claims` may not override them.
RESERVED_CLAIMS = frozenset({"iss", "aud", "sub", "iat", "nbf", "exp", "jti", "act", "roles"})


def mint_token(
    *,
    key_file: Path,
    issuer: str,
    audience: str,
    subject: str,
    actors: Sequence[str] = (),
    roles: Sequence[str] = (),
    ttl: float = 900,
    claims: Mapping[str, Any] | None = None,
    algorithm: str | None = None,
    now: float,
) -> str:
    """A signed JWT for `subject`, valid from `now` for `ttl` seconds.

    `key_file` holds a PEM private key (RSA signs RS256, EC ES256/384/512, Ed25519 EdDSA;
    the header's `kid` is the RFC 7638 thumbprint of its public key) or else an HMAC secret
    (HS256; trailing newlines are not part of it, as in the config loader). With `actors`
    the token is a delegation (RFC 8693 §4.1): `subject` is the user, `actors[0]` the agent
    acting now and later entries earlier actors.

    Raises OSError if `key_file` cannot be read, and ValueError for a PEM file that holds no
    usable key, an empty secret, `claims` that override the claims set here, or an
    algorithm that does not fit the key.
    """
    extra = dict(claims or {})
    if overridden := sorted(RESERVED_CLAIMS & extra.keys()):
        raise ValueError(f"claims may not set {', '.join(overridden)}")
    data = key_file.read_bytes()
    headers: dict[str, Any] = {}
    signing_key: PrivateKey | bytes
    if b"-----BEGIN" in data:
        private_key = load_private_key(data, key_file)
        signing_key = private_key
        default_algorithm = signing_algorithm(private_key)
        headers["kid"] = thumbprint(public_jwk(private_key.public_key()))
    else:
        signing_key = data.rstrip(b"\r\n")
        if not signing_key:
            raise ValueError(f"{key_file}: the HMAC secret is empty")
        default_algorithm = "HS256"
    issued_at = int(now)
    payload: dict[str, Any] = {
        **extra,
        "iss": issuer,
        "aud": audience,
        "sub": subject,
        "iat": issued_at,
        "nbf": issued_at,
        "exp": int(now + ttl),
        "jti": secrets.token_urlsafe(16),
    }
    if roles:
        payload["roles"] = list(roles)
    act: dict[str, Any] | None = None
    for actor in reversed(actors):
        act = {"sub": actor} if act is None else {"sub": actor, "act": act}
    if act is not None:
        payload["act"] = act
    algorithm = algorithm or default_algorithm
    try:
        return jwt.encode(payload, signing_key, algorithm=algorithm, headers=headers)
    except (jwt.PyJWTError, NotImplementedError, TypeError, ValueError) as exc:
        raise ValueError(f"{key_file}: cannot sign {algorithm} with this key: {exc}") from exc


def generate_demo_keypair(private_path: Path, public_path: Path) -> None:
    """Write a new RSA-2048 private key (PKCS #8 PEM, mode 0600) and its public key PEM.

    An existing private key file is overwritten. Raises OSError if a file cannot be written.
    """
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        # O_CREAT's mode does not apply to a file that already exists.
        os.fchmod(file.fileno(), 0o600)
        file.write(private_pem)
    public_path.write_bytes(public_pem)


# What `agentproxy keys generate DIR` writes: file name → what it is for (the config key).
DEPLOYMENT_KEYS = {
    "context-signing.pem": "context_token.signing_key_file (Ed25519: signs the forwarded context)",
    "audit-signing.pem": "audit.signing_key_file (Ed25519: signs audit checkpoints)",
    "audit-signing.pub.pem": "audit verify --key (the checkpoints' public key)",
    "audit-hmac": "audit.hmac_key_file (32 random bytes: HMACs redacted values)",
}


def generate_deployment_keys(directory: Path) -> list[Path]:
    """Writes the keys a deployment needs into `directory` (created 0700 if absent; private
    files 0600), and returns their paths.

    Raises FileExistsError naming a file that already exists (keys are never overwritten: a
    replaced audit key would make every earlier checkpoint unverifiable), OSError otherwise.
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    paths = [directory / name for name in DEPLOYMENT_KEYS]
    for path in paths:
        if path.exists():
            raise FileExistsError(f"{path} exists: keys are never overwritten")
    pem = serialization.Encoding.PEM
    private = serialization.PrivateFormat.PKCS8
    none = serialization.NoEncryption()
    context = ed25519.Ed25519PrivateKey.generate()
    audit = ed25519.Ed25519PrivateKey.generate()
    _write_private(paths[0], context.private_bytes(pem, private, none))
    _write_private(paths[1], audit.private_bytes(pem, private, none))
    paths[2].write_bytes(
        audit.public_key().public_bytes(pem, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    _write_private(paths[3], secrets.token_hex(32).encode() + b"\n")
    return paths


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
