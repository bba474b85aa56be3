"""The test LLM upstream, checked with the official `openai` and `anthropic` clients pointed at
it directly: if these clients accept its answers, a proxy test that puts agentproxy between
them measures the proxy, not the fixture."""

from __future__ import annotations

import asyncio

import anthropic
import openai
import pytest
from openai.types.responses import ResponseCompletedEvent

from tests.harness.llm_upstream import REPLY_TEXT, LlmUpstream, SlowStream, Usage

USAGE = Usage(input=1234, output=567, cached_input=89)


def openai_client(upstream: LlmUpstream) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=upstream.openai_base_url, api_key="sk-test", max_retries=0)


def anthropic_client(upstream: LlmUpstream) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=upstream.url, api_key="sk-ant-test", max_retries=0)


async def test_chat_completion(llm_upstream: LlmUpstream) -> None:
    llm_upstream.usage["gpt-4o"] = USAGE
    llm_upstream.served_model["gpt-4o"] = "gpt-4o-2024-08-06"
    async with openai_client(llm_upstream) as client:
        reply = await client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=50
        )
    assert reply.choices[0].message.content == REPLY_TEXT
    assert reply.model == "gpt-4o-2024-08-06"
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == 1234 + 89
    assert reply.usage.completion_tokens == 567
    assert reply.usage.total_tokens == 1234 + 89 + 567
    assert reply.usage.prompt_tokens_details is not None
    assert reply.usage.prompt_tokens_details.cached_tokens == 89
    (body,) = llm_upstream.bodies("/v1/chat/completions")
    assert body["max_tokens"] == 50
    assert llm_upstream.received[0].headers["Authorization"] == "Bearer sk-test"


async def test_chat_stream_usage_only_when_asked(llm_upstream: LlmUpstream) -> None:
    llm_upstream.usage["gpt-4o-mini"] = USAGE
    async with openai_client(llm_upstream) as client:
        plain = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        plain_chunks = [chunk async for chunk in plain]
        asked = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        asked_chunks = [chunk async for chunk in asked]
    assert all(chunk.usage is None for chunk in plain_chunks)
    text = "".join(c.choices[0].delta.content or "" for c in plain_chunks if c.choices)
    assert text == REPLY_TEXT
    *content, last = asked_chunks
    assert all(chunk.usage is None for chunk in content)
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (1234 + 89, 567)
    assert last.usage.prompt_tokens_details is not None
    assert last.usage.prompt_tokens_details.cached_tokens == 89
    first, second = llm_upstream.bodies("/v1/chat/completions")
    assert "stream_options" not in first
    assert second["stream_options"] == {"include_usage": True}


