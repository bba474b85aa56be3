"""Token attacks: every forged, stale, misdirected or malformed credential is a 401 that never
reaches the upstream, and the token itself never reaches the decision log."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from typing import Any

import aiohttp
import jwt
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from multidict import CIMultiDict

from tests.conftest import AUDIENCE, ISSUER, Keys, Proxy, ProxyFactory, Upstream
from tests.proxy.conftest import (
    CustomProxyFactory,
    b64url,
    bearer,
    captured,
    log_records,
    only_header,
)


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    payload: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "hr-bot",
        "iat": now,
        "exp": now + 300,
    }
    payload.update(overrides)
    return payload


def unsigned(header: dict[str, Any], payload: dict[str, Any], signature: str = "") -> str:
    return ".".join(
        [
            b64url(json.dumps(header).encode()),
            b64url(json.dumps(payload).encode()),
            signature,
        ]
    )


def hs256_with_public_key(keys: Keys) -> str:
    """The RS256/HS256 confusion attack (RFC 8725 §2.1): HMAC keyed with the public PEM."""
    signing_input = ".".join(
        [
            b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()),
            b64url(json.dumps(claims()).encode()),
        ]
    )
    mac = hmac.new(keys.public_pem, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64url(mac)


async def expect_401(
    proxy: Proxy,
    upstream: Upstream,
    headers: dict[str, str] | CIMultiDict[str],
    *,
    challenge: str | None = None,
) -> dict[str, Any]:
    """Sends GET /v1/employees/42 (allowed for a valid hr-bot token) and checks the refusal."""
    async with (
        aiohttp.ClientSession() as s,
        s.get(proxy.base + "/v1/employees/42", headers=headers) as r,
    ):
        assert r.status == 401
        assert r.content_type == "application/problem+json"
        www = r.headers.getall("WWW-Authenticate")
        body = orjson.loads(await r.read())
    assert len(www) == 1
    assert www[0].startswith("Bearer")
    if challenge is not None:
        assert www[0] == challenge
    else:
        assert 'error="invalid_token"' in www[0]
    assert body["status"] == 401
    assert body["type"].endswith("/unauthenticated")
    assert body["decision_id"]
    assert upstream.seen == []
    assert isinstance(body, dict)
    return body


async def test_valid_token_is_the_control(proxy: Proxy, upstream: Upstream, keys: Keys) -> None:
    # The attacks below must fail for their flaw alone: the same request with a good token passes.
    async with (
        aiohttp.ClientSession() as s,
        s.get(proxy.base + "/v1/employees/42", headers=bearer(keys.token())) as r,
    ):
        assert r.status == 200
    assert len(upstream.seen) == 1


async def test_no_token_gets_bare_challenge(proxy: Proxy, upstream: Upstream) -> None:
    await expect_401(proxy, upstream, {}, challenge="Bearer")


async def test_alg_none(proxy: Proxy, upstream: Upstream) -> None:
    for alg in ("none", "None", "NONE"):
        token = unsigned({"alg": alg, "typ": "JWT"}, claims())
        await expect_401(proxy, upstream, bearer(token))
        # Some libraries accept "none" with any signature segment.
        await expect_401(proxy, upstream, bearer(token + b64url(b"sig")))


async def test_hs256_signed_with_rsa_public_key(
    proxy: Proxy, upstream: Upstream, keys: Keys
) -> None:
    await expect_401(proxy, upstream, bearer(hs256_with_public_key(keys)))


async def test_expired(proxy: Proxy, upstream: Upstream, keys: Keys) -> None:
    now = int(time.time())
    await expect_401(proxy, upstream, bearer(keys.token(iat=now - 600, exp=now - 1)))


async def test_not_yet_valid(proxy: Proxy, upstream: Upstream, keys: Keys) -> None:
    await expect_401(proxy, upstream, bearer(keys.token(nbf=int(time.time()) + 600)))


async def test_issued_in_the_future(proxy: Proxy, upstream: Upstream, keys: Keys) -> None:
    await expect_401(proxy, upstream, bearer(keys.token(iat=int(time.time()) + 600)))


async def test_wrong_issuer(proxy: Proxy, upstream: Upstream, keys: Keys) -> None:
    await expect_401(proxy, upstream, bearer(keys.token(iss="https://evil.test")))


async def test_wrong_audience(proxy: Proxy, upstream: Upstream, keys: Keys) -> None:
    await expect_401(proxy, upstream, bearer(keys.token(aud="someone-else")))


@pytest.mark.parametrize("claim", ["exp", "iss", "aud", "sub"])
async def test_missing_required_claim(
    proxy: Proxy, upstream: Upstream, keys: Keys, claim: str
) -> None:
    payload = {k: v for k, v in claims().items() if k != claim}
    token = jwt.encode(payload, keys.private, algorithm="RS256")
    await expect_401(proxy, upstream, bearer(token))


@pytest.mark.parametrize(
    "token",
    [
        "x",
        "a.b.c",
        "a.b.",
        "...",
        base64.b64encode(secrets.token_bytes(3750)).decode(),
        b64url(b'{"alg":"RS256"}') + ".." + b64url(b"x"),
    ],
    ids=["x", "a.b.c", "empty-sig", "dots", "5000-random-b64", "empty-payload"],
)
async def test_garbage(proxy: Proxy, upstream: Upstream, token: str) -> None:
    await expect_401(proxy, upstream, bearer(token))


async def test_signed_by_another_key(proxy: Proxy, upstream: Upstream) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(claims(), other, algorithm="RS256")
    await expect_401(proxy, upstream, bearer(token))
    token = jwt.encode(claims(), other, algorithm="RS256", headers={"kid": "issuer-key"})
    await expect_401(proxy, upstream, bearer(token))


async def test_key_named_by_the_token_is_ignored(proxy: Proxy, upstream: Upstream) -> None:
    # RFC 8725 §3.10: keys come from configuration, never from the token's own `jwk`, `jku`
    # or `x5u` header (the "embedded key" attacks).
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(other.public_key()))
    for header in ({"jwk": jwk}, {"jku": "http://127.0.0.1:1/jwks.json"}, {"x5u": "http://x/c"}):
        token = jwt.encode(claims(), other, algorithm="RS256", headers=header)
        await expect_401(proxy, upstream, bearer(token))


async def test_tampered_payload(proxy: Proxy, upstream: Upstream, keys: Keys) -> None:
    header, _, signature = keys.token().split(".")
    payload = b64url(json.dumps(claims(sub="ops-bot", roles=["ops"])).encode())
    await expect_401(proxy, upstream, bearer(f"{header}.{payload}.{signature}"))


async def test_kid_is_irrelevant_for_a_single_public_key(
    proxy: Proxy, upstream: Upstream, keys: Keys
) -> None:
    # With `public_key_file` the issuer has one key: a `kid` picks nothing, so only the
    # signature decides. The configured key's signature passes whatever kid is claimed ...
    token = jwt.encode(claims(), keys.private, algorithm="RS256", headers={"kid": "random-kid"})
    async with (
        aiohttp.ClientSession() as s,
        s.get(proxy.base + "/v1/employees/42", headers=bearer(token)) as r,
    ):
        assert r.status == 200
    # ... and no kid makes another key's signature acceptable.
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    upstream.seen.clear()
    forged = jwt.encode(claims(), other, algorithm="RS256", headers={"kid": "random-kid"})
    await expect_401(proxy, upstream, bearer(forged))


async def test_unknown_kid_with_jwks_file(
    custom_proxy: CustomProxyFactory, upstream: Upstream, keys: Keys
) -> None:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(keys.private.public_key()))
    jwks = {"keys": [{**jwk, "kid": "k1", "use": "sig", "alg": "RS256"}]}
    proxy = await custom_proxy(
        f"""
