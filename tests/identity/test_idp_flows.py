"""Agent identity with real identity providers, end to end through a running proxy:

- a person signs in at oidc-provider (authorization code + PKCE, its own sign-in pages), an
  agent gets its workload token there by client credentials, and the agent exchanges both at
  the proxy's STS (`POST /v1/token`, RFC 8693) for a token bound to one upstream, which the
  upstream sees as "this agent for this user";
- Kubernetes-shaped service-account tokens: the cluster's issuer found by OIDC discovery, its
  JWKS at /openid/v1/jwks as the API server serves them, `system:serviceaccount:ns:name`
  subjects, the `kubernetes.io` claims readable by policy, and such a token as the agent's
  `actor_token` at the STS.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.conftest import CustomProxyFactory, Proxy, Upstream, start_app
from tests.harness.oidc import ACCESS_TOKEN, EXCHANGE, Client, OpenIdProvider, run_provider

ENTRY = "https://agentproxy.test"
WEB = Client(
    "web",
    "web-secret",
    grant_types=("authorization_code",),
    scope="openid hr:read",
    redirect_uris=("http://127.0.0.1:9/callback",),
)
PLANNER = Client("planner", "planner-secret", scope="hr:read")
INTRUDER = Client("intruder", "intruder-secret", scope="hr:read")

POLICY = b"""
default: deny
rules:
  - id: planner-for-alice
    agents: [planner, "system:serviceaccount:agents:*"]
    users: [alice]
    actions: ["http:GET /v1/**"]
    effect: allow
  - id: agents-namespace
    agents: ["system:serviceaccount:*"]
    actions: ["http:GET /status/**"]
    when: 'principal.claims["kubernetes.io"].namespace == "agents"'
    effect: allow
"""

DELEGATION = b"""
delegations:
  - id: planner-acts-for-alice
    agents: [planner, "system:serviceaccount:agents:planner"]
    users: [alice]
    audiences: [hr]
    scopes: [hr:read]
    max_chain: 1
