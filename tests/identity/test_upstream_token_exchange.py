"""Upstream credentials per call (`credentials.token_exchange`) against a real authorization
server (oidc-provider, tests/harness/oidc.py): agents get their tokens by client credentials,
the proxy finds the issuer's keys by OIDC discovery, and each allowed call reaches the
upstream with a token the authorization server issued for that caller (RFC 8693), never the
agent's own and never another agent's."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import orjson
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from agentproxy.clock import SystemClock
from agentproxy.config.model import Secret, TokenExchange
from agentproxy.identity.upstream_tokens import ExchangeError, UpstreamTokens
from tests.conftest import CustomProxyFactory, Proxy, Upstream
from tests.harness.oidc import EXCHANGE, Client, OpenIdProvider, run_provider

ENTRY = "https://agentproxy.test"  # the audience agents ask for: the proxy
HR = "https://hr.test"  # the upstream's own resource at the same authorization server
AGENT_A = Client("agent-a", "secret-a", scope="hr:read hr:write")
AGENT_B = Client("agent-b", "secret-b", scope="hr:read")
PROXY = Client("agentproxy", "proxy-secret:%", grant_types=(EXCHANGE,), scope="hr:read hr:write")

POLICY = """
default: deny
rules:
  - id: agents-read-hr
    agents: [agent-a, agent-b, hr-bot]
    actions: ["http:GET /v1/**"]
    effect: allow
"""


@pytest.fixture
async def op(tmp_path: Path) -> AsyncIterator[OpenIdProvider]:
    resources: dict[str, dict[str, Any]] = {
        ENTRY: {"scope": "hr:read hr:write"},
        HR: {"scope": "hr:read hr:write", "ttl": 600},
    }
    async with run_provider(
        tmp_path, [AGENT_A, AGENT_B, PROXY], resources, default_resource=ENTRY
    ) as provider:
        yield provider


def config(
    op: OpenIdProvider,
    upstream_url: str,
    *,
    token_url: str | None = None,
    exchange_extra: str = "",
    also_trust_test_keys: bool = False,
) -> str:
    test_issuer = """
    - issuer: "https://idp.test"
      audiences: [agentproxy]
      public_key_file: issuer.pem
      algorithms: [RS256]"""
    return f"""
listen: {{http: "127.0.0.1:0", admin: "127.0.0.1:0"}}
upstreams:
  - name: hr
    url: "{upstream_url}"
    timeout: 5s
    credentials:
      token_exchange:
        token_url: "{token_url or op.token_url}"
        client_id: agentproxy
        client_secret_file: proxy-secret
        resource: "{HR}"
        scope: "hr:read"
{exchange_extra}
identity:
  issuers:
    - issuer: "{op.issuer}"
      discovery: true
      audiences: ["{ENTRY}"]
      algorithms: [RS256]{test_issuer if also_trust_test_keys else ""}
policy_files: ["policies/*.yaml"]
decision_log: stdout
"""


FOREIGN = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def foreign_token(sub: str) -> str:
    """A token of an issuer the proxy trusts and the upstream's authorization server does not."""
    now = int(time.time())
    claims = {
        "iss": "https://idp.test",
        "aud": "agentproxy",
        "sub": sub,
        "iat": now,
        "exp": now + 300,
    }
    return jwt.encode(claims, FOREIGN, algorithm="RS256")


async def start(custom_proxy: CustomProxyFactory, text: str) -> Proxy:
    return await custom_proxy(
        text,
        {
            "proxy-secret": PROXY.client_secret.encode() + b"\n",
            "policies/main.yaml": POLICY.encode(),
            "issuer.pem": FOREIGN.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        },
    )


async def get(proxy: Proxy, token: str, path: str = "/v1/employees/7", **headers: str) -> Any:
    async with (
        aiohttp.ClientSession() as s,
        s.get(proxy.base + path, headers={"Authorization": f"Bearer {token}", **headers}) as r,
    ):
        return r.status, r.headers.get("Content-Type", ""), await r.read()


