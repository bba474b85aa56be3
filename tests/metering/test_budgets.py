"""Budgets a fleet cannot overspend, and that say what is left (issue 25): two proxies on one
Redis, the official OpenAI SDK from many concurrent agents' calls, the remaining budget in
each answer's header, and the budgets on the admin API and the CLI."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Any

import aiohttp
import openai

from tests.conftest import Keys, ProxyFactory
from tests.harness.llm_upstream import LlmUpstream, Usage
from tests.metering.test_llm_e2e import METERING

POLICY = """
default: deny
rules:
  - id: budgeted
    agents: [spender]
    actions: ["llm:chat/**"]
    effect: allow
    limits:
      - {name: team-budget, spend: 0.05, currency: USD, window: day, key: agent}
"""


async def test_two_replicas_on_redis_never_overspend_and_say_what_is_left(
    make_proxy: ProxyFactory, llm_upstream: LlmUpstream, keys: Keys, make_redis_server: Any
) -> None:
    redis = make_redis_server()
    store = f"store: {{redis: {{url: '{redis.url}', timeout: 500ms}}}}"
    replicas = [
        await make_proxy(
            policy=POLICY,
            upstream_url=llm_upstream.url,
            upstream_extra="    protocol: llm",
            extra=METERING + store + '\nadmin: {operators: ["role:finance"]}',
        )
        for _ in range(2)
    ]
    # 20 tokens in, 500 out at gpt-4o's prices: 0.00505 a call, reserved before it from the
    # body and max_tokens (never less than it costs).
    llm_upstream.usage["gpt-4o"] = Usage(input=20, output=500)
    token = keys.token("spender")
    clients = [
        openai.AsyncOpenAI(base_url=p.base + "/v1", api_key=token, max_retries=0) for p in replicas
    ]
    remaining: list[str] = []

    async def one(i: int) -> int:
        try:
            raw = await clients[i % 2].chat.completions.with_raw_response.create(
                model="gpt-4o", max_tokens=500, messages=[{"role": "user", "content": "hi"}]
            )
        except openai.RateLimitError:
            return 429
        remaining.append(raw.headers["X-Agentproxy-Budget-Remaining"])
        return 200

    statuses = await asyncio.gather(*(one(i) for i in range(40)))
    for client in clients:
        await client.close()
    served = statuses.count(200)
    assert served == 9 and served * 0.00505 <= 0.05, statuses
    assert len(llm_upstream.bodies("/v1/chat/completions")) == served
    assert all(r.startswith("team-budget=") and r.endswith(" USD") for r in remaining)
    assert min(float(r.split("=")[1].split()[0]) for r in remaining) < 0.01

    operator = keys.token("cfo", roles=["finance"])
    async with (
        aiohttp.ClientSession() as s,
        s.get(
            replicas[1].admin + "/v1/budgets", headers={"Authorization": f"Bearer {operator}"}
        ) as r,
    ):
        assert r.status == 200
        (budget,) = (await r.json())["budgets"]
    assert budget["limit"] == "team-budget" and budget["window"] == "day"
    (counter,) = budget["counters"]
    assert counter["key"] == "agent=spender"
    assert abs(counter["used"] - served * 0.00505) < 1e-9  # settled with the real cost
    assert counter["window_start"].endswith("T00:00:00Z")
    out = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "agentproxy",
            "budgets",
            "show",
            "--admin",
            replicas[0].admin,
            "--token",
            operator,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "team-budget: 0.05 USD per day (rules budgeted)" in out.stdout
    assert "agent=spender  used 0.04545" in out.stdout
