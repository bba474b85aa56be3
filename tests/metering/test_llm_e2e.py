"""LLM calls through the proxy with the official `openai` and `anthropic` clients: tokens and
cost exact, streams unbuffered, usage injected and hidden, budgets charged with real cost."""

from __future__ import annotations

import asyncio
from typing import Any

import anthropic
import openai
import pytest

from tests.conftest import Keys, Proxy, ProxyFactory
from tests.harness.llm_upstream import LlmUpstream, SlowStream, Usage
from tests.metering.conftest import PrometheusFactory
from tests.metering.test_tool_cost import metric_sum

POLICY = """
default: deny
rules:
  - id: chat
    agents: [writer, "role:llm"]
    actions: ["llm:chat/**", "llm:messages/**", "llm:embeddings/**", "llm:responses/**"]
    when: '!has(args.max_tokens) || args.max_tokens <= 4000'
    effect: allow
  - id: budgeted
    agents: [spender]
    actions: ["llm:chat/**"]
    effect: allow
    cost: {amount: 0, currency: USD}
    limits:
      - {name: llm-budget, spend: 0.01, currency: USD, window: 1h, key: agent}
"""

METERING = """
metering:
  currency: USD
  prices:
    "gpt-4o-mini*": {input_per_mtok: 0.15, output_per_mtok: 0.6}
    "gpt-4o*": {input_per_mtok: 2.5, output_per_mtok: 10, cached_input_per_mtok: 1.25}
    "claude-*": {input_per_mtok: 3, output_per_mtok: 15, cached_input_per_mtok: 0.3}
  attribution: {labels: {team: principal.claims.team}, max_values: 10}
"""


@pytest.fixture
async def llm_proxy(make_proxy: ProxyFactory, llm_upstream: LlmUpstream) -> Proxy:
    return await make_proxy(
        policy=POLICY,
        upstream_url=llm_upstream.url,
        upstream_extra="    protocol: llm",
        extra=METERING,
    )


async def scrape(proxy: Proxy) -> str:
    import aiohttp

    async with aiohttp.ClientSession() as s, s.get(proxy.admin + "/metrics") as r:
        return await r.text()


def oai(proxy: Proxy, token: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.base + "/v1", api_key=token, max_retries=0)


async def test_openai_chat_tokens_and_cost_are_exact(
    llm_proxy: Proxy, llm_upstream: LlmUpstream, keys: Keys
) -> None:
    llm_upstream.usage["gpt-4o"] = Usage(input=1000, output=500, cached_input=200)
    llm_upstream.served_model["gpt-4o"] = "gpt-4o-2024-08-06"
    async with oai(llm_proxy, keys.token("writer", team="docs")) as client:
        reply = await client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
        )
    assert reply.usage is not None and reply.usage.completion_tokens == 500
    text = await scrape(llm_proxy)
    expected = (1000 * 2.5 + 200 * 1.25 + 500 * 10) / 1e6
    cost = metric_sum(
        text,
        "agentproxy_cost_total",
        agent="writer",
        team="docs",
        model="gpt-4o-2024-08-06",
        action="llm:chat/**",
    )
    assert abs(cost - expected) < 1e-12
    assert metric_sum(text, "agentproxy_tokens_total", type="input") == 1000
    assert metric_sum(text, "agentproxy_tokens_total", type="cached_input") == 200
    assert metric_sum(text, "agentproxy_tokens_total", type="output") == 500
    # the upstream's own key is injected; the agent's token never reaches it
    assert "Bearer" not in llm_upstream.received[-1].headers.get("Authorization", "")


async def test_streamed_usage_is_counted_and_hidden_unless_asked(
    llm_proxy: Proxy, llm_upstream: LlmUpstream, keys: Keys
) -> None:
    llm_upstream.usage["gpt-4o-mini"] = Usage(input=4000, output=1000)
    async with oai(llm_proxy, keys.token("writer")) as client:
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        chunks = [chunk async for chunk in stream]
        assert all(chunk.usage is None for chunk in chunks)  # the client did not ask
        assert llm_upstream.bodies("/v1/chat/completions")[-1]["stream_options"] == {
            "include_usage": True
        }
        stream = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        asked = [chunk async for chunk in stream]
        assert asked[-1].usage is not None and asked[-1].usage.prompt_tokens == 4000
    text = await scrape(llm_proxy)
    expected = 2 * (4000 * 0.15 + 1000 * 0.6) / 1e6
    assert abs(metric_sum(text, "agentproxy_cost_total", model="gpt-4o-mini") - expected) < 1e-12


