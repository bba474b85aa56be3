"""Who a principal is depends on who issued its token (issue 20.10).

With two trusted issuers, a partner token with `sub: ops-admin` is not this IdP's ops-admin;
a token whose subject is the text `role:security` has no role; operators, approvers and rule
agents can each be bound to an issuer (`ENTRY@ISSUER`), and with more than one issuer an
operator or approver must be.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from agentproxy.config import ConfigError
from agentproxy.config.model import PrincipalRef
from agentproxy.core import Principal
from agentproxy.proxy.runtime import check, load_config
from tests.conftest import AUDIENCE, ISSUER, Keys, Upstream
from tests.proxy.conftest import CustomProxyFactory

PARTNER = "https://partner.test"


@pytest.fixture(scope="module")
def partner_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def partner_token(key: rsa.RSAPrivateKey, sub: str, **claims: Any) -> str:
    now = int(time.time())
    payload = {"iss": PARTNER, "aud": AUDIENCE, "sub": sub, "iat": now, "exp": now + 300}
    return jwt.encode(payload | claims, key, algorithm="RS256")


def config(upstream: str, operators: str, policy_agents: str = '["pay-bot"]') -> tuple[str, str]:
    return (
        f"""
listen: {{http: "127.0.0.1:0", admin: "127.0.0.1:0"}}
upstreams: [{{name: tool, url: "{upstream}"}}]
identity:
  issuers:
    - issuer: "{ISSUER}"
      audiences: [{AUDIENCE}]
      public_key_file: ours.pem
      algorithms: [RS256]
    - issuer: "{PARTNER}"
      audiences: [{AUDIENCE}]
      public_key_file: partner.pem
      algorithms: [RS256]
admin: {{operators: {operators}}}
policy_files: [policy.yaml]
decision_log: "off"
""",
        f"""
rules:
  - id: payments
    agents: {policy_agents}
    actions: ["http:GET /v1/payments"]
    effect: allow
""",
    )


def files(keys: Keys, partner: rsa.RSAPrivateKey, policy: str) -> dict[str, bytes]:
    return {
        "ours.pem": keys.public_pem,
        "partner.pem": partner.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        "policy.yaml": policy.encode(),
    }


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_operators_rule_agents_are_bound_to_their_issuer(
    custom_proxy: CustomProxyFactory,
    keys: Keys,
    partner_key: rsa.RSAPrivateKey,
    upstream: Upstream,
) -> None:
    text, policy = config(
        upstream.url,
        f'["ops-admin@{ISSUER}", "role:security@{ISSUER}"]',
        policy_agents=f'["pay-bot@{ISSUER}"]',
    )
    proxy = await custom_proxy(text, files(keys, partner_key, policy))
    async with aiohttp.ClientSession() as s:
        for token, expected in [
            (keys.token("ops-admin"), 200),
            (keys.token("someone", roles=["security"]), 200),
            (partner_token(partner_key, "ops-admin"), 403),  # same subject, other issuer
            (partner_token(partner_key, "someone", roles=["security"]), 403),
        ]:
            async with s.post(proxy.admin + "/v1/reload", headers=bearer(token)) as r:
                assert r.status == expected, await r.text()
        async with s.get(proxy.base + "/v1/payments", headers=bearer(keys.token("pay-bot"))) as r:
            assert r.status == 200
        partner_bot = partner_token(partner_key, "pay-bot")
        async with s.get(proxy.base + "/v1/payments", headers=bearer(partner_bot)) as r:
            assert r.status == 403
    assert len(upstream.seen) == 1


async def test_a_subject_spelled_like_a_role_has_no_role(
    custom_proxy: CustomProxyFactory,
    keys: Keys,
    partner_key: rsa.RSAPrivateKey,
    upstream: Upstream,
) -> None:
    text, policy = config(
        upstream.url, f'["role:security@{ISSUER}"]', policy_agents='["role:payments", "pay-*"]'
    )
    proxy = await custom_proxy(text, files(keys, partner_key, policy))
    async with aiohttp.ClientSession() as s:
        async with s.post(
            proxy.admin + "/v1/reload", headers=bearer(keys.token("role:security"))
        ) as r:
            assert r.status == 403
        for sub in ("role:payments", "role:pay-x"):
            async with s.get(proxy.base + "/v1/payments", headers=bearer(keys.token(sub))) as r:
                assert r.status == 403, sub
        async with s.get(
            proxy.base + "/v1/payments", headers=bearer(keys.token("x", roles=["payments"]))
        ) as r:
            assert r.status == 200
    assert len(upstream.seen) == 1


def test_with_two_issuers_operators_and_approvers_must_name_theirs(
    tmp_path: Path, keys: Keys, partner_key: rsa.RSAPrivateKey
) -> None:
    text, _ = config("http://127.0.0.1:9", '["ops-admin", "role:security@https://idp.test"]')
    policy = """
rules:
  - id: transfers
    agents: [pay-bot]
    actions: ["http:POST /v1/transfers"]
    effect: require_approval
    approval: {approvers: ["role:finance"]}
"""
    for name, content in files(keys, partner_key, policy).items():
        (tmp_path / name).write_bytes(content)
    (tmp_path / "agentproxy.yaml").write_text(text)
    with pytest.raises(ConfigError) as caught:
        check(load_config(tmp_path / "agentproxy.yaml"))
    text_of = str(caught.value)
    assert "$.admin.operators[0]: 'ops-admin': bind it to its issuer" in text_of
    assert "rule transfers.approval.approvers: 'role:finance': bind it" in text_of
    assert "operators[1]" not in text_of


@pytest.mark.parametrize(
    ("entry", "principal", "expected"),
    [
        ("role:security", Principal("role:security"), False),
        ("role:security", Principal("x", roles=frozenset({"security"})), True),
        ("ops-admin", Principal("ops-admin", issuer=PARTNER), True),  # unbound: any issuer
        (f"ops-admin@{ISSUER}", Principal("ops-admin", issuer=PARTNER), False),
        (f"ops-admin@{ISSUER}", Principal("ops-admin", issuer=ISSUER), True),
        ("alice@example.com", Principal("alice@example.com"), True),  # an e-mail is an id
        ("user:carol", Principal("carol"), True),
        ("ci-*", Principal("ci-7"), True),
        ("*", Principal("role:anything"), True),
        ("r*", Principal("role:security"), False),  # a glob never matches a role spelling
    ],
)
def test_principal_references(entry: str, principal: Principal, expected: bool) -> None:
    assert PrincipalRef.parse(entry).matches(principal) is expected


def test_an_empty_role_is_refused() -> None:
    with pytest.raises(ValueError, match="names a role"):
        PrincipalRef.parse("role:")
