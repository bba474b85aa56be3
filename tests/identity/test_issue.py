"""mint_token and generate_demo_keypair round-trip through TokenVerifier."""

from __future__ import annotations

import stat
from pathlib import Path

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from agentproxy.config.model import Identity, Issuer, Secret
from agentproxy.errors import Unauthenticated
from agentproxy.identity.issue import generate_demo_keypair, mint_token
from agentproxy.identity.keys import PrivateKey, public_jwk, thumbprint
from agentproxy.identity.verifier import TokenVerifier

from .conftest import AUDIENCE, NOW, Keys, private_pem, public_pem, write

ISSUER = "https://demo.idp.test"


async def verifier_for(issuer: Issuer) -> TokenVerifier:
    verifier = TokenVerifier(Identity(issuers=(issuer,)))
    await verifier.start()
    return verifier


@pytest.mark.parametrize(
    ("key_name", "algorithm"), [("rsa", "RS256"), ("ec", "ES256"), ("ed", "EdDSA")]
)
async def test_a_minted_token_verifies(
    tmp_path: Path, keys: Keys, key_name: str, algorithm: str
) -> None:
    key: PrivateKey = getattr(keys, key_name)
    token = mint_token(
        key_file=write(tmp_path / "private.pem", private_pem(key)),
        issuer=ISSUER,
        audience=AUDIENCE,
        subject="alice",
        actors=("agent-c", "agent-b", "agent-a"),
        roles=("reader", "writer"),
        ttl=300,
        claims={"task": "TASK-9"},
        now=NOW,
    )
    header = jwt.get_unverified_header(token)
    assert header["alg"] == algorithm
    assert header["kid"] == thumbprint(public_jwk(key.public_key()))
    public = write(tmp_path / "public.pem", public_pem(key))
    verifier = await verifier_for(Issuer(ISSUER, (AUDIENCE,), (algorithm,), public_key_file=public))
    principal = await verifier.verify(token, NOW)
    assert principal.agent == "agent-c"
    assert principal.acting_for == "alice"
    assert principal.chain == ("agent-a", "agent-b")
    assert principal.roles == frozenset({"reader", "writer"})
    assert principal.task == "TASK-9"
    assert principal.expires_at == NOW + 300
    with pytest.raises(Unauthenticated, match="token expired"):
        await verifier.verify(token, NOW + 300)


async def test_the_kid_matches_a_jwks_keyed_by_thumbprint(tmp_path: Path, keys: Keys) -> None:
    jwk = public_jwk(keys.ed.public_key())
    jwks = write(tmp_path / "jwks.json", orjson.dumps({"keys": [{**jwk, "kid": thumbprint(jwk)}]}))
    other = public_jwk(keys.ec.public_key())
    jwks.write_bytes(
        orjson.dumps(
            {"keys": [{**jwk, "kid": thumbprint(jwk)}, {**other, "kid": thumbprint(other)}]}
        )
    )
    key_file = write(tmp_path / "ed.pem", private_pem(keys.ed))
    token = mint_token(key_file=key_file, issuer=ISSUER, audience=AUDIENCE, subject="a", now=NOW)
    verifier = await verifier_for(Issuer(ISSUER, (AUDIENCE,), ("EdDSA",), jwks_file=jwks))
    assert (await verifier.verify(token, NOW)).agent == "a"


async def test_a_file_that_is_not_pem_is_an_hs256_secret(tmp_path: Path) -> None:
    # The config loader drops the trailing newline `echo` leaves; so does mint_token.
    key_file = write(tmp_path / "secret", b"a-demo-secret-that-is-32-bytes-long!\n")
    token = mint_token(key_file=key_file, issuer=ISSUER, audience=AUDIENCE, subject="bot", now=NOW)
    assert jwt.get_unverified_header(token) == {"alg": "HS256", "typ": "JWT"}
    secret = Secret(b"a-demo-secret-that-is-32-bytes-long!", str(key_file))
    verifier = await verifier_for(Issuer(ISSUER, (AUDIENCE,), ("HS256",), hs256_secret=secret))
    principal = await verifier.verify(token, NOW)
    assert (principal.agent, principal.acting_for, principal.roles) == ("bot", None, frozenset())


def test_claims_may_not_override_what_the_arguments_set(tmp_path: Path, keys: Keys) -> None:
    key_file = write(tmp_path / "ed.pem", private_pem(keys.ed))
    with pytest.raises(ValueError, match="claims may not set exp, sub"):
        mint_token(
            key_file=key_file,
            issuer=ISSUER,
            audience=AUDIENCE,
            subject="a",
            claims={"sub": "admin", "exp": 9_999_999_999},
            now=NOW,
        )


def test_an_algorithm_that_does_not_fit_the_key_is_refused(tmp_path: Path, keys: Keys) -> None:
    key_file = write(tmp_path / "ed.pem", private_pem(keys.ed))
    with pytest.raises(ValueError, match="cannot sign RS256 with this key"):
        mint_token(
            key_file=key_file,
            issuer=ISSUER,
            audience=AUDIENCE,
            subject="a",
            algorithm="RS256",
            now=NOW,
        )


async def test_the_demo_keypair_is_private_and_usable(tmp_path: Path) -> None:
    private_path, public_path = tmp_path / "demo.key", tmp_path / "demo.pub"
    private_path.write_bytes(b"an older, world-readable file")
    private_path.chmod(0o644)
    generate_demo_keypair(private_path, public_path)
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    private = private_path.read_bytes()
    assert private.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS #8
    assert public_path.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    key = load_pem_private_key(private, password=None)
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
    token = mint_token(
        key_file=private_path, issuer=ISSUER, audience=AUDIENCE, subject="a", now=NOW
    )
    verifier = await verifier_for(
        Issuer(ISSUER, (AUDIENCE,), ("RS256",), public_key_file=public_path)
    )
    assert (await verifier.verify(token, NOW)).agent == "a"
