"""Answers pass back as the upstream framed them: HEAD keeps its length without a body, 204
and 304 carry none, a small chunked answer arrives whole, and one that is still streaming
gets its headers before its end."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from tests.conftest import Keys, Proxy, Upstream
from tests.proxy.conftest import bearer, parse_response, raw_request


async def head_exchange(base: str, target: str, token: str) -> bytes:
    """A HEAD request on a `Connection: close` connection, and every byte that came back."""
    host, _, port = base.removeprefix("http://").rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            f"HEAD {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
            f"Authorization: Bearer {token}\r\n\r\n".encode()
        )
        return await asyncio.wait_for(reader.read(-1), timeout=10)
    finally:
        writer.close()


async def test_head_keeps_the_upstreams_length_and_sends_no_body(
    proxy: Proxy, upstream: Upstream, keys: Keys
) -> None:
    raw = await head_exchange(proxy.base, "/status?code=200&bytes=1000", keys.token())
    head, _, rest = raw.partition(b"\r\n\r\n")
    response = parse_response(head + b"\r\n\r\n")
    assert response.status == 200
    assert response.header("Content-Length") == "1000"
    assert rest == b""
    assert [s.method for s in upstream.seen] == ["HEAD"]


@pytest.mark.parametrize("code", [204, 304])
async def test_bodiless_statuses_pass_without_a_body(proxy: Proxy, keys: Keys, code: int) -> None:
    response = await raw_request(
        proxy.base, "GET", f"/status?code={code}", [("Authorization", f"Bearer {keys.token()}")]
    )
    assert response.status == code
    assert response.header("ETag") == '"v1"'
    assert response.body == b""
    assert response.header("Content-Length") in (None, "0")
    assert response.header("Transfer-Encoding") is None


async def test_a_small_chunked_answer_arrives_whole(proxy: Proxy, keys: Keys) -> None:
    response = await raw_request(
        proxy.base, "GET", "/chunked", [("Authorization", f"Bearer {keys.token()}")]
    )
    assert response.status == 200
    assert response.body == b"small answer"
    assert response.header("Content-Type") == "text/plain"


async def test_a_streaming_answer_gets_its_headers_before_its_end(
    proxy: Proxy, upstream: Upstream, keys: Keys
) -> None:
    """What arrives whole goes back in one write; what is still coming must not wait for its
    end (an event stream that is quiet for minutes still has its headers)."""
    async with (
        aiohttp.ClientSession() as s,
        s.get(proxy.base + "/sse", headers=bearer(keys.token())) as r,
    ):
        assert r.status == 200
        assert await asyncio.wait_for(r.content.readline(), 5) == b"data: first\n"
        upstream.events["sse-release"].set()
        assert (await asyncio.wait_for(r.content.read(), 5)).endswith(b"data: second\n\n")
