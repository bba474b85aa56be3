"""The admin API answers every error as problem+json, from one place, and never shows the
store's address or error text; its explain is the data plane's answer, revocations included."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from tests.conftest import Keys, ProxyFactory
from tests.harness.redis import MakeRedisServer

APPROVALS = """
default: deny
rules:
  - id: transfers
    agents: [pay-bot]
    actions: ["http:POST /v1/transfers"]
    effect: require_approval
    approval: {approvers: ["role:finance"], timeout: 10m, hold: 0s}
  - id: read
    agents: [hr-bot]
    actions: ["http:GET /v1/employees/{id}"]
    effect: allow
"""
OPERATORS = 'admin: {operators: ["role:security"]}'


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def problem(response: aiohttp.ClientResponse) -> dict[str, Any]:
    assert response.content_type == "application/problem+json", await response.text()
    body: dict[str, Any] = await response.json(content_type=None)
    assert body["status"] == response.status
    assert body["type"].startswith("https://agentproxy.dev/problems/")
    return body


async def test_every_admin_error_is_problem_json(make_proxy: ProxyFactory, keys: Keys) -> None:
    proxy = await make_proxy(policy=APPROVALS, extra=OPERATORS)
    finance = auth(keys.token("carol", roles=["finance"]))
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.admin + "/v1/nowhere") as r:
            assert r.status == 404
            await problem(r)
        async with s.put(proxy.admin + "/v1/reload") as r:
            assert r.status == 405
            assert "POST" in (await problem(r))["detail"]
        async with s.get(proxy.admin + "/v1/approvals/0123", headers=finance) as r:
            assert r.status == 404
            assert (await problem(r))["type"].endswith("/not-found")
        async with s.post(proxy.admin + "/v1/approvals/0123/approve", headers=finance) as r:
            assert r.status == 404
            await problem(r)
        async with s.get(proxy.admin + "/v1/approvals?state=odd", headers=finance) as r:
            assert r.status == 400
            await problem(r)
        async with s.post(proxy.base + "/v1/transfers", headers=auth(keys.token("pay-bot"))) as r:
            approval_id = (await r.json(content_type=None))["approval_id"]
        url = f"{proxy.admin}/v1/approvals/{approval_id}"
        async with s.post(url + "/approve", headers=finance, json={"reason": "ok"}) as r:
            assert r.status == 200
        async with s.post(url + "/deny", headers=finance, json={"reason": "no"}) as r:
            assert r.status == 409
            body = await problem(r)
            assert body["type"].endswith("/conflict") and "approved" in body["detail"]
        async with s.post(url + "/approve", headers=finance, data=b"{not json") as r:
            assert r.status == 400
            await problem(r)


async def test_a_store_outage_is_a_503_that_names_no_address(
    make_proxy: ProxyFactory, keys: Keys, make_redis_server: MakeRedisServer
) -> None:
    redis = make_redis_server()
    proxy = await make_proxy(
        policy=APPROVALS,
        extra=f'{OPERATORS}\nstore: {{redis: {{url: "{redis.url}", timeout: 200ms}}}}',
    )
    finance = auth(keys.token("carol", roles=["finance"]))
    operator = auth(keys.token("sec", roles=["security"]))
    redis.stop()
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.admin + "/v1/approvals", headers=finance) as r:
            assert r.status == 503
            body = await problem(r)
        async with s.post(
            proxy.admin + "/v1/revocations", headers=operator, json={"agent": "hr-bot"}
        ) as r:
            assert r.status == 503
            revoke = await problem(r)
    for shown in (body, revoke):
        assert shown["type"].endswith("/store-unavailable")
        text = str(shown)
        assert str(redis.port) not in text and "127.0.0.1" not in text
        assert "refused" not in text.lower()


async def test_admin_explain_refuses_a_revoked_agent(make_proxy: ProxyFactory, keys: Keys) -> None:
    """Explain runs the serving stages: a revoked agent is refused there as on the data
    plane, never explained as allowed."""
    proxy = await make_proxy(policy=APPROVALS, extra=OPERATORS)
    operator = auth(keys.token("sec", roles=["security"]))
    token = keys.token("hr-bot")
    explain = {"token": token, "request": "GET /v1/employees/42"}
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.admin + "/v1/explain", headers=operator, json=explain) as r:
            assert r.status == 200
            assert (await r.json())["decision"]["effect"] == "allow"
        async with s.post(
            proxy.admin + "/v1/revocations",
            headers=operator,
            json={"agent": "hr-bot", "reason": "key leaked"},
        ) as r:
            assert r.status == 201
        async with s.get(proxy.base + "/v1/employees/42", headers=auth(token)) as r:
            assert r.status == 403
            served = await r.json(content_type=None)
        async with s.post(proxy.admin + "/v1/explain", headers=operator, json=explain) as r:
            assert r.status == 403
            explained = await problem(r)
    assert explained["detail"] == served["detail"]
    assert "revoked" in explained["detail"] and "key leaked" in explained["detail"]


async def test_the_approvals_list_pages_through_thousands_within_the_store_bound(
    make_proxy: ProxyFactory, keys: Keys, make_redis_server: MakeRedisServer
) -> None:
    """1,200 pending approvals on Redis with its default 50 ms bound per store call: every page
    answers (a single 1,000-item listing hit the bound and answered 503), the pages hold each
    approval once, and a cursor the API never gave is a 400."""
    import uuid

    from agentproxy.approvals.lifecycle import Approval, State

    redis = make_redis_server()
    proxy = await make_proxy(
        policy=APPROVALS, extra=f'{OPERATORS}\nstore: {{redis: {{url: "{redis.url}"}}}}'
    )
    store = proxy.server.services.store
    now = proxy.server.services.clock.now()
    for i in range(1200):
        approval = Approval(
            id=uuid.uuid4().hex,
            fingerprint=f"fp-{i}",
            state=State.PENDING,
            rule="transfers",
            reason="",
            agent=f"bot-{i % 30}",
            user=None,
            chain=(f"bot-{i % 30}",),
            action="http:POST /v1/transfers",
            summary={"i": i},
            approvers=("role:finance",),
            created=now,
            expires=now + 600 + i,
        )
        assert await store.open_approval(
            approval, now, max_pending=5000, max_pending_per_agent=5000
        )
    operator = auth(keys.token("sec", roles=["security"]))
    seen: list[str] = []
    async with aiohttp.ClientSession() as s:

        async def walk() -> list[str]:
            ids: list[str] = []
            query = "state=pending"
            while True:
                async with s.get(f"{proxy.admin}/v1/approvals?{query}", headers=operator) as r:
                    assert r.status == 200, await r.text()
                    page = await r.json()
                assert len(page["approvals"]) <= 100
                ids += [a["id"] for a in page["approvals"]]
                if page["next_cursor"] is None:
                    return ids
                query = f"state=pending&cursor={page['next_cursor']}"

        # Four approvers paging at once, as a console under load would.
        walks = await asyncio.gather(*(walk() for _ in range(4)))
        seen = walks[0]
        async with s.get(f"{proxy.admin}/v1/approvals?cursor=bm90LW9uZQ", headers=operator) as r:
            assert r.status == 400 and "cursor" in (await problem(r))["detail"]
        async with s.get(f"{proxy.admin}/v1/approvals?limit=5000", headers=operator) as r:
            assert r.status == 400
    assert len(seen) == len(set(seen)) == 1200
    assert all(walk == seen for walk in walks)
