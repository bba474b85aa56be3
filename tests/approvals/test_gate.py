"""Approval gates through a real proxy: hold, approve, deny, expire, four-eyes, grants, caps."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import orjson
import pytest

from agentproxy.approvals.lifecycle import Event
from tests.conftest import Keys, Proxy, ProxyFactory, Upstream
from tests.harness.clock import FakeClock

POLICY = """
default: deny
rules:
  - id: small-transfers
    agents: [pay-bot]
    actions: ["http:POST /v1/transfers"]
    when: 'int(resource.query.amount) <= 100'
    effect: allow
  - id: big-transfers
    agents: [pay-bot]
    actions: ["http:POST /v1/transfers"]
    when: 'int(resource.query.amount) > 100'
    effect: require_approval
    reason: transfers above 100 need a human
    approval: {approvers: ["role:finance", "user:carol"], timeout: 1h, hold: HOLD, grant: GRANT}
"""


def policy(hold: str = "0s", grant: str = "once", timeout: str = "1h") -> str:
    return (
        POLICY.replace("HOLD", hold)
        .replace("GRANT", grant)
        .replace("timeout: 1h", f"timeout: {timeout}")
    )


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def transfer(
    s: aiohttp.ClientSession, proxy: Proxy, token: str, amount: int
) -> tuple[int, dict[str, Any]]:
    async with s.post(f"{proxy.base}/v1/transfers?amount={amount}", headers=auth(token)) as r:
        raw = await r.read()
        body = orjson.loads(raw) if raw else {}
        if "Retry-After" in r.headers:
            body["_retry_after"] = r.headers["Retry-After"]
        return r.status, body


async def pending(s: aiohttp.ClientSession, proxy: Proxy, token: str) -> list[dict[str, Any]]:
    """Every pending approval the token may see, page by page."""
    found: list[dict[str, Any]] = []
    query = "state=pending&limit=300"
    while True:
        async with s.get(f"{proxy.admin}/v1/approvals?{query}", headers=auth(token)) as r:
            assert r.status == 200, await r.text()
            page = await r.json()
        found += page["approvals"]
        if page["next_cursor"] is None:
            return found
        query = f"state=pending&limit=300&cursor={page['next_cursor']}"


async def decide(
    s: aiohttp.ClientSession,
    proxy: Proxy,
    token: str,
    approval_id: str,
    verb: str,
    reason: str = "",
) -> int:
    async with s.post(
        f"{proxy.admin}/v1/approvals/{approval_id}/{verb}",
        headers=auth(token),
        json={"reason": reason},
    ) as r:
        await r.read()
        return r.status


async def test_approve_while_the_call_is_held(
    make_proxy: ProxyFactory, keys: Keys, upstream: Upstream
) -> None:
    proxy = await make_proxy(policy=policy(hold="5s"))
    bot, carol = keys.token("pay-bot"), keys.token("carol")
    async with aiohttp.ClientSession() as s:
        held = asyncio.ensure_future(transfer(s, proxy, bot, 5000))
        deadline = time.monotonic() + 3
        while not (waiting := await pending(s, proxy, carol)):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        (approval,) = waiting
        assert approval["agent"] == "pay-bot" and approval["rule"] == "big-transfers"
        assert approval["action"] == "http:POST /v1/transfers"
        assert not held.done()
        assert (
            await decide(s, proxy, carol, approval["id"], "approve", "checked the invoice") == 200
        )
        status, _ = await asyncio.wait_for(held, 3)
        assert status == 200
    seen = upstream.seen[-1].headers
    assert seen["X-Agentproxy-Approval"] == approval["id"]


async def test_pending_then_retry_once_granted(
    make_proxy: ProxyFactory, keys: Keys, upstream: Upstream
) -> None:
    proxy = await make_proxy(policy=policy())
    bot, carol = keys.token("pay-bot"), keys.token("finance-1", roles=["finance"])
    async with aiohttp.ClientSession() as s:
        status, body = await transfer(s, proxy, bot, 500)
        assert status == 403 and body["type"].endswith("/approval-pending")
        assert body["rule"] == "big-transfers" and int(body["_retry_after"]) >= 1
        approval_id = body["approval_id"]
        # The approver sees the query the grant is bound to.
        async with s.get(f"{proxy.admin}/v1/approvals/{approval_id}", headers=auth(carol)) as r:
            assert (await r.json())["query"] == {"amount": "500"}
        # an identical retry finds the same approval; another amount is another approval
        assert (await transfer(s, proxy, bot, 500))[1]["approval_id"] == approval_id
        other = (await transfer(s, proxy, bot, 501))[1]["approval_id"]
        assert other != approval_id
        assert await decide(s, proxy, carol, approval_id, "approve") == 200
        assert (await transfer(s, proxy, bot, 501))[0] == 403  # still pending: not this one
        assert (await transfer(s, proxy, bot, 500))[0] == 200
        # grant: once. The next identical call asks anew: a new approval, pending.
        status, body = await transfer(s, proxy, bot, 500)
        assert status == 403 and body["type"].endswith("/approval-pending")
        again = body["approval_id"]
        assert again != approval_id
        assert (await transfer(s, proxy, bot, 500))[1]["approval_id"] == again
        assert await decide(s, proxy, carol, again, "approve") == 200
        assert (await transfer(s, proxy, bot, 500))[0] == 200
    assert len(upstream.seen) == 2


async def test_deny_refuses_the_retry_with_the_reason(
    make_proxy: ProxyFactory, keys: Keys, upstream: Upstream
) -> None:
    proxy = await make_proxy(policy=policy())
    bot, carol = keys.token("pay-bot"), keys.token("carol")
    async with aiohttp.ClientSession() as s:
        approval_id = (await transfer(s, proxy, bot, 9000))[1]["approval_id"]
        # A denial needs a reason (the agent and the audit trail are told it).
        assert await decide(s, proxy, carol, approval_id, "deny", "   ") == 400
        assert (await transfer(s, proxy, bot, 9000))[1]["type"].endswith("/approval-pending")
        assert await decide(s, proxy, carol, approval_id, "deny", "not on the vendor list") == 200
        status, body = await transfer(s, proxy, bot, 9000)
        assert status == 403 and body["type"].endswith("/approval-denied")
        assert "not on the vendor list" in body["detail"] and "carol" in body["detail"]
        assert await decide(s, proxy, carol, approval_id, "approve") == 409  # no way back
    assert upstream.seen == []


async def test_four_eyes(make_proxy: ProxyFactory, keys: Keys) -> None:
    proxy = await make_proxy(policy=policy())
    bot = keys.token("pay-bot", roles=["finance"])
    async with aiohttp.ClientSession() as s:
        approval_id = (await transfer(s, proxy, bot, 700))[1]["approval_id"]
        for token in [
            bot,  # the requester itself
            keys.token("alice"),  # not an approver
            keys.token("carol", act={"sub": "assistant"}),  # a token acting for carol
        ]:
            assert await decide(s, proxy, token, approval_id, "approve") in (401, 403)
        async with s.get(f"{proxy.admin}/v1/approvals/{approval_id}") as r:
            assert r.status == 401
        # an agent acting for carol requests; carol herself cannot approve her own call
        delegated = keys.token("carol", act={"sub": "pay-bot"})
        own = (await transfer(s, proxy, delegated, 800))[1]["approval_id"]
        assert await decide(s, proxy, keys.token("carol"), own, "approve") == 403


async def test_ttl_grant_lets_retries_through(make_proxy: ProxyFactory, keys: Keys) -> None:
    proxy = await make_proxy(policy=policy(grant="{ttl: 1h}"))
    bot, carol = keys.token("pay-bot"), keys.token("carol")
    async with aiohttp.ClientSession() as s:
        approval_id = (await transfer(s, proxy, bot, 300))[1]["approval_id"]
        assert await decide(s, proxy, carol, approval_id, "approve") == 200
        assert [(await transfer(s, proxy, bot, 300))[0] for _ in range(3)] == [200, 200, 200]


async def test_a_held_call_whose_approval_times_out_is_told_it_expired(
    make_proxy: ProxyFactory, keys: Keys, upstream: Upstream
) -> None:
    proxy = await make_proxy(policy=policy(timeout="1s", hold="5s"))
    async with aiohttp.ClientSession() as s:
        status, body = await transfer(s, proxy, keys.token("pay-bot"), 450)
    assert status == 403 and body["type"].endswith("/approval-expired"), body
    assert upstream.seen == []


async def test_expiry_is_reported_as_expiry(make_proxy: ProxyFactory, keys: Keys) -> None:
    clock = FakeClock()
    proxy = await make_proxy(policy=policy(timeout="1s"), clock=clock)
    bot = keys.token("pay-bot")
    async with aiohttp.ClientSession() as s:
        assert (await transfer(s, proxy, bot, 400))[0] == 403
        clock.advance(1.3)  # past the 1s timeout, within the window a decision is kept
        status, body = await transfer(s, proxy, bot, 400)
        assert status == 403 and body["type"].endswith("/approval-expired")
        await proxy.server.services.approvals.check()  # the once-a-second expiry round
        async with s.get(proxy.admin + "/metrics") as r:
            text = await r.text()
        assert 'agentproxy_approvals_total{outcome="expired"} 1.0' in text


async def test_pending_caps(make_proxy: ProxyFactory, keys: Keys) -> None:
    proxy = await make_proxy(policy=policy(), extra="approvals: {max_pending_per_agent: 2}")
    bot = keys.token("pay-bot")
    async with aiohttp.ClientSession() as s:
        assert (await transfer(s, proxy, bot, 201))[0] == 403
        assert (await transfer(s, proxy, bot, 202))[0] == 403
        status, body = await transfer(s, proxy, bot, 203)
        assert status == 429 and body["type"].endswith("/approval-cap")


async def test_agents_at_their_caps_cannot_lock_others_out_of_approvals(
    make_proxy: ProxyFactory, keys: Keys
) -> None:
    """Four agents fill the total with their own caps; a fifth still gets its approval (and
    each of the four still gets 429), until twice the total."""
    proxy = await make_proxy(
        policy=policy().replace("agents: [pay-bot]", 'agents: ["*"]'),
        extra="approvals: {max_pending: 8, max_pending_per_agent: 2}",
    )
    async with aiohttp.ClientSession() as s:
        for agent in ("a1", "a2", "a3", "a4"):
            token = keys.token(agent)
            assert [(await transfer(s, proxy, token, 300 + i))[0] for i in range(3)] == [
                403,
                403,
                429,
            ]
        victim = keys.token("newcomer")
        status, body = await transfer(s, proxy, victim, 999)
        assert status == 403 and body["approval_id"]
        status, body = await transfer(s, proxy, keys.token("a1"), 998)
        assert status == 429 and body["type"].endswith("/approval-cap")


async def test_pending_caps_per_user(make_proxy: ProxyFactory, keys: Keys) -> None:
    proxy = await make_proxy(
        policy=policy().replace("agents: [pay-bot]", 'agents: ["*"]'),
        extra="approvals: {max_pending_per_user: 2}",
    )
    async with aiohttp.ClientSession() as s:
        for i, agent in enumerate(("b1", "b2", "b3")):
            status, _ = await transfer(s, proxy, keys.token("alice", act={"sub": agent}), 500 + i)
            assert status == (403 if i < 2 else 429), agent
        status, _ = await transfer(s, proxy, keys.token("bob", act={"sub": "b3"}), 600)
        assert status == 403


async def test_a_thousand_held_calls(
    make_proxy: ProxyFactory, keys: Keys, upstream: Upstream
) -> None:
    proxy = await make_proxy(
        policy=policy(hold="30s"),
        extra="approvals: {max_pending: 2000, max_pending_per_agent: 2000}",
        # 1000 calls released at once queue at the one test upstream on two cores
        timeout="60s",
    )
    bot = keys.token("pay-bot")
    carol = keys.token("finance-2", roles=["finance"])
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        held = [asyncio.ensure_future(transfer(s, proxy, bot, 1000 + i)) for i in range(1000)]
        deadline = time.monotonic() + 20
        while len(waiting := await pending(s, proxy, carol)) < 1000:
            assert time.monotonic() < deadline, len(waiting)
            await asyncio.sleep(0.2)
        approver = await proxy.server.backend.approver(carol)
        for approval in waiting:
            await proxy.server.backend.decide_approval(approval["id"], Event.APPROVE, approver, "")
        results = await asyncio.wait_for(asyncio.gather(*held), 30)
    assert [status for status, _ in results] == [200] * 1000
    assert len(upstream.seen) == 1000


async def test_pending_gauge_counts_past_the_list_limit(
    make_proxy: ProxyFactory, keys: Keys
) -> None:
    from agentproxy.approvals.lifecycle import Approval, State

    proxy = await make_proxy(policy=policy())
    now = time.time()
    for i in range(1200):
        approval = Approval(
            id=f"a{i:05d}",
            fingerprint=f"fp-{i}",
            state=State.PENDING,
            rule="big-transfers",
            reason="r",
            agent=f"bot-{i}",
            user=None,
            chain=(),
            action="http:POST /transfers",
            summary={},
            approvers=("user:carol",),
            created=now,
            expires=now + 3600,
        )
        opened = await proxy.server.store.open_approval(
            approval, now, max_pending=5000, max_pending_per_agent=5
        )
        assert opened is not None
    deadline = time.monotonic() + 5
    while (value := proxy.server.registry.get_sample_value("agentproxy_approvals_pending")) != 1200:
        assert time.monotonic() < deadline, f"gauge at {value}"  # lists stop at 1,000
        await asyncio.sleep(0.2)


async def test_the_cli_lists_approvals_with_times_chain_and_what_is_bound(
    make_proxy: ProxyFactory, keys: Keys
) -> None:
    import re
    import sys

    proxy = await make_proxy(policy=policy().replace("agents: [pay-bot]", 'agents: ["*"]'))
    bot = keys.token("alice", act={"sub": "pay-bot", "act": {"sub": "planner"}})
    async with aiohttp.ClientSession() as s:
        approval_id = (await transfer(s, proxy, bot, 640))[1]["approval_id"]

    async def cli(*args: str) -> str:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agentproxy",
            "approvals",
            *args,
            "--admin",
            proxy.admin,
            "--token",
            keys.token("carol"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await process.communicate()
        assert process.returncode == 0, err.decode()
        return out.decode()

    listed = await cli("list")
    assert approval_id in listed
    assert "pay-bot for alice (via planner)" in listed
    assert re.search(r"created \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ  expires \d{4}-", listed)
    assert 'query {"amount":"640"}' in listed and "sha256 " in listed
    shown = orjson.loads(await cli("show", approval_id))
    assert shown["query"] == {"amount": "640"} and shown["chain"] == ["planner"]


QUORUM_POLICY = """
default: deny
rules:
  - id: big-transfers
    agents: [pay-bot]
    actions: ["http:POST /v1/transfers"]
    effect: require_approval
    reason: two of the treasury must agree
    approval: {approvers: ["user:carol", "user:dave", "user:erin"], quorum: 2, hold: 0s}