async def test_legacy_completions(llm_upstream: LlmUpstream) -> None:
    llm_upstream.usage["gpt-3.5-turbo-instruct"] = USAGE
    async with openai_client(llm_upstream) as client:
        reply = await client.completions.create(model="gpt-3.5-turbo-instruct", prompt="hi")
        stream = await client.completions.create(
            model="gpt-3.5-turbo-instruct",
            prompt="hi",
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (1234 + 89, 567)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == REPLY_TEXT
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 567


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
async def test_embeddings(llm_upstream: LlmUpstream, encoding_format: str) -> None:
    llm_upstream.usage["text-embedding-3-small"] = Usage(input=42, output=0)
    async with openai_client(llm_upstream) as client:
        if encoding_format == "float":
            reply = await client.embeddings.create(
                model="text-embedding-3-small", input=["a", "b"], encoding_format="float"
            )
        else:  # the client's default: it asks for base64 and decodes it
            reply = await client.embeddings.create(model="text-embedding-3-small", input="a")
    assert reply.usage.prompt_tokens == reply.usage.total_tokens == 42
    assert reply.data[0].embedding[:2] == [0.125, 0.1875]
    assert len(reply.data) == (2 if encoding_format == "float" else 1)
    (body,) = llm_upstream.bodies("/v1/embeddings")
    assert body["encoding_format"] == encoding_format


async def test_responses(llm_upstream: LlmUpstream) -> None:
    llm_upstream.usage["gpt-4.1"] = USAGE
    async with openai_client(llm_upstream) as client:
        reply = await client.responses.create(model="gpt-4.1", input="hi")
        stream = await client.responses.create(model="gpt-4.1", input="hi", stream=True)
        events = [event async for event in stream]
        async with client.responses.stream(model="gpt-4.1", input="hi") as helper:
            final = await helper.get_final_response()
    assert reply.output_text == REPLY_TEXT
    assert reply.usage is not None
    assert (reply.usage.input_tokens, reply.usage.output_tokens) == (1234 + 89, 567)
    assert reply.usage.input_tokens_details.cached_tokens == 89
    assert [e.sequence_number for e in events] == list(range(len(events)))
    completed = events[-1]
    assert isinstance(completed, ResponseCompletedEvent)
    assert completed.response.usage == reply.usage
    assert final.output_text == REPLY_TEXT
    assert final.usage == reply.usage


async def test_messages(llm_upstream: LlmUpstream) -> None:
    llm_upstream.usage["claude-test-sonnet"] = USAGE
    async with anthropic_client(llm_upstream) as client:
        reply = await client.messages.create(
            model="claude-test-sonnet",
            max_tokens=1024,
            messages=[{"role": "user", "content": "hi"}],
        )
        raw = await client.messages.create(
            model="claude-test-sonnet",
            max_tokens=1024,
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
        )
        events = [event async for event in raw]
        async with client.messages.stream(
            model="claude-test-sonnet",
            max_tokens=1024,
            messages=[{"role": "user", "content": "hi"}],
        ) as helper:
            final = await helper.get_final_message()
    assert reply.content[0].type == "text"
    assert reply.content[0].text == REPLY_TEXT
    assert reply.usage.input_tokens == 1234
    assert reply.usage.cache_read_input_tokens == 89
    assert reply.usage.output_tokens == 567
    kinds = [event.type for event in events]
    assert kinds[0] == "message_start"
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    start, delta = events[0], events[-2]
    assert start.type == "message_start"
    assert start.message.usage.input_tokens == 1234
    assert start.message.usage.output_tokens == 1
    assert delta.type == "message_delta"
    assert delta.usage.output_tokens == 567
    assert final.usage.output_tokens == 567  # the SDK's accumulator replaces, never adds
    assert final.usage.input_tokens == 1234
    assert final.content[0].type == "text"
    assert final.content[0].text == REPLY_TEXT
    # anthropic 2.x sends its key as a bearer token, no longer as X-Api-Key.
    assert llm_upstream.received[0].headers["Authorization"] == "Bearer sk-ant-test"
    assert "anthropic-version" in llm_upstream.received[0].headers


async def test_unconfigured_model_uses_default_usage(llm_upstream: LlmUpstream) -> None:
    llm_upstream.default_usage = Usage(input=3, output=4)
    async with openai_client(llm_upstream) as client:
        reply = await client.chat.completions.create(
            model="some-unpriced-model", messages=[{"role": "user", "content": "hi"}]
        )
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (3, 4)


async def test_fragmented_writes_still_parse(llm_upstream: LlmUpstream) -> None:
    llm_upstream.write_size = 7
    llm_upstream.usage["claude-test-haiku"] = USAGE
    async with (
        anthropic_client(llm_upstream) as client,
        client.messages.stream(
            model="claude-test-haiku", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
        ) as helper,
    ):
        final = await helper.get_final_message()
    assert final.usage.output_tokens == 567


async def test_slow_stream_holds_its_last_events(llm_upstream: LlmUpstream) -> None:
    slow = llm_upstream.slow["gpt-4o"] = SlowStream(events=64, total_bytes=1 << 20)
    async with openai_client(llm_upstream) as client:
        stream = await client.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = aiter(stream)
        first = await anext(chunks)
        assert first.choices[0].delta.role == "assistant"
        assert not slow.finished.is_set()
        text = 0
        for _ in range(64):
            chunk = await anext(chunks)
            text += len(chunk.choices[0].delta.content or "")
        assert text == 1 << 20
        await asyncio.wait_for(slow.holding.wait(), 5)
        assert not slow.finished.is_set()
        slow.release.set()
        rest = [chunk async for chunk in chunks]
    assert slow.finished.is_set()
    assert rest[-1].usage is not None
    assert rest[-1].usage.completion_tokens == Usage().output


async def test_slow_anthropic_stream(llm_upstream: LlmUpstream) -> None:
    slow = llm_upstream.slow["claude-test-sonnet"] = SlowStream(events=8, total_bytes=8195)
    async with anthropic_client(llm_upstream) as client:
        stream = await client.messages.create(
            model="claude-test-sonnet",
            max_tokens=10,
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
        )
        events = aiter(stream)
        first = await anext(events)
        assert first.type == "message_start"
        await asyncio.wait_for(slow.holding.wait(), 5)
        assert not slow.finished.is_set()
        slow.release.set()
        kinds = [event.type async for event in events]
    assert kinds.count("content_block_delta") == 8
    assert sum(map(len, slow.deltas())) == 8195
    assert kinds[-1] == "message_stop"


async def test_records_every_request(llm_upstream: LlmUpstream) -> None:
    async with openai_client(llm_upstream) as client:
        with pytest.raises(openai.BadRequestError):
            await client.post("/chat/completions", cast_to=object, body={"messages": []})
    (seen,) = llm_upstream.received
    assert (seen.method, seen.path, seen.body) == ("POST", "/v1/chat/completions", {"messages": []})
    assert seen.raw.startswith(b"{")
