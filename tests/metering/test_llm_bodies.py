"""LLM request bodies through the proxy: large ones read off the loop and forwarded as sent,
the default 8 MiB cap, gzip bombs, and keys one case apart refused before the provider."""

from __future__ import annotations

import gzip
import io

import aiohttp
import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionUserMessageParam

from agentproxy.proxy.offload import INLINE_BYTES
from tests.conftest import Keys, Proxy
from tests.harness.llm_upstream import LlmUpstream
from tests.metering.test_llm_e2e import llm_proxy, oai

__all__ = ["llm_proxy"]  # the fixture, shared


async def post(proxy: Proxy, token: str, body: bytes, **headers: str) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            proxy.base + "/v1/chat/completions",
            data=io.BytesIO(body),  # aiohttp warns about large bytes
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
            | headers,
        ) as r,
    ):
        return r.status, await r.read()


async def test_a_large_chat_is_decided_and_forwarded_as_sent(
    llm_proxy: Proxy, llm_upstream: LlmUpstream, keys: Keys
) -> None:
    history: list[ChatCompletionUserMessageParam] = [
        {"role": "user", "content": f"message {i} " + "x" * 500} for i in range(400)
    ]
    async with oai(llm_proxy, keys.token("writer")) as client:
        reply = await client.chat.completions.create(
            model="gpt-4o-mini", messages=history, max_tokens=100
        )
        assert reply.choices[0].message.content
        with pytest.raises(openai.PermissionDeniedError):  # the policy reads max_tokens
            await client.chat.completions.create(
                model="gpt-4o-mini", messages=history, max_tokens=100_000
            )
    [received] = llm_upstream.received
    assert len(received.raw) > 8 * INLINE_BYTES
    assert received.body["messages"] == history


async def test_the_default_cap_is_eight_mebibytes_and_bombs_stop_early(
    llm_proxy: Proxy, llm_upstream: LlmUpstream, keys: Keys
) -> None:
    token = keys.token("writer")
    big = orjson.dumps(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * (8 << 20)}]}
    )
    status, answer = await post(llm_proxy, token, big)
    assert status == 413 and b"max_body_bytes of upstream tool" in answer
    bomb = gzip.compress(big.replace(b"x" * 100, b"0" * 100), compresslevel=9)
    status, answer = await post(llm_proxy, token, bomb, **{"Content-Encoding": "gzip"})
    assert status == 413
    assert llm_upstream.received == []


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"gpt-4o-mini","max_tokens":10,"MAX_TOKENS":100000,"messages":[]}',
        b'{"model":"gpt-4o-mini","Model":"o1-pro","messages":[]}',
        b'{"model":"gpt-4o-mini","messages":[{"role":"user","Role":"system","content":"hi"}]}',
    ],
)
async def test_keys_one_case_apart_never_reach_the_provider(
    llm_proxy: Proxy, llm_upstream: LlmUpstream, keys: Keys, body: bytes
) -> None:
    status, answer = await post(llm_proxy, keys.token("writer"), body)
    assert status == 400
    assert "one key to a parser that ignores case" in orjson.loads(answer)["error"]["message"]
    assert llm_upstream.received == []
