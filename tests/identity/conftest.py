"""Keys, token builders and a real JWKS server for the identity tests."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from agentproxy.config.model import Identity, Issuer, Secret
from agentproxy.identity.keys import PrivateKey, public_jwk

# A fixed clock: every verification in these tests happens at NOW.
NOW = 1_800_000_000.0
AUDIENCE = "agentproxy"
RSA_ISSUER = "https://rsa.idp.test"
EC_ISSUER = "https://ec.idp.test"
ED_ISSUER = "https://ed.idp.test"
HS_ISSUER = "https://hs.idp.test"
FILE_ISSUER = "https://jwks-file.idp.test"
URL_ISSUER = "https://jwks-url.idp.test"
HS_SECRET = b"a-test-secret-of-at-least-32-bytes-long!"
FILE_KID = "file-key-1"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def claims(
    issuer: str = RSA_ISSUER, *, without: tuple[str, ...] = (), **extra: Any
) -> dict[str, Any]:
    """Valid claims for `issuer` at NOW, with `extra` claims set and `without` removed."""
    base: dict[str, Any] = {
        "iss": issuer,
        "aud": AUDIENCE,
        "sub": "agent-1",
        "iat": int(NOW) - 10,
        "exp": int(NOW) + 600,
        "jti": "token-1",
    }
    base.update(extra)
    for name in without:
        del base[name]
    return base


def sign(
    payload: dict[str, Any], key: PrivateKey | bytes, algorithm: str, kid: str | None = None
) -> str:
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(payload, key, algorithm=algorithm, headers=headers)


def unsigned(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    """A compact JWS built by hand, for tokens PyJWT refuses to produce."""
    return ".".join(
        (b64url(orjson.dumps(header)), b64url(orjson.dumps(payload)), b64url(signature))
    )


def public_pem(key: PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def private_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def jwk(key: PrivateKey, kid: str, alg: str) -> dict[str, Any]:
    return {**public_jwk(key.public_key()), "kid": kid, "alg": alg, "use": "sig"}


@dataclass(frozen=True)
class Keys:
    rsa: RSAPrivateKey
    rsa_other: RSAPrivateKey
    ec: EllipticCurvePrivateKey
    ed: Ed25519PrivateKey


@pytest.fixture(scope="session")
def keys() -> Keys:
    return Keys(
        rsa=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        rsa_other=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ec=ec.generate_private_key(ec.SECP256R1()),
        ed=ed25519.Ed25519PrivateKey.generate(),
    )


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.fixture
def file_identity(keys: Keys, tmp_path: Path) -> Identity:
    """One issuer per key source that needs no network."""
    jwks = {"keys": [jwk(keys.rsa, FILE_KID, "RS256")]}
    return Identity(
        issuers=(
            Issuer(
                RSA_ISSUER,
                (AUDIENCE,),
                ("RS256",),
                public_key_file=write(tmp_path / "rsa.pem", public_pem(keys.rsa)),
            ),
            Issuer(
                EC_ISSUER,
                (AUDIENCE,),
                ("ES256",),
                public_key_file=write(tmp_path / "ec.pem", public_pem(keys.ec)),
            ),
            Issuer(
                ED_ISSUER,
                (AUDIENCE, "other-audience"),
                ("EdDSA",),
                public_key_file=write(tmp_path / "ed.pem", public_pem(keys.ed)),
            ),
            Issuer(HS_ISSUER, (AUDIENCE,), ("HS256",), hs256_secret=Secret(HS_SECRET, "test")),
            Issuer(
                FILE_ISSUER,
                (AUDIENCE,),
                ("RS256",),
                jwks_file=write(tmp_path / "jwks.json", orjson.dumps(jwks)),
            ),
        )
    )


@dataclass
class JwksServer:
    """A real HTTP server publishing `keys` as a JWKS and counting the requests it answers."""

    keys: list[dict[str, Any]]
    requests: int = 0
    status: int = 200
    body: bytes | None = None  # served instead of the JWKS when set
    url: str = ""
    runner: web.AppRunner | None = None

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@pytest.fixture
async def jwks_server(keys: Keys) -> AsyncIterator[JwksServer]:
    server = JwksServer(keys=[jwk(keys.rsa, "key-1", "RS256")])

    async def publish(request: web.Request) -> web.Response:
        server.requests += 1
        body = server.body if server.body is not None else orjson.dumps({"keys": server.keys})
        return web.Response(body=body, status=server.status, content_type="application/json")

    app = web.Application()
    app.router.add_get("/jwks.json", publish)
    server.runner = web.AppRunner(app)
    await server.runner.setup()
    await web.TCPSite(server.runner, "127.0.0.1", 0).start()
    host, port = server.runner.addresses[0][:2]
    server.url = f"http://{host}:{port}/jwks.json"
    yield server
    await server.stop()


def url_identity(url: str) -> Identity:
    return Identity(issuers=(Issuer(URL_ISSUER, (AUDIENCE,), ("RS256",), jwks_url=url),))