async def jwks_of(op: OpenIdProvider) -> jwt.PyJWKSet:
    async with aiohttp.ClientSession() as s, s.get(op.issuer + "/jwks") as r:
        return jwt.PyJWKSet.from_dict(await r.json())


def verified(token: str, keys: jwt.PyJWKSet, op: OpenIdProvider) -> dict[str, Any]:
    header = jwt.get_unverified_header(token)
    key = next(k for k in keys.keys if k.key_id == header["kid"])
    claims: dict[str, Any] = jwt.decode(
        token, key.key, algorithms=["RS256"], audience=HR, issuer=op.issuer
    )
    return claims


async def test_each_call_reaches_the_upstream_with_a_token_issued_for_its_caller(
    op: OpenIdProvider, custom_proxy: CustomProxyFactory, upstream: Upstream
) -> None:
    proxy = await start(custom_proxy, config(op, upstream.url))
    token_a = await op.client_credentials(AGENT_A, ENTRY, "hr:read hr:write")
    token_b = await op.client_credentials(AGENT_B, ENTRY, "hr:read")

    status, _, _ = await get(proxy, token_a)
    assert status == 200
    sent = upstream.seen[-1].headers["Authorization"]
    assert sent.startswith("Bearer ") and sent != f"Bearer {token_a}"
    jwks = await jwks_of(op)
    claims = verified(sent.removeprefix("Bearer "), jwks, op)
    # The upstream's own audience, the caller as the subject, the proxy as the actor, and
    # only the scope configured for this upstream.
    assert claims["sub"] == "agent-a" and claims["act"] == {"sub": "agentproxy"}
    assert claims["scope"] == "hr:read"

    # Agent B's calls carry a token of its own, never agent A's cached one.
    assert (await get(proxy, token_b))[0] == 200
    claims_b = verified(upstream.seen[-1].headers["Authorization"].split()[1], jwks, op)
    assert claims_b["sub"] == "agent-b"

    # Cached until it expires: more calls by the same token ask no more.
    for _ in range(3):
        assert (await get(proxy, token_a))[0] == 200
    assert upstream.seen[-1].headers["Authorization"] == sent
    assert (await op.stats())[EXCHANGE] == 2

    metrics = await scrape(proxy)
    assert 'agentproxy_upstream_credentials_total{outcome="exchanged",upstream="hr"} 2.0' in metrics
    assert 'agentproxy_upstream_credentials_total{outcome="cached",upstream="hr"} 3.0' in metrics


async def test_calls_waiting_for_the_same_token_share_one_exchange(
    op: OpenIdProvider, custom_proxy: CustomProxyFactory, upstream: Upstream
) -> None:
    proxy = await start(custom_proxy, config(op, upstream.url))
    token = await op.client_credentials(AGENT_A, ENTRY, "hr:read")
    results = await asyncio.gather(*(get(proxy, token) for _ in range(20)))
    assert [r[0] for r in results] == [200] * 20
    assert (await op.stats())[EXCHANGE] == 1
    assert len({seen.headers["Authorization"] for seen in upstream.seen}) == 1


async def test_the_agent_cannot_supply_the_upstream_credential_itself(
    op: OpenIdProvider, custom_proxy: CustomProxyFactory, upstream: Upstream
) -> None:
    text = config(op, upstream.url).replace(
        'scope: "hr:read"', 'scope: "hr:read"\n        header: X-Hr-Token'
    )
    proxy = await start(custom_proxy, text)
    token = await op.client_credentials(AGENT_A, ENTRY, "hr:read")
    # Every spelling a framework reads as X-Hr-Token (WSGI/CGI servers fold '_' into '-').
    status, _, _ = await get(
        proxy, token, **{"X-Hr-Token": "forged", "x_hr_token": "forged2", "X-HR-TOKEN": "forged3"}
    )
    assert status == 200
    seen = upstream.seen[-1]
    values = [v for k, v in seen.header_list if k.lower().replace("_", "-") == "x-hr-token"]
    assert len(values) == 1 and "forged" not in values[0]
    assert not values[0].startswith("Bearer ")  # no prefix unless asked for, off Authorization
    assert "Authorization" not in seen.headers  # nor the agent's own token
    assert verified(values[0], await jwks_of(op), op)["sub"] == "agent-a"


