"""`POST /v1/token` through a running proxy: an agent exchanges its own token and the
user's for one bound to one upstream, which the data plane takes there and nowhere else."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp

from tests.conftest import AUDIENCE, ISSUER, Keys, Upstream
from tests.proxy.conftest import CustomProxyFactory

GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS = "urn:ietf:params:oauth:token-type:access_token"


def config(upstream: str) -> str:
    return f"""
listen: {{http: "127.0.0.1:0", admin: "127.0.0.1:0"}}
upstreams:
  - {{name: other, url: "{upstream}", match: {{path_prefix: /other}}}}
  - {{name: tool, url: "{upstream}"}}
identity:
  issuers:
    - issuer: "{ISSUER}"
      audiences: [{AUDIENCE}]
      public_key_file: ours.pem
      algorithms: [RS256]
sts:
  issuer: "https://agentproxy.test"
  delegation_files: [delegation.yaml]
policy_files: [policy.yaml]
decision_log: "off"
"""


POLICY = b"""
rules:
  - id: payments
    agents: [support-bot]
    actions: ["http:GET /v1/payments", "http:GET /other/v1/payments"]
    effect: allow
"""

DELEGATION = b"""
delegations:
  - id: support-for-users
    agents: [support-bot]
    users: ["*"]
    audiences: [tool]
    scopes: [pay:read]
"""


async def test_exchanged_token_works_on_its_upstream_only(
    custom_proxy: CustomProxyFactory, keys: Keys, upstream: Upstream
) -> None:
    proxy = await custom_proxy(
        config(upstream.url),
        {"ours.pem": keys.public_pem, "policy.yaml": POLICY, "delegation.yaml": DELEGATION},
    )
    form = {
        "grant_type": GRANT,
        "subject_token": keys.token("alice"),
        "subject_token_type": ACCESS,
        "actor_token": keys.token("support-bot"),
        "actor_token_type": ACCESS,
        "audience": "tool",
    }
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.admin + "/v1/token", data=form) as r:
            assert r.status == 200, await r.text()
            assert r.headers["Cache-Control"] == "no-store"
            issued = await r.json()
        assert issued["scope"] == "pay:read" and issued["token_type"] == "Bearer"
        token = {"Authorization": f"Bearer {issued['access_token']}"}
        async with s.get(proxy.base + "/v1/payments", headers=token) as r:
            assert r.status == 200
        async with s.get(proxy.base + "/other/v1/payments", headers=token) as r:
            assert r.status == 401  # issued for `tool`, not `other`
        async with s.get(proxy.admin + "/.well-known/jwks.json") as r:
            assert len((await r.json())["keys"]) == 2  # the context key and the STS key
        # The agent alone, without a rule for itself: refused, saying why.
        alone = {k: v for k, v in form.items() if not k.startswith("actor")}
        alone["subject_token"] = keys.token("support-bot")
        async with s.post(proxy.admin + "/v1/token", data=alone) as r:
            assert r.status == 400
            assert (await r.json())["error"] == "unauthorized_client"
        async with s.post(proxy.admin + "/v1/token", json=form) as r:
            assert r.status == 400 and (await r.json())["error"] == "invalid_request"
        async with s.post(
            proxy.admin + "/v1/token", data=form, headers={"Authorization": "Basic eDp5"}
        ) as r:
            assert r.status == 401 and (await r.json())["error"] == "invalid_client"
        async with s.get(proxy.admin + "/metrics") as r:
            assert 'agentproxy_sts_tokens_total{outcome="issued"} 1.0' in await r.text()
    assert len(upstream.seen) == 1


async def test_a_form_sent_in_pieces_is_read_whole(
    custom_proxy: CustomProxyFactory, keys: Keys, upstream: Upstream
) -> None:
    """A client that streams its form (chunked, a piece at a time) is answered as if it had
    sent it at once, not refused for its first piece."""
    proxy = await custom_proxy(
        config(upstream.url),
        {"ours.pem": keys.public_pem, "policy.yaml": POLICY, "delegation.yaml": DELEGATION},
    )
    form = (
        f"grant_type={GRANT}&subject_token={keys.token('alice')}&subject_token_type={ACCESS}"
        f"&actor_token={keys.token('support-bot')}&actor_token_type={ACCESS}&audience=tool"
    ).encode()

    async def pieces() -> AsyncIterator[bytes]:
        for at in range(0, len(form), 100):
            yield form[at : at + 100]
            await asyncio.sleep(0.01)

    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    async with (
        aiohttp.ClientSession() as s,
        s.post(proxy.admin + "/v1/token", data=pieces(), headers=headers) as r,
    ):
        assert r.status == 200, await r.text()
        assert (await r.json())["scope"] == "pay:read"