async def test_anthropic_messages_streamed_and_not(
    llm_proxy: Proxy, llm_upstream: LlmUpstream, keys: Keys
) -> None:
    llm_upstream.usage["claude-sonnet"] = Usage(input=300, output=120, cached_input=1000)
    client = anthropic.AsyncAnthropic(
        base_url=llm_proxy.base,
        api_key="unused",
        max_retries=0,
        default_headers={"Authorization": f"Bearer {keys.token('writer')}"},
    )
    async with client:
        message = await client.messages.create(
            model="claude-sonnet", max_tokens=200, messages=[{"role": "user", "content": "hi"}]
        )
        assert message.usage.output_tokens == 120
        async with client.messages.stream(
            model="claude-sonnet", max_tokens=200, messages=[{"role": "user", "content": "hi"}]
        ) as stream:
            final = await stream.get_final_message()
        assert final.usage.output_tokens == 120
    text = await scrape(llm_proxy)
    one = (300 * 3 + 1000 * 0.3 + 120 * 15) / 1e6
    assert abs(metric_sum(text, "agentproxy_cost_total", model="claude-sonnet") - 2 * one) < 1e-12
    assert (
        metric_sum(text, "agentproxy_tokens_total", model="claude-sonnet", type="cached_input")
        == 2000
    )


async def test_a_big_stream_is_not_held_back(
    llm_proxy: Proxy, llm_upstream: LlmUpstream, keys: Keys
) -> None:
    slow = SlowStream()
    llm_upstream.slow["gpt-4o"] = slow
    async with oai(llm_proxy, keys.token("writer")) as client:
        stream = await client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "a lot"}], stream=True
        )
        iterator = stream.__aiter__()
        first = await asyncio.wait_for(iterator.__anext__(), 5)
        assert first.choices  # the first event arrived while the upstream still holds the last
        assert not slow.finished.is_set()
        slow.release.set()
        rest = [chunk async for chunk in iterator]
    assert len(rest) > 10
    assert metric_sum(await scrape(llm_proxy), "agentproxy_tokens_total", model="gpt-4o") > 0


async def test_policy_reads_llm_arguments(llm_proxy: Proxy, keys: Keys) -> None:
    async with oai(llm_proxy, keys.token("writer")) as client:
        with pytest.raises(openai.PermissionDeniedError) as refused:
            await client.chat.completions.create(
                model="gpt-4o", max_tokens=100_000, messages=[{"role": "user", "content": "hi"}]
            )
    assert "decision_id" in str(refused.value.body)


async def test_unknown_models_are_counted_in_tokens_and_flagged(
    llm_proxy: Proxy, llm_upstream: LlmUpstream, keys: Keys
) -> None:
    llm_upstream.usage["mystery-1"] = Usage(input=10, output=5)
    async with oai(llm_proxy, keys.token("writer")) as client:
        await client.embeddings.create(model="mystery-1", input="hello")
    text = await scrape(llm_proxy)
    assert metric_sum(text, "agentproxy_unpriced_tokens_total", model="mystery-1") == 10
    assert metric_sum(text, "agentproxy_cost_total", model="mystery-1") == 0


async def test_budgets_are_charged_with_the_real_cost(
    llm_proxy: Proxy, llm_upstream: LlmUpstream, keys: Keys
) -> None:
    llm_upstream.usage["gpt-4o"] = Usage(input=1000, output=500)  # 0.0075 a call
    statuses: list[Any] = []
    async with oai(llm_proxy, keys.token("spender")) as client:
        for _ in range(3):
            try:
                await client.chat.completions.create(
                    model="gpt-4o", max_tokens=100, messages=[{"role": "user", "content": "hi"}]
                )
                statuses.append(200)
            except openai.RateLimitError:
                statuses.append(429)
    # the second call starts with 0.0075 spent (under 0.01); the third with 0.015: refused
    assert statuses == [200, 200, 429]


async def test_prometheus_scrapes_cost_by_agent(
    llm_proxy: Proxy, llm_upstream: LlmUpstream, keys: Keys, make_prometheus: PrometheusFactory
) -> None:
    llm_upstream.usage["gpt-4o"] = Usage(input=2000, output=1000)  # 0.015 a call
    async with oai(llm_proxy, keys.token("writer")) as client:
        for _ in range(2):
            await client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "x"}]
            )
    prometheus = await make_prometheus(llm_proxy.admin.removeprefix("http://"))
    rows = await prometheus.wait_for(
        'sum by (agent) (agentproxy_cost_total{agent="writer"})',
        lambda result: bool(result) and abs(float(result[0]["value"][1]) - 0.03) < 1e-9,
        timeout=20,
    )
    assert rows[0]["metric"]["agent"] == "writer"