async def test_a_caller_the_authorization_server_refuses_is_refused_and_nothing_is_forwarded(
    op: OpenIdProvider, custom_proxy: CustomProxyFactory, upstream: Upstream
) -> None:
    # The proxy trusts a second issuer whose tokens the upstream's server does not know.
    proxy = await start(custom_proxy, config(op, upstream.url, also_trust_test_keys=True))
    foreign = foreign_token("hr-bot")
    status, media, body = await get(proxy, foreign)
    assert status == 403 and media.startswith("application/problem+json")
    assert b"upstream-credential-refused" in body and b"invalid_grant" in body
    assert foreign.encode() not in body
    assert upstream.seen == []
    # Remembered for a moment: the same token is not sent again at once.
    assert (await get(proxy, foreign))[0] == 403
    assert (await op.stats())["refused"] == 1
    # A caller the server knows is unaffected.
    token = await op.client_credentials(AGENT_A, ENTRY, "hr:read")
    assert (await get(proxy, token))[0] == 200


async def test_an_unreachable_or_misconfigured_authorization_server_fails_closed(
    op: OpenIdProvider, custom_proxy: CustomProxyFactory, upstream: Upstream
) -> None:
    from tests.harness.processes import free_port

    dead = await start(
        custom_proxy,
        config(op, upstream.url, token_url=f"http://127.0.0.1:{free_port()}/token"),
    )
    token = await op.client_credentials(AGENT_A, ENTRY, "hr:read")
    status, _, body = await get(dead, token)
    assert status == 502 and b"upstream-credential-unavailable" in body
    # A wrong client secret is the proxy's setup, not the caller's fault: 502, not 403.
    wrong = config(op, upstream.url).replace("client_id: agentproxy", "client_id: agent-b")
    misconfigured = await start(custom_proxy, wrong)
    status, _, body = await get(misconfigured, token)
    assert status == 502 and b"invalid_client" in body
    assert upstream.seen == []


async def scrape(proxy: Proxy) -> str:
    async with aiohttp.ClientSession() as s, s.get(proxy.admin + "/metrics") as r:
        return await r.text()


async def test_a_reload_that_moves_the_credential_header_sends_the_cached_token_in_the_new_one(
    op: OpenIdProvider, custom_proxy: CustomProxyFactory, upstream: Upstream
) -> None:
    moved = 'scope: "hr:read"\n        header: X-Hr-Token'
    proxy = await start(custom_proxy, config(op, upstream.url).replace('scope: "hr:read"', moved))
    token = await op.client_credentials(AGENT_A, ENTRY, "hr:read")
    assert (await get(proxy, token))[0] == 200
    issued = upstream.seen[-1].headers["X-Hr-Token"]
    # The operator moves the credential back to Authorization: the agent's X-Hr-Token is no
    # longer the credential header, so it is forwarded as any other header, and the token
    # exchanged before the reload must not be sent in it beside the agent's own value.
    proxy.config_path.write_text(config(op, upstream.url))
    assert await proxy.server.reload()
    assert (await get(proxy, token, **{"X-Hr-Token": "forged"}))[0] == 200
    seen = upstream.seen[-1]
    assert seen.headers["Authorization"] == f"Bearer {issued}"
    assert [v for k, v in seen.header_list if k.lower() == "x-hr-token"] == ["forged"]


@pytest.fixture
async def split_answer() -> AsyncIterator[str]:
    """A token endpoint that sends its (good) answer in two writes, as any server streaming
    its body chunked may: the token URL."""

    async def token(request: web.Request) -> web.StreamResponse:
        await request.post()
        body = orjson.dumps(
            {"access_token": "issued-for-hr-bot", "token_type": "Bearer", "expires_in": 300}
        )
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        await response.write(body[:10])
        await asyncio.sleep(0.05)
        await response.write(body[10:])
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/token", token)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}/token"
    await runner.cleanup()


