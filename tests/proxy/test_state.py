"""Stateful decisions through a real proxy on the embedded memory store: limits, task
history, revocation, memoized decisions."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import aiohttp
import orjson

from tests.conftest import Keys, ProxyFactory, Upstream

POLICY = """
default: deny
rules:
  - id: reads
    agents: [hr-bot, reader]
    actions: ["http:GET /v1/employees/{id}"]
    effect: allow
    limits:
      - {name: read-rate, calls: 3, window: 1h, key: agent}
  - id: bulk
    agents: [bulk-bot]
    actions: ["http:GET /v1/bulk/{id}"]
    effect: allow
    limits:
      - {name: bulk-rate, calls: 100, window: 1h, key: agent}
  - id: per-task
    agents: [looper]
    actions: ["http:GET /v1/loop"]
    effect: allow
    limits:
      - {name: loop-guard, calls: 2, window: 1h, key: task}
  - id: paid
    agents: [payer]
    actions: ["http:POST /v1/pay"]
    effect: allow
    cost: {amount: 0.4, currency: USD}
    limits:
      - {name: pay-budget, spend: 1.0, currency: USD, window: 24h, key: 'principal.claims.team'}
  - id: read-pii
    agents: [mailer]
    actions: ["http:GET /v1/pii/{id}"]
    effect: allow
    obligations: {label_task: [pii]}
  - id: send-mail
    agents: [mailer]
    actions: ["http:POST /v1/mail"]
    effect: allow
  - id: no-mail-after-pii
    agents: ["*"]
    actions: ["http:POST /v1/mail"]
    when: '"pii" in task.labels'
    effect: deny
    reason: no external mail after this task has read personal data
