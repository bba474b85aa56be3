"""LLM spend that cannot be bypassed (issue 25, part), with the official SDKs: refusals in the
provider's own error shape, the normalized `llm` facts in CEL (every spelling of the output
cap), and spend limits on LLM rules that need no rule cost."""

from __future__ import annotations

import asyncio
from typing import Any

import anthropic
import openai
import pytest

from tests.conftest import Keys, Proxy, ProxyFactory
from tests.harness.llm_upstream import LlmUpstream, Usage
from tests.metering.test_llm_e2e import METERING, oai
from tests.proxy.conftest import captured, log_records

POLICY = """
default: deny
rules:
  - id: capped
    agents: [writer]
    actions: ["llm:**"]
    when: 'llm.max_output_tokens != null && llm.max_output_tokens <= 1000'
    effect: allow
  - id: no-web
    agents: ["*"]
    actions: ["llm:**"]
    when: '"web_search" in llm.tools || "shell" in llm.tools'
    effect: deny
    reason: agents get no web search or shell tools
  - id: budgeted
    agents: [spender]
    actions: ["llm:chat/**"]
    effect: allow
    limits:
      - {name: llm-budget, spend: 0.05, currency: USD, window: 1h, key: agent}
"""


@pytest.fixture
async def proxy(make_proxy: ProxyFactory, llm_upstream: LlmUpstream) -> Proxy:
    return await make_proxy(
        policy=POLICY,
        upstream_url=llm_upstream.url,
        upstream_extra="    protocol: llm",
        extra=METERING,
    )


async def test_every_spelling_of_the_output_cap_is_one_fact(
    proxy: Proxy, llm_upstream: LlmUpstream, keys: Keys
) -> None:
    messages: Any = [{"role": "user", "content": "hi"}]
    async with oai(proxy, keys.token("writer")) as client:
        await client.chat.completions.create(model="gpt-4o", max_tokens=500, messages=messages)
        # What LangChain sends, and the Responses API's spelling: the same cap to policy.
        with pytest.raises(openai.PermissionDeniedError) as chat:
            await client.chat.completions.create(
                model="gpt-4o", max_completion_tokens=5000, messages=messages
            )
        with pytest.raises(openai.PermissionDeniedError):
            await client.responses.create(model="gpt-4o", input="hi", max_output_tokens=9999)
        await client.responses.create(model="gpt-4o", input="hi", max_output_tokens=999)
        # No cap at all is not under the cap.
        with pytest.raises(openai.PermissionDeniedError):
            await client.chat.completions.create(model="gpt-4o", messages=messages)
        # Tools, in every API's shape.
        with pytest.raises(openai.PermissionDeniedError) as tools:
            await client.responses.create(
                model="gpt-4o", input="hi", max_output_tokens=10, tools=[{"type": "web_search"}]
            )
    # The SDK shows why, in OpenAI's own error shape, with the decision id.
    error = chat.value.body
    assert isinstance(error, dict)
    assert error["type"] == "permission_error" and error["code"] == "denied"
    assert "no rule allows llm:chat/gpt-4o" in error["message"]
    assert error["decision_id"] and "no rule allows" in str(chat.value)
    assert isinstance(tools.value.body, dict)
    assert tools.value.body["message"] == "agents get no web search or shell tools"
    assert tools.value.body["rule"] == "no-web"
    assert [r.path for r in llm_upstream.received] == ["/v1/chat/completions", "/v1/responses"]


async def test_anthropic_refusals_are_anthropic_errors(
    proxy: Proxy, llm_upstream: LlmUpstream, keys: Keys
) -> None:
    client = anthropic.AsyncAnthropic(
        base_url=proxy.base,
        api_key="unused",
        max_retries=0,
        default_headers={"Authorization": f"Bearer {keys.token('writer')}"},
    )
    async with client:
        await client.messages.create(
            model="claude-sonnet", max_tokens=200, messages=[{"role": "user", "content": "hi"}]
        )
        with pytest.raises(anthropic.PermissionDeniedError) as refused:
            await client.messages.create(
                model="claude-sonnet",
                max_tokens=200,
                messages=[{"role": "user", "content": "hi"}],
                tools=[{"name": "shell", "input_schema": {"type": "object"}}],
            )
    body = refused.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "permission_error"
    assert body["error"]["message"] == "agents get no web search or shell tools"
    assert body["error"]["decision_id"]
    # A call without a token: Anthropic's authentication error, also before any body is read.
    bare = anthropic.AsyncAnthropic(base_url=proxy.base, api_key="unused", max_retries=0)
    async with bare:
        with pytest.raises(anthropic.AuthenticationError) as unauthenticated:
            await bare.messages.create(
                model="claude-sonnet", max_tokens=10, messages=[{"role": "user", "content": "x"}]
            )
    assert isinstance(unauthenticated.value.body, dict)
    assert unauthenticated.value.body["error"]["type"] == "authentication_error"


