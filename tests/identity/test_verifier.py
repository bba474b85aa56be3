"""TokenVerifier with keys from files and secrets: no network."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest

from agentproxy.config.model import Identity, Issuer
from agentproxy.errors import Unauthenticated
from agentproxy.identity.verifier import TokenVerifier

from .conftest import (
    AUDIENCE,
    EC_ISSUER,
    ED_ISSUER,
    FILE_ISSUER,
    FILE_KID,
    HS_ISSUER,
    HS_SECRET,
    NOW,
    RSA_ISSUER,
    Keys,
    b64url,
    claims,
    public_pem,
    sign,
    unsigned,
    write,
)


@pytest.fixture
async def verifier(file_identity: Identity) -> TokenVerifier:
    verifier = TokenVerifier(file_identity)
    await verifier.start()
    return verifier


async def refusal(verifier: TokenVerifier, token: str, now: float = NOW) -> str:
    with pytest.raises(Unauthenticated) as caught:
        await verifier.verify(token, now)
    assert caught.value.status == 401
    if token:
        assert token not in caught.value.detail
    return caught.value.detail


async def test_an_rs256_token_gives_its_principal(verifier: TokenVerifier, keys: Keys) -> None:
    payload = claims(roles=["reader", "writer"], task="TASK-7", tenant={"id": "t1"})
    principal = await verifier.verify(sign(payload, keys.rsa, "RS256"), NOW)
    assert principal.agent == "agent-1"
    assert principal.acting_for is None
    assert principal.chain == ()
    assert principal.roles == frozenset({"reader", "writer"})
    assert principal.task == "TASK-7"
    assert principal.issuer == RSA_ISSUER
    assert principal.token_id == "token-1"
    assert principal.expires_at == NOW + 600
    assert principal.claims == payload


@pytest.mark.parametrize(
    ("issuer", "algorithm", "key_name"),
    [(EC_ISSUER, "ES256", "ec"), (ED_ISSUER, "EdDSA", "ed")],
)
async def test_es256_and_eddsa_tokens_verify(
    verifier: TokenVerifier, keys: Keys, issuer: str, algorithm: str, key_name: str
) -> None:
    token = sign(claims(issuer, sub="agent-2"), getattr(keys, key_name), algorithm)
    principal = await verifier.verify(token, NOW)
    assert (principal.agent, principal.issuer) == ("agent-2", issuer)


async def test_any_configured_audience_is_accepted(verifier: TokenVerifier, keys: Keys) -> None:
    token = sign(claims(ED_ISSUER, aud=["other-audience"]), keys.ed, "EdDSA")
    assert (await verifier.verify(token, NOW)).issuer == ED_ISSUER


async def test_an_hs256_token_verifies_with_the_issuer_secret(verifier: TokenVerifier) -> None:
    principal = await verifier.verify(sign(claims(HS_ISSUER), HS_SECRET, "HS256"), NOW)
    assert principal.issuer == HS_ISSUER
    wrong = sign(claims(HS_ISSUER), b"another-secret-of-at-least-32-bytes!!", "HS256")
    assert await refusal(verifier, wrong) == "signature does not verify"


async def test_a_token_on_behalf_of_a_user_names_the_actor_chain(
    verifier: TokenVerifier, keys: Keys
) -> None:
    act = {"sub": "agent-c", "act": {"sub": "agent-b", "act": {"sub": "agent-a"}}}
    principal = await verifier.verify(sign(claims(sub="alice", act=act), keys.rsa, "RS256"), NOW)
    assert principal.agent == "agent-c"
    assert principal.acting_for == "alice"
    assert principal.chain == ("agent-a", "agent-b")


async def test_roles_may_be_a_space_separated_string(verifier: TokenVerifier, keys: Keys) -> None:
    token = sign(claims(roles="read:hr write:hr"), keys.rsa, "RS256")
    assert (await verifier.verify(token, NOW)).roles == frozenset({"read:hr", "write:hr"})


@pytest.mark.parametrize("signature", [b"", b"not-a-signature"])
async def test_alg_none_is_refused(verifier: TokenVerifier, signature: bytes) -> None:
    token = unsigned({"alg": "none", "typ": "JWT"}, claims(), signature)
    detail = await refusal(verifier, token)
    if signature:
        assert detail == "algorithm not allowed for this issuer"
    else:
        assert detail == "token is not a JWT (three base64url segments)"


async def test_hs256_signed_with_the_rsa_public_key_is_refused(
    verifier: TokenVerifier, keys: Keys
) -> None:
    # The key-confusion attack: a verifier that takes `alg` from the token would check this
    # HMAC with the issuer's public key, which anyone can download.
    header = b64url(orjson.dumps({"alg": "HS256", "typ": "JWT"}))
    payload = b64url(orjson.dumps(claims(sub="admin")))
    signing_input = f"{header}.{payload}".encode()
    mac = hmac.new(public_pem(keys.rsa), signing_input, hashlib.sha256).digest()
    token = f"{header}.{payload}.{b64url(mac)}"
    assert await refusal(verifier, token) == "algorithm not allowed for this issuer"


async def test_a_token_signed_by_another_key_is_refused(
    verifier: TokenVerifier, keys: Keys
) -> None:
    token = sign(claims(), keys.rsa_other, "RS256")
    assert await refusal(verifier, token) == "signature does not verify"


async def test_an_algorithm_the_issuer_does_not_allow_is_refused(
    verifier: TokenVerifier, keys: Keys
) -> None:
    token = sign(claims(), keys.rsa, "RS512")
    assert await refusal(verifier, token) == "algorithm not allowed for this issuer"


@pytest.mark.parametrize("exp", [int(NOW), int(NOW) - 1])
async def test_an_expired_token_is_refused(verifier: TokenVerifier, keys: Keys, exp: int) -> None:
    token = sign(claims(exp=exp), keys.rsa, "RS256")
    assert await refusal(verifier, token) == "token expired"


@pytest.mark.parametrize("claim", ["nbf", "iat"])
async def test_a_token_not_yet_valid_is_refused(
    verifier: TokenVerifier, keys: Keys, claim: str
) -> None:
    payload = claims()
    payload[claim] = int(NOW) + 60
    token = sign(payload, keys.rsa, "RS256")
    assert await refusal(verifier, token) == "token not yet valid"
    assert (await verifier.verify(token, NOW + 60)).agent == "agent-1"


async def test_leeway_allows_clock_skew(file_identity: Identity, keys: Keys) -> None:
    issuers = tuple(
        replace(issuer, leeway=30.0) if issuer.issuer == RSA_ISSUER else issuer
        for issuer in file_identity.issuers
    )
    verifier = TokenVerifier(replace(file_identity, issuers=issuers))
    await verifier.start()
    late = sign(claims(exp=int(NOW) - 20), keys.rsa, "RS256")
    early = sign(claims(nbf=int(NOW) + 20), keys.rsa, "RS256")
    assert (await verifier.verify(late, NOW)).agent == "agent-1"
    assert (await verifier.verify(early, NOW)).agent == "agent-1"
    # A cached token keeps the same leeway, so caching never changes an answer.
    assert (await verifier.verify(late, NOW + 9)).agent == "agent-1"
    assert await refusal(verifier, late, NOW + 10) == "token expired"


@pytest.mark.parametrize(
    ("exp", "detail"),
    [
        ("1800000600", "claim 'exp' is not a NumericDate"),
        (True, "claim 'exp' is not a NumericDate"),
        (None, "token has no 'exp' claim"),
    ],
)
async def test_an_exp_that_is_not_a_number_is_refused(
    verifier: TokenVerifier, exp: Any, detail: str
) -> None:
    token = sign(claims(HS_ISSUER, exp=exp), HS_SECRET, "HS256")
    assert await refusal(verifier, token) == detail


async def test_an_exp_beyond_a_double_is_refused(verifier: TokenVerifier) -> None:
    # Python's json reads 1e400 as infinity: a token that would never expire.
    body = orjson.dumps(claims(HS_ISSUER, exp=0)).replace(b'"exp":0', b'"exp":1e400')
    signing_input = f"{b64url(orjson.dumps({'alg': 'HS256'}))}.{b64url(body)}"
    mac = hmac.new(HS_SECRET, signing_input.encode(), hashlib.sha256).digest()
    token = f"{signing_input}.{b64url(mac)}"
    assert await refusal(verifier, token) == "malformed token"


async def test_an_unknown_issuer_is_refused(verifier: TokenVerifier, keys: Keys) -> None:
    token = sign(claims("https://evil.test"), keys.rsa, "RS256")
    assert await refusal(verifier, token) == "token issuer is not trusted"


async def test_a_wrong_audience_is_refused(verifier: TokenVerifier, keys: Keys) -> None:
    token = sign(claims(aud="another-service"), keys.rsa, "RS256")
    assert await refusal(verifier, token) == "wrong audience"


@pytest.mark.parametrize("claim", ["exp", "aud", "sub"])
async def test_a_missing_required_claim_is_refused(
    verifier: TokenVerifier, keys: Keys, claim: str
) -> None:
    token = sign(claims(without=(claim,)), keys.rsa, "RS256")
    assert await refusal(verifier, token) == f"token has no {claim!r} claim"


async def test_a_token_without_iss_is_refused(verifier: TokenVerifier, keys: Keys) -> None:
    token = sign(claims(without=("iss",)), keys.rsa, "RS256")
    assert await refusal(verifier, token) == "token has no 'iss' claim"


NOT_A_JWT = "token is not a JWT (three base64url segments)"


@pytest.mark.parametrize(
    ("token", "detail"),
    [
        ("", NOT_A_JWT),
        ("abc", NOT_A_JWT),
        ("a.b", NOT_A_JWT),
        ("a.b.c.d", NOT_A_JWT),
        ("####.$$$$.%%%%", NOT_A_JWT),
        ("eyJhbGciOiJSUzI1NiJ9.e30=.c2ln", NOT_A_JWT),  # padding (RFC 7515 §2)
        ("ëyJ.eyJ.c2ln", NOT_A_JWT),
        ("eyJhbGciOiJSUzI1NiJ9.e30.c2ln\n", NOT_A_JWT),
        ("a.b.c", "malformed token"),
        ("eyJhbGciOiJSUzI1NiJ9.bm90IGpzb24.c2ln", "malformed token"),  # payload "not json"
        ("bm90IGpzb24.e30.c2ln", "malformed token"),  # header "not json"
        ("WyJhbGciXQ.e30.c2ln", "malformed token"),  # header ["alg"]
        ("eyJhbGciOiJSUzI1NiJ9.e30.c2ln", "token has no 'iss' claim"),
    ],
)
async def test_garbage_is_refused(verifier: TokenVerifier, token: str, detail: str) -> None:
    assert await refusal(verifier, token) == detail


async def test_an_oversized_token_is_refused(verifier: TokenVerifier, keys: Keys) -> None:
    token = sign(claims(padding="x" * 9000), keys.rsa, "RS256")
    assert await refusal(verifier, token) == "token too large"


@pytest.mark.parametrize("subject", ["agent\n1", "agent\x1b[31m", "agent\x00"])
async def test_a_subject_with_control_characters_is_refused(
    verifier: TokenVerifier, keys: Keys, subject: str
) -> None:
    token = sign(claims(sub=subject), keys.rsa, "RS256")
    assert "control characters" in await refusal(verifier, token)


async def test_a_verified_token_is_cached_until_it_expires(
    verifier: TokenVerifier, keys: Keys
) -> None:
    token = sign(claims(), keys.rsa, "RS256")
    first = await verifier.verify(token, NOW)
    assert await verifier.verify(token, NOW + 599) is first
    assert await refusal(verifier, token, NOW + 600) == "token expired"


async def test_the_cache_is_bounded(file_identity: Identity, keys: Keys) -> None:
    verifier = TokenVerifier(file_identity, cache_size=2)
    await verifier.start()
    tokens = [sign(claims(jti=f"t-{n}"), keys.rsa, "RS256") for n in range(3)]
    principals = [await verifier.verify(token, NOW) for token in tokens]
    assert await verifier.verify(tokens[2], NOW) is principals[2]
    again = await verifier.verify(tokens[0], NOW)
    assert again == principals[0] and again is not principals[0]


async def test_a_jwks_file_key_is_chosen_by_kid(verifier: TokenVerifier, keys: Keys) -> None:
    with_kid = sign(claims(FILE_ISSUER), keys.rsa, "RS256", kid=FILE_KID)
    without_kid = sign(claims(FILE_ISSUER, jti="t-2"), keys.rsa, "RS256")
    unknown = sign(claims(FILE_ISSUER), keys.rsa, "RS256", kid="other")
    assert (await verifier.verify(with_kid, NOW)).issuer == FILE_ISSUER
    assert (await verifier.verify(without_kid, NOW)).issuer == FILE_ISSUER
    assert await refusal(verifier, unknown) == "unknown signing key (kid)"


async def test_verify_before_start_trusts_no_issuer(file_identity: Identity, keys: Keys) -> None:
    verifier = TokenVerifier(file_identity)
    token = sign(claims(), keys.rsa, "RS256")
    assert await refusal(verifier, token) == "token issuer is not trusted"


@pytest.mark.parametrize(
    "algorithms",
    [("RS256", "HS256"), ("none",), ()],
)
async def test_start_refuses_algorithms_that_do_not_fit_the_key(
    tmp_path: Path, keys: Keys, algorithms: tuple[str, ...]
) -> None:
    pem = write(tmp_path / "rsa.pem", public_pem(keys.rsa))
    issuer = Issuer(RSA_ISSUER, (AUDIENCE,), algorithms, public_key_file=pem)
    with pytest.raises(ValueError, match="do not fit its key"):
        await TokenVerifier(Identity(issuers=(issuer,))).start()


@pytest.mark.parametrize(
    ("field", "content"),
    [
        ("public_key_file", None),
        ("public_key_file", b"not a pem"),
        ("jwks_file", b"{not json"),
        ("jwks_file", b'{"keys": []}'),
        ("jwks_file", b'{"keys": [{"kty": "RSA", "use": "enc", "n": "x", "e": "AQAB"}]}'),
    ],
)
async def test_start_names_an_unusable_key_file(
    tmp_path: Path, field: str, content: bytes | None
) -> None:
    path = tmp_path / "key-file"
    if content is not None:
        path.write_bytes(content)
    issuer = Issuer(RSA_ISSUER, (AUDIENCE,), ("RS256",))
    if field == "public_key_file":
        issuer = replace(issuer, public_key_file=path)
    else:
        issuer = replace(issuer, jwks_file=path)
    with pytest.raises(ValueError, match=str(path)):
        await TokenVerifier(Identity(issuers=(issuer,))).start()