"""

EXTRA = 'admin: {operators: ["role:security", root]}'


def auth(token: str, task: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {token}"}
    if task:
        headers["X-Agentproxy-Task"] = task
    return headers


async def test_calls_limit_answers_429_with_retry_after_and_limit(
    make_proxy: ProxyFactory, keys: Keys, upstream: Upstream
) -> None:
    proxy = await make_proxy(policy=POLICY)
    token = keys.token("reader")
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            async with s.get(proxy.base + "/v1/employees/1", headers=auth(token)) as r:
                assert r.status == 200
        async with s.get(proxy.base + "/v1/employees/1", headers=auth(token)) as r:
            assert r.status == 429
            body = orjson.loads(await r.read())
            retry_after = int(r.headers["Retry-After"])
    assert body["type"].endswith("/limit-exceeded")
    assert body["limit"] == "read-rate" and body["rule"] == "reads"
    assert 0 < retry_after <= 3600
    assert len(upstream.seen) == 3
    # another agent has its own counter
    async with (
        aiohttp.ClientSession() as s,
        s.get(proxy.base + "/v1/employees/1", headers=auth(keys.token("hr-bot"))) as r,
    ):
        assert r.status == 200


async def test_200_concurrent_calls_against_100_let_exactly_100_through(
    make_proxy: ProxyFactory, keys: Keys, upstream: Upstream
) -> None:
    proxy = await make_proxy(policy=POLICY)
    headers = auth(keys.token("bulk-bot"))
    connector = aiohttp.TCPConnector(limit=200)
    async with aiohttp.ClientSession(connector=connector) as s:

        async def one(i: int) -> int:
            async with s.get(f"{proxy.base}/v1/bulk/{i}", headers=headers) as r:
                await r.read()
                return r.status

        statuses = await asyncio.gather(*(one(i) for i in range(200)))
    assert statuses.count(200) == 100
    assert statuses.count(429) == 100
    assert len(upstream.seen) == 100


async def test_per_task_limit_stops_a_loop_but_stays_per_agent(
    make_proxy: ProxyFactory, keys: Keys
) -> None:
    proxy = await make_proxy(policy=POLICY)
    looper = keys.token("looper")
    async with aiohttp.ClientSession() as s:
        got = []
        for _ in range(4):
            async with s.get(proxy.base + "/v1/loop", headers=auth(looper, "t-1")) as r:
                got.append(r.status)
        assert got == [200, 200, 429, 429]
        # a new task starts a new count for this agent ...
        async with s.get(proxy.base + "/v1/loop", headers=auth(looper, "t-2")) as r:
            assert r.status == 200


async def test_spend_budget_keyed_by_a_cel_expression(make_proxy: ProxyFactory, keys: Keys) -> None:
    proxy = await make_proxy(policy=POLICY)
    a = keys.token("payer", team="blue")
    b = keys.token("payer", team="red")
    async with aiohttp.ClientSession() as s:
        statuses = []
        for _ in range(3):
            async with s.post(proxy.base + "/v1/pay", headers=auth(a)) as r:
                statuses.append(r.status)
        assert statuses == [200, 200, 429]  # 0.4 + 0.4 fits in 1.0; a third 0.4 does not
        async with s.post(proxy.base + "/v1/pay", headers=auth(b)) as r:
            assert r.status == 200
        # no team claim: the key expression errors, and the call is refused, not counted
        async with s.post(proxy.base + "/v1/pay", headers=auth(keys.token("payer"))) as r:
            assert r.status == 403
            assert "could not be evaluated" in (await r.json(content_type=None))["detail"]


async def test_task_history_denies_mail_after_pii(
    make_proxy: ProxyFactory, keys: Keys, upstream: Upstream
) -> None:
    proxy = await make_proxy(policy=POLICY)
    mailer = keys.token("mailer")
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.base + "/v1/mail", headers=auth(mailer, "task-a")) as r:
            assert r.status == 200
        async with s.get(proxy.base + "/v1/pii/7", headers=auth(mailer, "task-a")) as r:
            assert r.status == 200
        async with s.post(proxy.base + "/v1/mail", headers=auth(mailer, "task-a")) as r:
            assert r.status == 403
            body = await r.json(content_type=None)
        assert body["rule"] == "no-mail-after-pii"
        async with s.post(proxy.base + "/v1/mail", headers=auth(mailer, "task-b")) as r:
            assert r.status == 200


async def test_operator_revokes_an_agent_and_a_token(
    make_proxy: ProxyFactory, keys: Keys, upstream: Upstream
) -> None:
    proxy = await make_proxy(policy=POLICY, extra=EXTRA)
    reader = keys.token("reader", jti="tok-1")
    hr = keys.token("hr-bot", jti="tok-2")
    operator = keys.token("alice-sec", roles=["security"])
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.base + "/v1/employees/1", headers=auth(reader)) as r:
            assert r.status == 200
        # not an operator, a delegated token, no token, bad bodies
        for headers, body, status in [
            (auth(reader), {"agent": "reader"}, 403),
            (auth(keys.token("root", act={"sub": "helper"})), {"agent": "reader"}, 403),
            ({}, {"agent": "reader"}, 401),
            (auth(operator), {"agent": "reader", "token_id": "x"}, 400),
            (auth(operator), {"agent": "reader", "until": "someday"}, 400),
        ]:
            async with s.post(proxy.admin + "/v1/revocations", headers=headers, json=body) as r:
                assert r.status == status, (body, await r.text())
        async with s.post(
            proxy.admin + "/v1/revocations",
            headers=auth(operator),
            json={"agent": "reader", "reason": "incident 42"},
        ) as r:
            assert r.status == 201
            assert (await r.json())["by"] == "alice-sec"
        async with s.get(proxy.base + "/v1/employees/1", headers=auth(reader)) as r:
            assert r.status == 403
            assert "incident 42" in (await r.json(content_type=None))["detail"]
        async with s.post(
            proxy.admin + "/v1/revocations",
            headers=auth(operator),
            json={"token_id": "tok-2", "until": "1h"},
        ) as r:
            assert r.status == 201
        async with s.get(proxy.base + "/v1/employees/2", headers=auth(hr)) as r:
            assert r.status == 401
        fresh = keys.token("hr-bot", jti="tok-3")
        async with s.get(proxy.base + "/v1/employees/2", headers=auth(fresh)) as r:
            assert r.status == 200
    assert len(upstream.seen) == 2


async def test_memoized_decisions_are_counted(make_proxy: ProxyFactory, keys: Keys) -> None:
    proxy = await make_proxy()
    token = keys.token()
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            async with s.get(proxy.base + "/v1/employees/42", headers=auth(token)) as r:
                assert r.status == 200
        async with s.get(proxy.admin + "/metrics") as r:
            text = await r.text()
    assert 'agentproxy_decision_cache_total{result="hit"} 2.0' in text
    assert 'agentproxy_decision_cache_total{result="miss"} 1.0' in text


def test_cli_revoke_explains_the_memory_store(tmp_path: object, keys: Keys) -> None:
    from pathlib import Path

    from tests.conftest import write_config

    d = Path(str(tmp_path))
    path = write_config(d, keys, "http://127.0.0.1:9")
    out = subprocess.run(
        [sys.executable, "-m", "agentproxy", "revoke", "--config", str(path), "--agent", "x"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 1
    assert "POST /v1/revocations" in out.stderr and "store.redis" in out.stderr


TASK_POLICY = (
    POLICY
    + """
  - id: count-calls
    agents: [mailer, intruder]
    actions: ["http:GET /v1/ping"]
    effect: allow
    obligations: {label_task: [pinged]}
  - id: few-pings
    agents: ["*"]
    actions: ["http:GET /v1/ping"]
    when: "task.calls >= 2"
    effect: deny
    reason: this task has pinged enough
