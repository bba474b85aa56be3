"""Metering under attack: budgets hold under concurrency when requests name no max_tokens
(each call reserves the model's output cap before it starts, so 20 calls at once cannot all
start on one unspent budget), and junk model names cannot poison the cardinality guard."""

from __future__ import annotations

import asyncio

import openai
import pytest

from agentproxy.config.model import Price
from agentproxy.metering.prices import PriceTable
from tests.conftest import Keys, ProxyFactory
from tests.harness.llm_upstream import LlmUpstream, SlowStream, Usage
from tests.metering.test_llm_e2e import oai, scrape
from tests.metering.test_tool_cost import metric_sum

POLICY = """
default: deny
rules:
  - id: budgeted
    agents: [spender]
    actions: ["llm:chat/**"]
    effect: allow
    cost: {amount: 0, currency: USD}
    limits:
      - {name: llm-budget, spend: 0.5, currency: USD, window: 1h, key: agent}
"""

METERING = """
metering:
  currency: USD
  prices:
    "gpt-4o": {input_per_mtok: 2.5, output_per_mtok: 10, max_output_tokens: 16384}
    "gpt-4o-mini": {input_per_mtok: 0.15, output_per_mtok: 0.6}
  default_max_output_tokens: 2000
"""


async def test_concurrent_calls_without_max_tokens_cannot_overspend(
    make_proxy: ProxyFactory, llm_upstream: LlmUpstream, keys: Keys
) -> None:
    proxy = await make_proxy(
        policy=POLICY,
        upstream_url=llm_upstream.url,
        upstream_extra="    protocol: llm",
        extra=METERING,
    )
    llm_upstream.usage["gpt-4o"] = Usage(input=1000, output=10_000)  # 0.1025 USD a call
    slow = SlowStream(events=4, total_bytes=64)  # every answer is held until released
    llm_upstream.slow["gpt-4o"] = slow
    async with oai(proxy, keys.token("spender")) as client:

        async def start() -> object:
            try:
                stream = await client.chat.completions.create(
                    model="gpt-4o",
                    messages=[{"role": "user", "content": "hi"}],
                    stream=True,
                    stream_options={"include_usage": True},
                )
            except openai.RateLimitError:
                return 429
            return stream

        started = await asyncio.gather(*(start() for _ in range(20)))
        streams = [s for s in started if s != 429]
        # Each reserves 16,384 output tokens (0.164 USD) before it starts: three fit in 0.5.
        assert len(streams) == 3
        assert len(llm_upstream.bodies("/v1/chat/completions")) == 3
        slow.release.set()
        for stream in streams:
            assert [chunk async for chunk in stream]  # type: ignore[attr-defined]
        # Settled with the real cost (3 x 0.1025): the rest of the budget is free again.
        await client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "one more"}], max_tokens=100
        )
    spent = metric_sum(await scrape(proxy), "agentproxy_cost_total", model="gpt-4o")
    assert spent == pytest.approx(4 * 0.1025)
    assert spent <= 0.5


def test_the_reserve_is_what_was_asked_else_the_models_cap_else_the_default() -> None:
    table = PriceTable(
        (("gpt-4o", Price(2.5, 10, max_output_tokens=16384)), ("gpt-*", Price(1, 1))),
        default_max_output_tokens=2000,
    )
    assert table.output_reserve("gpt-4o", 100) == 100
    assert table.output_reserve("gpt-4o", 0) == 0
    assert table.output_reserve("gpt-4o", None) == 16384
    assert table.output_reserve("gpt-3.5", None) == 2000
    assert table.output_reserve("unpriced", None) == 2000


async def test_junk_model_names_cannot_push_real_models_into_other(
    make_proxy: ProxyFactory, llm_upstream: LlmUpstream, keys: Keys
) -> None:
    """The cardinality guard gives a model a series only when the upstream answered a call for
    it, or the price table names it; 100 junk names the upstream refuses take no place."""
    policy = (
        'default: deny\nrules:\n  - {id: any, agents: ["*"], actions: ["llm:**"], effect: allow}\n'
    )
    metering = (
        "metering:\n  prices:\n"
        '    "gpt-4o": {input_per_mtok: 2.5, output_per_mtok: 10}\n'
        "  attribution: {max_values: 5}\n"
    )
    proxy = await make_proxy(
        policy=policy,
        upstream_url=llm_upstream.url,
        upstream_extra="    protocol: llm",
        extra=metering,
    )
    llm_upstream.models = {"gpt-4o", "unpriced-but-real"}
    llm_upstream.default_usage = Usage(input=10, output=10)
    async with oai(proxy, keys.token("sender")) as client:
        for i in range(100):
            with pytest.raises(openai.NotFoundError):
                await client.chat.completions.create(
                    model=f"junk-{i}", messages=[{"role": "user", "content": "x"}]
                )
        for model in ("gpt-4o", "unpriced-but-real"):
            await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "x"}]
            )
    text = await scrape(proxy)
    assert metric_sum(text, "agentproxy_tokens_total", model="gpt-4o") == 20
    assert metric_sum(text, "agentproxy_tokens_total", model="unpriced-but-real") == 20
    assert metric_sum(text, "agentproxy_calls_total", model="other") == 100
    assert "junk-" not in text