listen: {{http: "127.0.0.1:0", admin: "127.0.0.1:0"}}
upstreams:
  - name: tool
    url: "{upstream.url}"
    timeout: 2s
identity:
  issuers:
    - issuer: "{ISSUER}"
      audiences: [{AUDIENCE}]
      jwks_file: jwks.json
      algorithms: [RS256]
policy_files: ["policy.yaml"]
decision_log: "off"
""",
        {
            "jwks.json": json.dumps(jwks).encode(),
            "policy.yaml": b"""
default: deny
rules:
  - {id: all, agents: ["*"], actions: ["http:GET /v1/**"], effect: allow}
""",
        },
    )
    good = jwt.encode(claims(), keys.private, algorithm="RS256", headers={"kid": "k1"})
    async with (
        aiohttp.ClientSession() as s,
        s.get(proxy.base + "/v1/employees/42", headers=bearer(good)) as r,
    ):
        assert r.status == 200
    upstream.seen.clear()
    # Correctly signed, but naming a key the issuer does not publish.
    unknown = jwt.encode(claims(), keys.private, algorithm="RS256", headers={"kid": "k2"})
    await expect_401(proxy, upstream, bearer(unknown))


async def test_oversized_token(proxy: Proxy, upstream: Upstream, keys: Keys) -> None:
    # A correctly signed token of ~10 KB: over identity.max_token_bytes (8192), below
    # aiohttp's 16 KiB header limit, so the proxy's own limit is what refuses it.
    token = keys.token(padding="p" * 7400)
    assert 9000 < len(token) < 12000
    body = await expect_401(proxy, upstream, bearer(token))
    assert "too large" in body["detail"]


async def test_20kb_authorization_header(proxy: Proxy, upstream: Upstream, keys: Keys) -> None:
    token = keys.token(padding="p" * 15000)
    assert len(token) > 20000
    async with (
        aiohttp.ClientSession() as s,
        s.get(proxy.base + "/v1/employees/42", headers=bearer(token)) as r,
    ):
        assert 400 <= r.status < 500
        await r.read()
    assert upstream.seen == []


async def test_two_authorization_headers(proxy: Proxy, upstream: Upstream, keys: Keys) -> None:
    # Both valid: which one a downstream component reads is ambiguous, so neither is used.
    headers: CIMultiDict[str] = CIMultiDict()
    headers.add("Authorization", f"Bearer {keys.token()}")
    headers.add("Authorization", f"Bearer {keys.token('ops-bot', roles=['ops'])}")
    await expect_401(proxy, upstream, headers)


@pytest.mark.parametrize(
    "authorization",
    [
        "Basic aHItYm90OnBhc3N3b3Jk",
        "Bearer",
        "Bearer ",
        "Bearerx.y.z",
        "Token abc",
    ],
)
async def test_not_a_bearer_credential(
    proxy: Proxy, upstream: Upstream, authorization: str
) -> None:
    await expect_401(proxy, upstream, {"Authorization": authorization})


async def test_basic_with_a_valid_jwt_inside(proxy: Proxy, upstream: Upstream, keys: Keys) -> None:
    await expect_401(proxy, upstream, {"Authorization": f"Basic {keys.token()}"})


@pytest.mark.parametrize(
    "subject", ["evil\nX-Injected: 1", "evil\r\nX-Injected: 1", "bell\x07", "del\x7f", ""]
)
async def test_subject_with_control_characters(
    proxy: Proxy, upstream: Upstream, keys: Keys, subject: str
) -> None:
    await expect_401(proxy, upstream, bearer(keys.token(subject)))


async def test_actor_with_control_characters(proxy: Proxy, upstream: Upstream, keys: Keys) -> None:
    token = keys.token("alice", act={"sub": "assistant\nX-Injected: 1"})
    await expect_401(proxy, upstream, bearer(token))


async def test_lowercase_bearer_scheme_is_accepted(
    proxy: Proxy, upstream: Upstream, keys: Keys
) -> None:
    # RFC 9110 §11.1: the auth scheme is case-insensitive.
    async with (
        aiohttp.ClientSession() as s,
        s.get(
            proxy.base + "/v1/employees/42", headers={"Authorization": f"bearer {keys.token()}"}
        ) as r,
    ):
        assert r.status == 200
    assert only_header(upstream.seen[0], "X-Agentproxy-Agent") == "hr-bot"


async def test_tokens_never_reach_the_decision_log(
    capsys: pytest.CaptureFixture[str], make_proxy: ProxyFactory, keys: Keys
) -> None:
    # Started inside the test, so the decision log writes to capsys's stdout.
    proxy = await make_proxy()
    now = int(time.time())
    tokens = {
        "good": keys.token(),
        "denied": keys.token("stranger"),
        "expired": keys.token(iat=now - 600, exp=now - 1),
        "forged": hs256_with_public_key(keys),
    }
    async with aiohttp.ClientSession() as s:
        for token in tokens.values():
            async with s.get(proxy.base + "/v1/employees/42", headers=bearer(token)) as r:
                await r.read()
    out, err = captured(capsys, proxy)
    records = log_records(out)
    assert len(records) == len(tokens)
    for token in tokens.values():
        for part in token.split("."):
            assert part not in out
            assert part not in err
