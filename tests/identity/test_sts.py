"""The token exchange's pieces, end to end in-process: parse the form, verify both tokens
with the real verifier, decide by the delegation rules, mint, and verify what was minted."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from agentproxy.config.model import (
    ClaimNames,
    Delegation,
    Identity,
    Issuer,
    StsSettings,
    Upstream,
)
from agentproxy.identity.issue import mint_token
from agentproxy.identity.revocations import RevocationList
from agentproxy.identity.sts import (
    ACCESS_TOKEN,
    GRANT_TYPE,
    DelegationPolicy,
    ExchangeRefused,
    OAuthError,
    StsSigner,
    exchange,
    parse_exchange,
)
from agentproxy.identity.verifier import TokenVerifier
from agentproxy.store import MemoryStore, Revocation

IDP = "https://idp.example"
STS = "https://agentproxy.example"
UPSTREAMS = (Upstream("hr", "http://127.0.0.1:1"), Upstream("pay", "http://127.0.0.1:2"))


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    key = ed25519.Ed25519PrivateKey.generate()
    path = tmp_path / "idp.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (tmp_path / "idp.pub.pem").write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


def rules(when: str | None = 'subject.claims.dept == "support"') -> StsSettings:
    base = Delegation(
        id="bot-for-staff",
        agents=("system:serviceaccount:agents:*",),
        users=("*@example.com",),
        audiences=("hr",),
        scopes=("hr:read", "hr:write"),
        max_chain=2,
        when=when,
    )
    return StsSettings(issuer=STS, delegations=(base,))


async def setup(key_file: Path, settings: StsSettings):  # type: ignore[no-untyped-def]
    signer = StsSigner.load(settings)
    issuer = Issuer(
        IDP, ("agentproxy",), ("EdDSA",), public_key_file=key_file.with_name("idp.pub.pem")
    )
    verifier = TokenVerifier(
        Identity((issuer,), ClaimNames(agent="sub")),
        own=(signer.trusted_issuer(UPSTREAMS), signer.public_key),
    )
    await verifier.start()
    store = MemoryStore()
    revocations = RevocationList(store, shared=False)
    await revocations.refresh()
    return signer, DelegationPolicy(settings, UPSTREAMS), verifier, store, revocations


def token(key_file: Path, subject: str, **claims: object) -> str:
    return mint_token(
        key_file=key_file,
        issuer=IDP,
        audience="agentproxy",
        subject=subject,
        claims=claims,
        now=time.time(),
    )


def form(
    subject: str, actor: str | None, audience: str = "hr", scope: str | None = None
) -> dict[str, list[str]]:
    out = {
        "grant_type": [GRANT_TYPE],
        "subject_token": [subject],
        "subject_token_type": [ACCESS_TOKEN],
        "audience": [audience],
    }
    if actor is not None:
        out |= {"actor_token": [actor], "actor_token_type": [ACCESS_TOKEN]}
    if scope is not None:
        out["scope"] = [scope]
    return out


AGENT = "system:serviceaccount:agents:support-bot"


async def test_agent_acting_for_a_user_gets_a_bound_narrowed_token(key_file: Path) -> None:
    signer, policy, verifier, _, revocations = await setup(key_file, rules())
    user = token(key_file, "alice@example.com", dept="support")
    agent = token(key_file, AGENT)
    done = await exchange(
        form(user, agent, scope="hr:read"),
        signer=signer,
        delegations=policy,
        verifier=verifier,
        revocations=revocations,
        now=time.time(),
    )
    assert done.response["scope"] == "hr:read"
    assert done.response["issued_token_type"] == ACCESS_TOKEN
    principal = await verifier.verify(done.response["access_token"], time.time())
    assert principal.agent == AGENT and principal.acting_for == "alice@example.com"
    assert principal.issuer == STS and principal.task == done.record["task"]
    assert principal.claims["aud"] == "hr"
    assert "access_token" not in done.record  # the record never holds the token


@pytest.mark.parametrize(
    ("user_claims", "actor_sub", "audience", "scope", "error"),
    [
        ({"dept": "sales"}, AGENT, "hr", None, "unauthorized_client"),  # when is false
        ({"dept": "support"}, "other-bot", "hr", None, "unauthorized_client"),
        ({"dept": "support"}, AGENT, "pay", None, "invalid_target"),
        ({"dept": "support"}, AGENT, "hr", "hr:admin", "invalid_scope"),
        ({"dept": "support"}, AGENT, "nowhere", None, "invalid_target"),
    ],
)
async def test_what_no_rule_allows_is_refused(
    key_file: Path,
    user_claims: dict[str, str],
    actor_sub: str,
    audience: str,
    scope: str | None,
    error: str,
) -> None:
    signer, policy, verifier, _, revocations = await setup(key_file, rules())
    user = token(key_file, "alice@example.com", **user_claims)
    with pytest.raises(ExchangeRefused) as refused:
        await exchange(
            form(user, token(key_file, actor_sub), audience, scope),
            signer=signer,
            delegations=policy,
            verifier=verifier,
            revocations=revocations,
            now=time.time(),
        )
    assert refused.value.error.error == error
    assert refused.value.record["outcome"] == error


async def test_a_chain_narrows_and_stops_at_max_chain(key_file: Path) -> None:
    signer, policy, verifier, _, revocations = await setup(key_file, rules(when=None))
    now = time.time()
    user = token(key_file, "alice@example.com", dept="support")
    first = await exchange(
        form(user, token(key_file, AGENT), scope="hr:read"),
        signer=signer,
        delegations=policy,
        verifier=verifier,
        revocations=revocations,
        now=now,
    )
    delegated = first.response["access_token"]
    sub_agent = token(key_file, "system:serviceaccount:agents:helper")
    # Wider than what the delegation holds: refused.
    with pytest.raises(ExchangeRefused) as wider:
        await exchange(
            form(delegated, sub_agent, scope="hr:write"),
            signer=signer,
            delegations=policy,
            verifier=verifier,
            revocations=revocations,
            now=now,
        )
    assert wider.value.error.error == "invalid_scope"
    second = await exchange(
        form(delegated, sub_agent),
        signer=signer,
        delegations=policy,
        verifier=verifier,
        revocations=revocations,
        now=now,
    )
    principal = await verifier.verify(second.response["access_token"], now)
    assert principal.chain == (AGENT,) and principal.acting_for == "alice@example.com"
    assert principal.parent_task == first.record["task"]
    # A third actor is over max_chain: 2.
    with pytest.raises(ExchangeRefused):
        await exchange(
            form(
                second.response["access_token"], token(key_file, "system:serviceaccount:agents:c")
            ),
            signer=signer,
            delegations=policy,
            verifier=verifier,
            revocations=revocations,
            now=now,
        )


async def test_revoked_user_and_agent_get_nothing(key_file: Path) -> None:
    signer, policy, verifier, store, revocations = await setup(key_file, rules())
    user = token(key_file, "alice@example.com", dept="support")
    await store.revoke(Revocation("user", "alice@example.com"))
    await revocations.refresh()
    with pytest.raises(ExchangeRefused) as refused:
        await exchange(
            form(user, token(key_file, AGENT)),
            signer=signer,
            delegations=policy,
            verifier=verifier,
            revocations=revocations,
            now=time.time(),
        )
    assert "revoked" in refused.value.error.description


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"grant_type": ["client_credentials"]}, "unsupported_grant_type"),
        ({"audience": ["hr", "pay"]}, "invalid_target"),
        ({"subject_token_type": ["urn:x"]}, "invalid_request"),
        ({"scope": ["a", "b"]}, "invalid_request"),  # a parameter given twice
        ({"scope": ['hr:"read']}, "invalid_scope"),
    ],
)
def test_malformed_requests_get_oauth_errors(change: dict[str, list[str]], error: str) -> None:
    with pytest.raises(OAuthError) as refused:
        parse_exchange(form("a.b.c", None) | change)
    assert refused.value.error == error