"""


@dataclass
class Cluster:
    """A Kubernetes API server's service-account issuer, as far as tokens go."""

    issuer: str
    key: rsa.RSAPrivateKey

    def token(self, namespace: str, name: str, **changes: Any) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "aud": ["agentproxy"],
            "exp": now + 600,
            "iat": now,
            "nbf": now,
            "iss": self.issuer,
            "jti": str(uuid.uuid4()),
            "kubernetes.io": {
                "namespace": namespace,
                "node": {"name": "node-1", "uid": str(uuid.uuid4())},
                "pod": {"name": f"{name}-7d4b9c6f5-x2x9q", "uid": str(uuid.uuid4())},
                "serviceaccount": {"name": name, "uid": str(uuid.uuid4())},
            },
            "sub": f"system:serviceaccount:{namespace}:{name}",
        }
        claims.update(changes)
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": "sa-key-1"})


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    jwk.update(kid="sa-key-1", use="sig", alg="RS256")
    state: dict[str, str] = {}

    async def discovery(request: web.Request) -> web.Response:
        # What the API server answers at /.well-known/openid-configuration.
        return web.json_response(
            {
                "issuer": state["issuer"],
                "jwks_uri": state["issuer"] + "/openid/v1/jwks",
                "response_types_supported": ["id_token"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
            }
        )

    async def jwks(request: web.Request) -> web.Response:
        return web.json_response({"keys": [jwk]})

    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", discovery)
    app.router.add_get("/openid/v1/jwks", jwks)
    runner, port = await start_app(app)
    state["issuer"] = f"http://127.0.0.1:{port}"
    try:
        yield Cluster(state["issuer"], key)
    finally:
        await runner.cleanup()


@pytest.fixture
async def op(tmp_path: Path) -> AsyncIterator[OpenIdProvider]:
    resources = {ENTRY: {"scope": "hr:read hr:write"}}
    async with run_provider(tmp_path, [WEB, PLANNER, INTRUDER], resources) as provider:
        yield provider


def config(op: OpenIdProvider, cluster: Cluster, upstream: str) -> str:
    return f"""
listen: {{http: "127.0.0.1:0", admin: "127.0.0.1:0"}}
upstreams:
  - {{name: hr, url: "{upstream}"}}
identity:
  issuers:
    - issuer: "{op.issuer}"
      discovery: true
      audiences: ["{ENTRY}"]
      algorithms: [RS256]
    - issuer: "{cluster.issuer}"
      discovery: true
      audiences: [agentproxy]
      algorithms: [RS256]
sts:
  issuer: "https://sts.agentproxy.test"
  ttl: 5m
  delegation_files: [delegation.yaml]
policy_files: [policy.yaml]
decision_log: "off"
"""


async def start(
    custom_proxy: CustomProxyFactory, op: OpenIdProvider, cluster: Cluster, upstream: Upstream
) -> Proxy:
    return await custom_proxy(
        config(op, cluster, upstream.url),
        {"policy.yaml": POLICY, "delegation.yaml": DELEGATION},
    )


async def exchange(proxy: Proxy, subject: str, actor: str, audience: str = "hr") -> Any:
    form = {
        "grant_type": EXCHANGE,
        "subject_token": subject,
        "subject_token_type": ACCESS_TOKEN,
        "actor_token": actor,
        "actor_token_type": ACCESS_TOKEN,
        "audience": audience,
    }
    async with aiohttp.ClientSession() as s, s.post(proxy.admin + "/v1/token", data=form) as r:
        return r.status, await r.json()


async def call(proxy: Proxy, token: str, path: str = "/v1/employees/7") -> int:
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as s, s.get(proxy.base + path, headers=headers) as r:
        return r.status


async def test_an_agent_acts_for_a_signed_in_user_through_the_exchange(
    op: OpenIdProvider, cluster: Cluster, custom_proxy: CustomProxyFactory, upstream: Upstream
) -> None:
    proxy = await start(custom_proxy, op, cluster, upstream)
    alice = await op.sign_in(WEB, "alice", ENTRY, "hr:read")
    planner = await op.client_credentials(PLANNER, ENTRY, "hr:read")

    # Neither token alone is "the planner for alice": the planner's is for itself.
    assert await call(proxy, planner) == 403
    status, issued = await exchange(proxy, alice, planner)
    assert status == 200, issued
    assert issued["scope"] == "hr:read" and issued["expires_in"] <= 300
    assert await call(proxy, issued["access_token"]) == 200
    seen = upstream.seen[-1].headers
    assert (seen["X-Agentproxy-Agent"], seen["X-Agentproxy-User"]) == ("planner", "alice")
    assert issued["access_token"] not in str(upstream.seen[-1].header_list)

    # An agent no rule lets act for alice, and alice for someone the rule does not name.
    intruder = await op.client_credentials(INTRUDER, ENTRY, "hr:read")
    status, refused = await exchange(proxy, alice, intruder)
    assert status == 400 and refused["error"] == "unauthorized_client"
    bob = await op.sign_in(WEB, "bob", ENTRY, "hr:read")
    status, refused = await exchange(proxy, bob, planner)
    assert status == 400 and refused["error"] == "unauthorized_client"
    # A tampered subject token: RFC 8693 §2.2.2 answers invalid_request.
    status, refused = await exchange(proxy, alice + "x", planner)
    assert status == 400 and refused["error"] == "invalid_request"
    assert len(upstream.seen) == 1


async def test_kubernetes_service_account_tokens_are_agents(
    op: OpenIdProvider, cluster: Cluster, custom_proxy: CustomProxyFactory, upstream: Upstream
) -> None:
    proxy = await start(custom_proxy, op, cluster, upstream)
    planner = cluster.token("agents", "planner")
    assert await call(proxy, planner, "/status/ok") == 200
    assert upstream.seen[-1].headers["X-Agentproxy-Agent"] == "system:serviceaccount:agents:planner"
    # Policy reads the claims the API server adds: another namespace is refused.
    assert await call(proxy, cluster.token("default", "planner"), "/status/ok") == 403
    # A token the cluster did not sign, or signed for another audience, is no credential.
    forged = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    claims = jwt.decode(planner, options={"verify_signature": False})
    assert await call(proxy, jwt.encode(claims, forged, "RS256", {"kid": "sa-key-1"})) == 401
    assert await call(proxy, cluster.token("agents", "planner", aud=["kubernetes"])) == 401

    # The service account as the agent, acting for a person signed in elsewhere.
    alice = await op.sign_in(WEB, "alice", ENTRY, "hr:read")
    status, issued = await exchange(proxy, alice, planner)
    assert status == 200, issued
    assert await call(proxy, issued["access_token"]) == 200
    seen = upstream.seen[-1].headers
    assert seen["X-Agentproxy-Agent"] == "system:serviceaccount:agents:planner"
    assert seen["X-Agentproxy-User"] == "alice"
    # Another service account of the namespace is not named by the delegation.
    status, refused = await exchange(proxy, alice, cluster.token("agents", "scraper"))
    assert status == 400 and refused["error"] == "unauthorized_client"