async def test_an_answer_that_arrives_in_pieces_is_read_whole(
    op: OpenIdProvider, custom_proxy: CustomProxyFactory, upstream: Upstream, split_answer: str
) -> None:
    text = config(op, upstream.url, token_url=split_answer, also_trust_test_keys=True)
    proxy = await start(custom_proxy, text)
    status, _, body = await get(proxy, foreign_token("hr-bot"))
    assert status == 200, body
    assert upstream.seen[-1].headers["Authorization"] == "Bearer issued-for-hr-bot"


@dataclass
class HostileServer:
    """A token endpoint under the attacker's control (or a broken one): `/slow` answers a
    good token after `release` is set (`asked` once it is asked), `/moved` redirects to
    `/steal`; `hits` counts each."""

    base: str
    asked: asyncio.Event
    release: asyncio.Event
    hits: dict[str, int]


@pytest.fixture
async def hostile() -> AsyncIterator[HostileServer]:
    asked, release = asyncio.Event(), asyncio.Event()
    hits: dict[str, int] = {}

    async def slow(request: web.Request) -> web.Response:
        hits["slow"] = hits.get("slow", 0) + 1
        asked.set()
        await release.wait()
        return web.json_response({"access_token": "slow-token", "token_type": "Bearer"})

    async def moved(request: web.Request) -> web.Response:
        hits["moved"] = hits.get("moved", 0) + 1
        raise web.HTTPTemporaryRedirect("/steal")  # 307: a client that follows re-POSTs

    async def steal(request: web.Request) -> web.Response:
        hits["steal"] = hits.get("steal", 0) + 1
        return web.json_response({"access_token": "stolen", "token_type": "Bearer"})

    app = web.Application()
    app.router.add_post("/slow", slow)
    app.router.add_post("/moved", moved)
    app.router.add_post("/steal", steal)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield HostileServer(f"http://127.0.0.1:{runner.addresses[0][1]}", asked, release, hits)
    release.set()
    await runner.cleanup()


def exchange_settings(token_url: str, **extra: Any) -> TokenExchange:
    return TokenExchange(
        token_url=token_url,
        client_id="agentproxy",
        client_secret=Secret(b"proxy-secret", "test"),
        resource=HR,
        **extra,
    )


async def test_a_redirecting_token_endpoint_gets_no_second_copy_of_the_secret(
    hostile: HostileServer,
) -> None:
    tokens = UpstreamTokens(SystemClock())
    settings = exchange_settings(hostile.base + "/moved", auth_method="client_secret_post")
    with pytest.raises(ExchangeError) as info:
        await tokens.credential("hr", settings, "subject", time.time() + 60)
    assert not info.value.refused and "HTTP 307" in info.value.detail
    assert hostile.hits == {"moved": 1}  # the form (secret, subject token) went nowhere else


async def test_a_caller_that_goes_away_leaves_the_others_their_exchange(
    hostile: HostileServer,
) -> None:
    tokens = UpstreamTokens(SystemClock())
    settings = exchange_settings(hostile.base + "/slow")
    expires = time.time() + 60
    first = asyncio.ensure_future(tokens.credential("hr", settings, "subject", expires))
    second = asyncio.ensure_future(tokens.credential("hr", settings, "subject", expires))
    await hostile.asked.wait()
    first.cancel()
    await asyncio.sleep(0.05)
    hostile.release.set()
    assert await second == ("Authorization", "Bearer slow-token")
    assert first.cancelled() and hostile.hits == {"slow": 1}
    # Cached for the next call, however the first caller ended.
    assert await tokens.credential("hr", settings, "subject", expires) == (
        "Authorization",
        "Bearer slow-token",
    )
    assert hostile.hits == {"slow": 1}