async def test_a_spend_limit_on_an_llm_rule_needs_no_rule_cost_and_holds_under_concurrency(
    proxy: Proxy, llm_upstream: LlmUpstream, keys: Keys
) -> None:
    # 0.00505 a call (20 tokens in, 500 out at gpt-4o's prices), reserved before the call from
    # the request (a token per 3 bytes of body, and its max_tokens): fifty concurrent calls
    # against 0.05 may never overspend.
    llm_upstream.usage["gpt-4o"] = Usage(input=20, output=500)
    async with oai(proxy, keys.token("spender")) as client:

        async def one() -> int:
            try:
                await client.chat.completions.create(
                    model="gpt-4o", max_tokens=500, messages=[{"role": "user", "content": "hi"}]
                )
            except openai.RateLimitError as exc:
                assert isinstance(exc.body, dict) and exc.body["type"] == "rate_limit_exceeded"
                assert exc.body["limit"] == "llm-budget"
                return 429
            return 200

        statuses = await asyncio.gather(*(one() for _ in range(50)))
    served = statuses.count(200)
    assert served == 9 and served * 0.00505 <= 0.05, statuses
    assert len(llm_upstream.bodies("/v1/chat/completions")) == served


async def test_cached_input_is_logged_with_the_genai_names(
    make_proxy: ProxyFactory,
    llm_upstream: LlmUpstream,
    keys: Keys,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Started in the test: the proxy's log must write to the stdout capsys captures.
    proxy = await make_proxy(
        policy=POLICY,
        upstream_url=llm_upstream.url,
        upstream_extra="    protocol: llm",
        extra=METERING,
    )
    llm_upstream.usage["gpt-4o"] = Usage(input=1000, output=50, cached_input=400)
    async with oai(proxy, keys.token("writer")) as client:
        await client.chat.completions.create(
            model="gpt-4o", max_tokens=100, messages=[{"role": "user", "content": "hi"}]
        )
    out, _ = captured(capsys, proxy)
    (record,) = [r for r in log_records(out) if r.get("gen_ai.operation.name") == "chat"]
    # GenAI's input_tokens counts the cached ones too; cache_read says how many they were.
    assert record["gen_ai.usage.input_tokens"] == 1400
    assert record["gen_ai.usage.cache_read.input_tokens"] == 400
    assert record["gen_ai.usage.output_tokens"] == 50
    assert abs(record["cost"]["amount"] - (1000 * 2.5 + 400 * 1.25 + 50 * 10) / 1e6) < 1e-12


async def test_langchain_and_the_agents_sdk_show_why_a_call_is_refused(
    proxy: Proxy, llm_upstream: LlmUpstream, keys: Keys
) -> None:
    from agents import (
        Agent,
        ModelSettings,
        OpenAIChatCompletionsModel,
        Runner,
        set_tracing_disabled,
    )
    from langchain_openai import ChatOpenAI
    from pydantic import SecretStr

    set_tracing_disabled(True)  # the Agents SDK would export its traces to OpenAI
    token = keys.token("writer")
    base = proxy.base + "/v1"

    # LangChain sends max_tokens as max_completion_tokens: the cap holds whichever it sends.
    def chat(max_tokens: int) -> Any:
        settings: dict[str, Any] = {"max_tokens": max_tokens}  # a pydantic alias mypy misses
        return ChatOpenAI(
            model="gpt-4o", base_url=base, api_key=SecretStr(token), max_retries=0, **settings
        )

    small, large = chat(500), chat(5000)
    try:
        ok = await small.ainvoke("hi")
        assert ok.content
        with pytest.raises(openai.PermissionDeniedError) as refused:
            await large.ainvoke("hi")
    finally:
        for model_client in (small, large):  # their own HTTP clients, else left open
            await model_client.root_async_client.close()
            model_client.root_client.close()
    assert "no rule allows llm:chat/gpt-4o" in str(refused.value)
    sent = llm_upstream.bodies("/v1/chat/completions")
    assert len(sent) == 1

    client = openai.AsyncOpenAI(base_url=base, api_key=token, max_retries=0)
    model = OpenAIChatCompletionsModel(model="gpt-4o", openai_client=client)
    agent = Agent(name="writer", model=model, model_settings=ModelSettings(max_tokens=500))
    result = await Runner.run(agent, "hi")
    assert result.final_output
    greedy = Agent(name="writer", model=model, model_settings=ModelSettings(max_tokens=9000))
    with pytest.raises(openai.PermissionDeniedError) as agents_refused:
        await Runner.run(greedy, "hi")
    assert "no rule allows llm:chat/gpt-4o" in str(agents_refused.value)
    assert isinstance(agents_refused.value.body, dict)
    assert agents_refused.value.body["decision_id"]
    await client.close()