"""
)


async def test_task_history_is_per_agent(make_proxy: ProxyFactory, keys: Keys) -> None:
    """Another agent naming the same task id neither reads its labels nor adds its calls."""
    proxy = await make_proxy(policy=TASK_POLICY)
    mailer, intruder = keys.token("mailer"), keys.token("intruder")
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.base + "/v1/pii/7", headers=auth(mailer, "task-x")) as r:
            assert r.status == 200
        # The intruder's two pings in "task-x" are its own history, not the mailer's...
        for _ in range(2):
            async with s.get(proxy.base + "/v1/ping", headers=auth(intruder, "task-x")) as r:
                assert r.status == 200
        async with s.get(proxy.base + "/v1/ping", headers=auth(intruder, "task-x")) as r:
            assert r.status == 403
        # ...so the mailer's task has one call (the read) and can still ping once.
        async with s.get(proxy.base + "/v1/ping", headers=auth(mailer, "task-x")) as r:
            assert r.status == 200
        async with s.get(proxy.base + "/v1/ping", headers=auth(mailer, "task-x")) as r:
            assert r.status == 403
        # and the mailer's pii label is still its own: no mail from task-x.
        async with s.post(proxy.base + "/v1/mail", headers=auth(mailer, "task-x")) as r:
            assert r.status == 403


async def test_a_deployment_can_take_the_task_from_the_token_only(
    make_proxy: ProxyFactory, keys: Keys, upstream: Upstream
) -> None:
    """With `identity.task_from: [token]` an agent cannot shed its task's labels by naming a
    new task id: the header is refused, and the token's task is the one that counts."""
    proxy = await make_proxy(policy=POLICY)
    assert proxy.server.config.identity.task_from == ("token", "header")
    text = proxy.config_path.read_text().replace(
        "      algorithms: [RS256]\n", "      algorithms: [RS256]\n  task_from: [token]\n"
    )
    proxy.config_path.write_text(text)
    assert await proxy.server.reload()
    mailer = keys.token("mailer", task="ticket-1")
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.base + "/v1/pii/7", headers=auth(mailer)) as r:
            assert r.status == 200
        async with s.post(proxy.base + "/v1/mail", headers=auth(mailer, "fresh-task")) as r:
            assert r.status == 400
            body = await r.json(content_type=None)
        assert "identity.task_from" in body["detail"]
        async with s.post(proxy.base + "/v1/mail", headers=auth(mailer)) as r:
            assert r.status == 403  # the token's task read PII
    assert [seen.path for seen in upstream.seen] == ["/v1/pii/7"]
