"""ContextSigner: tokens an upstream verifies with our JWKS, one per call, and key files."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from jwt.utils import base64url_decode

from agentproxy.config.model import ContextToken
from agentproxy.core import Principal
from agentproxy.identity.context import ContextSigner

from .conftest import Keys, private_pem, write

SETTINGS = ContextToken(ttl=60.0, audience="tools")
PRINCIPAL = Principal(
    agent="agent-b", acting_for="alice", chain=("agent-a",), roles=frozenset({"r"})
)

# RFC 8037 Appendix A.1 (the Ed25519 private key) and A.3 (its RFC 7638 thumbprint).
RFC8037_D = "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A"
RFC8037_THUMBPRINT = "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


CALL: dict[str, Any] = {"decision_id": "d-1", "action": "http:GET /v1/employees/42"}


def verify_with_jwks(signer: ContextSigner, token: str) -> dict[str, Any]:
    """Verify as an upstream would, with the key the published JWKS has for its `kid`.

    The lifetime is not checked: these tokens are signed at a made-up `now`.
    """
    published = {key["kid"]: key for key in signer.jwks()["keys"]}
    key = jwt.PyJWK(published[jwt.get_unverified_header(token)["kid"]])
    return jwt.decode(
        token,
        key,
        algorithms=[key.algorithm_name],
        audience="tools",
        issuer="agentproxy",
        options={"verify_exp": False, "verify_nbf": False, "verify_iat": False},
    )


def test_a_context_token_verifies_with_the_published_jwks() -> None:
    signer = ContextSigner.load(SETTINGS)
    now = time.time()
    token = signer.sign(
        principal=PRINCIPAL,
        task="TASK-1",
        rule="allow-reads",
        upstream="hr",
        now=now,
        decision_id="d-1",
        action="http:GET /v1/employees/42",
        method="GET",
        path="/v1/employees/42",
        approval="a-9",
    )
    # Full verification, exp and nbf included, against the real clock.
    published = signer.jwks()["keys"][0]
    assert published["use"] == "sig" and published["alg"] == "EdDSA" and "d" not in published
    claims = jwt.decode(
        token, jwt.PyJWK(published), algorithms=["EdDSA"], audience="tools", issuer="agentproxy"
    )
    assert claims["sub"] == claims["agent"] == "agent-b"
    assert claims["user"] == "alice"
    assert claims["chain"] == ["agent-a"]
    assert claims["task"] == "TASK-1"
    assert claims["rule"] == "allow-reads"
    assert claims["upstream"] == "hr"
    assert claims["iat"] == claims["nbf"] == int(now)
    assert claims["exp"] == int(now + 60)
    assert claims["jti"] == claims["decision_id"] == "d-1"
    assert claims["action"] == "http:GET /v1/employees/42"
    assert (claims["htm"], claims["htu"]) == ("GET", "/v1/employees/42")
    assert claims["approval"] == "a-9"
    assert jwt.get_unverified_header(token)["kid"] == signer.kid


def test_absent_user_task_and_rule_are_omitted() -> None:
    signer = ContextSigner.load(SETTINGS)
    token = signer.sign(
        principal=Principal(agent="agent-a"),
        task=None,
        rule=None,
        upstream="hr",
        now=1000.0,
        **CALL,
    )
    claims = verify_with_jwks(signer, token)
    assert "user" not in claims and "task" not in claims and "rule" not in claims
    assert "htm" not in claims and "htu" not in claims and "approval" not in claims
    assert claims["chain"] == []


def test_every_call_gets_its_own_token() -> None:
    """A token is never reused: each names its own call (`jti` = decision id), so a tool can
    refuse a replay, and a token captured for one call is useless for another."""
    signer = ContextSigner.load(SETTINGS)

    def sign(decision_id: str, path: str = "/v1/employees/42") -> dict[str, Any]:
        token = signer.sign(
            principal=PRINCIPAL,
            task="TASK-1",
            rule="r1",
            upstream="hr",
            now=1000.0,
            decision_id=decision_id,
            action=f"http:GET {path}",
            method="GET",
            path=path,
        )
        return verify_with_jwks(signer, token)

    first, second = sign("d-1"), sign("d-2")
    assert first["jti"] == "d-1" and second["jti"] == "d-2"
    assert sign("d-3", "/v1/employees/7")["htu"] == "/v1/employees/7"


def test_an_ed25519_key_file_gives_the_same_kid_on_every_load(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.from_private_bytes(base64url_decode(RFC8037_D))
    settings = ContextToken(signing_key_file=write(tmp_path / "context.pem", private_pem(key)))
    first, second = ContextSigner.load(settings), ContextSigner.load(settings)
    assert first.kid == second.kid == RFC8037_THUMBPRINT
    token = first.sign(principal=PRINCIPAL, task=None, rule="r", upstream="hr", now=1000.0, **CALL)
    assert verify_with_jwks(second, token)["agent"] == "agent-b"


def test_an_ephemeral_key_differs_per_load() -> None:
    assert ContextSigner.load(SETTINGS).kid != ContextSigner.load(SETTINGS).kid


def test_a_p256_key_file_signs_es256(tmp_path: Path, keys: Keys) -> None:
    settings = ContextToken(signing_key_file=write(tmp_path / "ec.pem", private_pem(keys.ec)))
    signer = ContextSigner.load(settings)
    assert signer.algorithm == "ES256"
    assert signer.jwks()["keys"][0]["crv"] == "P-256"
    token = signer.sign(principal=PRINCIPAL, task=None, rule="r", upstream="hr", now=1000.0, **CALL)
    assert verify_with_jwks(signer, token)["user"] == "alice"


def test_an_rsa_key_file_is_refused(tmp_path: Path, keys: Keys) -> None:
    path = write(tmp_path / "rsa.pem", private_pem(keys.rsa))
    with pytest.raises(ValueError, match=r"RSA keys are refused.*use an Ed25519 key") as caught:
        ContextSigner.load(ContextToken(signing_key_file=path))
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("content", [None, b"not a key", b"-----BEGIN PRIVATE KEY-----\nAAAA\n"])
def test_an_unusable_key_file_is_named(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "context.pem"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=str(path)):
        ContextSigner.load(ContextToken(signing_key_file=path))


def test_a_p384_key_is_refused(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    path = write(tmp_path / "p384.pem", private_pem(key))
    with pytest.raises(ValueError, match="Ed25519 or EC P-256, not ES384"):
        ContextSigner.load(ContextToken(signing_key_file=path))


@pytest.mark.parametrize(
    "key",
    [ed25519.Ed25519PrivateKey.generate(), ec.generate_private_key(ec.SECP256R1())],
    ids=["EdDSA", "ES256"],
)
def test_a_token_is_the_compact_jws_pyjwt_writes(key: ed25519.Ed25519PrivateKey) -> None:
    """The token is written without PyJWT (its header once at load): the same header and
    payload bytes as `jwt.encode` writes for the same claims, and for Ed25519, whose
    signatures are deterministic, the same token."""
    signer = ContextSigner(key, SETTINGS)
    token = signer.sign(
        principal=PRINCIPAL, task="TASK-1", rule="r", upstream="hr", now=1000.0, **CALL
    )
    claims = verify_with_jwks(signer, token)
    expected = jwt.encode(claims, key, algorithm=signer.algorithm, headers={"kid": signer.kid})
    assert token.split(".")[:2] == expected.split(".")[:2]
    if signer.algorithm == "EdDSA":
        assert token == expected
    assert "=" not in token and len(base64url_decode(token.split(".")[2])) == 64


def test_non_ascii_identifiers_travel_as_utf8_json() -> None:
    """orjson writes UTF-8 where PyJWT escaped to \\uXXXX: the same JSON to any parser."""
    signer = ContextSigner.load(SETTINGS)
    token = signer.sign(
        principal=Principal(agent="agent-ü", acting_for="zoë"),
        task=None,
        rule=None,
        upstream="hr",
        now=1000.0,
        **CALL,
    )
    claims = verify_with_jwks(signer, token)
    assert (claims["agent"], claims["user"]) == ("agent-ü", "zoë")


def test_libsodium_signs_exactly_what_openssl_signs() -> None:
    """Ed25519 is deterministic (RFC 8032 §5.1.6): the libsodium signature of a token is the
    one `cryptography` (OpenSSL) makes for the same key and bytes, so the token verifies
    wherever it did before."""
    key = ed25519.Ed25519PrivateKey.generate()
    token = ContextSigner(key, SETTINGS).sign(
        principal=PRINCIPAL, task="t", rule="r", upstream="u", now=1_000_000.0, **CALL
    )
    signing_input, _, signature = token.rpartition(".")
    assert base64url_decode(signature) == key.sign(signing_input.encode())