"""


async def test_two_of_three_approvers_release_the_call(
    make_proxy: ProxyFactory, keys: Keys, upstream: Upstream, capsys: pytest.CaptureFixture[str]
) -> None:
    from agentproxy.admin.grpc import approval_message
    from agentproxy.approvals.lifecycle import Approval
    from agentproxy.cli import approval_lines

    proxy = await make_proxy(policy=QUORUM_POLICY)
    bot = keys.token("pay-bot")
    carol, dave, erin = keys.token("carol"), keys.token("dave"), keys.token("erin")
    async with aiohttp.ClientSession() as s:
        status, body = await transfer(s, proxy, bot, 500)
        assert status == 403 and body["type"].endswith("/approval-pending")
        approval_id = body["approval_id"]
        assert await decide(s, proxy, carol, approval_id, "approve", "checked") == 200
        # One of two: still pending, nothing released; carol cannot count twice.
        status, body = await transfer(s, proxy, bot, 500)
        assert status == 403 and body["approval_id"] == approval_id
        assert await decide(s, proxy, carol, approval_id, "approve") == 409
        assert not any(seen.path.startswith("/v1/transfers") for seen in upstream.seen)
        async with s.get(f"{proxy.admin}/v1/approvals/{approval_id}", headers=auth(erin)) as r:
            shown = await r.json()
        assert shown["quorum"] == 2 and [v["by"] for v in shown["votes"]] == ["carol"]
        assert "approvals 1 of 2: carol at " in approval_lines(shown)
        message = approval_message(Approval.from_json(shown))
        assert message.quorum == 2 and [v.by for v in message.votes] == ["carol"]
        assert await decide(s, proxy, dave, approval_id, "approve", "agreed") == 200
        status, _ = await transfer(s, proxy, bot, 500)
        assert status == 200
        # Another: one denial refuses it, whatever approvals came before.
        status, body = await transfer(s, proxy, bot, 900)
        second = body["approval_id"]
        assert await decide(s, proxy, erin, second, "approve") == 200
        assert await decide(s, proxy, carol, second, "deny", "not this vendor") == 200
        status, body = await transfer(s, proxy, bot, 900)
        assert status == 403 and body["type"].endswith("/approval-denied")
    out = capsys.readouterr().out
    events = [
        orjson.loads(line)["event"]
        for line in out.splitlines()
        if line.startswith("{") and '"kind":"approval"' in line
    ]
    assert events[:4] == ["requested", "voted", "approved", "used"]
    assert events[4:] == ["requested", "voted", "denied"]
