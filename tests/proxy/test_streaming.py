"""Streaming both ways: large bodies pass without being held, limits hold, SSE is not buffered."""

from __future__ import annotations

import asyncio
import io
import tracemalloc
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest

from tests.conftest import Keys, Proxy, ProxyFactory, Upstream
from tests.proxy.conftest import bearer, header_values, read_response

MB = 1024 * 1024
CHUNK = b"z" * (256 * 1024)


async def chunks(total: int) -> AsyncIterator[bytes]:
    """Yields `total` bytes made of one shared chunk: the client holds no more than 256 KiB."""
    sent = 0
    while sent < total:
        part = CHUNK if total - sent >= len(CHUNK) else CHUNK[: total - sent]
        sent += len(part)
        yield part


@pytest.mark.timeout(30)
async def test_50mb_upload_streams_through(proxy: Proxy, upstream: Upstream, keys: Keys) -> None:
    total = 50 * MB
    tracemalloc.start()
    try:
        async with (
            aiohttp.ClientSession() as s,
            s.post(proxy.base + "/upload", data=chunks(total), headers=bearer(keys.token())) as r,
        ):
            assert r.status == 200
            body = await r.json()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert body["bytes"] == total
    assert upstream.seen[0].body_bytes == total
    # Client, proxy and upstream all run in this process: a proxy holding the body whole
    # would alone push the peak past 50 MB.
    assert peak < 16 * MB, f"peak traced memory {peak / MB:.1f} MB during a 50 MB upload"


@pytest.mark.timeout(30)
async def test_20mb_download_streams_through(proxy: Proxy, upstream: Upstream, keys: Keys) -> None:
    total = 20 * MB
    received = 0
    tracemalloc.start()
    try:
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"{proxy.base}/download?bytes={total}", headers=bearer(keys.token())) as r,
        ):
            assert r.status == 200
            assert r.content_length == total
            async for chunk in r.content.iter_chunked(256 * 1024):
                received += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert received == total
    assert peak < 16 * MB, f"peak traced memory {peak / MB:.1f} MB during a 20 MB download"


async def test_body_over_limit_with_content_length(
    make_proxy: ProxyFactory, upstream: Upstream, keys: Keys
) -> None:
    proxy = await make_proxy(upstream_extra="    max_body_bytes: 1048576")
    # The head alone announces 2 MB: the proxy must refuse without reading (or sending) it.
    host_port = proxy.base.removeprefix("http://")
    host, _, port = host_port.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            (
                f"POST /upload HTTP/1.1\r\nHost: {host_port}\r\n"
                f"Authorization: Bearer {keys.token()}\r\n"
                f"Content-Length: {2 * MB}\r\n\r\n"
            ).encode()
            + b"z" * 1024
        )
        await writer.drain()
        response = await asyncio.wait_for(read_response(reader), timeout=5)
    finally:
        writer.close()
    assert response.status == 413
    assert response.header("Content-Type") == "application/problem+json"
    assert response.json()["status"] == 413
    assert upstream.seen == []


async def test_body_at_limit_passes(
    make_proxy: ProxyFactory, upstream: Upstream, keys: Keys
) -> None:
    proxy = await make_proxy(upstream_extra="    max_body_bytes: 1048576")
    async with (
        aiohttp.ClientSession() as s,
        s.post(proxy.base + "/upload", data=chunks(MB), headers=bearer(keys.token())) as r,
    ):
        assert r.status == 200
    assert upstream.seen[0].body_bytes == MB


async def test_chunked_body_over_limit(
    make_proxy: ProxyFactory, upstream: Upstream, keys: Keys
) -> None:
    proxy = await make_proxy(upstream_extra="    max_body_bytes: 1048576")
    host_port = proxy.base.removeprefix("http://")
    host, _, port = host_port.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))

    async def send_body() -> None:
        # 2 MB in 64 KiB chunks; the proxy may close its side before all of it is sent.
        try:
            piece = b"z" * 65536
            for _ in range(32):
                writer.write(b"%x\r\n%b\r\n" % (len(piece), piece))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        except ConnectionError:
            pass

    try:
        writer.write(
            (
                f"POST /upload HTTP/1.1\r\nHost: {host_port}\r\n"
                f"Authorization: Bearer {keys.token()}\r\n"
                "Transfer-Encoding: chunked\r\n\r\n"
            ).encode()
        )
        sender = asyncio.create_task(send_body())
        response = await asyncio.wait_for(read_response(reader), timeout=5)
        await sender
    finally:
        writer.close()
    assert response.status == 413
    assert response.json()["status"] == 413
    # Give the upstream a moment to finish whatever it received.
    await asyncio.sleep(0.1)
    assert all(seen.body_bytes < 2 * MB for seen in upstream.seen)
    assert all(seen.body_bytes <= MB for seen in upstream.seen)


async def test_slow_sse_is_not_buffered(proxy: Proxy, upstream: Upstream, keys: Keys) -> None:
    release = upstream.events["sse-release"]
    async with (
        aiohttp.ClientSession() as s,
        s.get(proxy.base + "/sse", headers=bearer(keys.token())) as r,
    ):
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        # The first event arrives while the upstream is still holding the response open.
        first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), timeout=3)
        assert first == b"data: first\n\n"
        assert not release.is_set()
        release.set()
        second = await asyncio.wait_for(r.content.readuntil(b"\n\n"), timeout=3)
        assert second == b"data: second\n\n"
        assert await r.content.read() == b""


async def test_upload_is_refused_before_reading_when_denied(
    proxy: Proxy, upstream: Upstream, keys: Keys
) -> None:
    # A denied call answers at once; the body is never forwarded.
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            proxy.base + "/v1/employees/7/salary",
            data=b"z" * MB,
            headers=bearer(keys.token()),
        ) as r,
    ):
        assert r.status == 403
        assert orjson.loads(await r.read())["rule"] == "no-salaries"
    assert upstream.seen == []


async def test_upload_with_content_length_keeps_its_framing(
    proxy: Proxy, upstream: Upstream, keys: Keys
) -> None:
    total = 3 * MB
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            proxy.base + "/upload", data=io.BytesIO(b"z" * total), headers=bearer(keys.token())
        ) as r,
    ):
        assert r.status == 200
    seen = upstream.seen[0]
    assert seen.body_bytes == total
    assert header_values(seen, "Content-Length") == [str(total)]
    assert header_values(seen, "Transfer-Encoding") == []


@pytest.mark.timeout(15)
async def test_expect_100_continue_is_answered(
    proxy: Proxy, upstream: Upstream, keys: Keys
) -> None:
    # RFC 9110 §10.1.1: a client that sends `Expect: 100-continue` waits for the interim
    # answer before sending its body (aiohttp forever, curl for a second). The proxy reads the
    # body itself, so it must send `100 Continue` once it has decided to forward.
    total = 512 * 1024
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as s,
        s.post(
            proxy.base + "/upload",
            data=io.BytesIO(b"z" * total),
            expect100=True,
            headers=bearer(keys.token()),
        ) as r,
    ):
        assert r.status == 200
        assert (await r.json())["bytes"] == total
    assert upstream.seen[0].body_bytes == total
    # The expectation is hop-by-hop: the proxy met it, the upstream never sees it.
    assert header_values(upstream.seen[0], "Expect") == []


async def test_expect_100_continue_denied_gets_final_answer(
    proxy: Proxy, upstream: Upstream, keys: Keys
) -> None:
    # A denied call must not invite the body: the final 403 comes instead of 100 Continue.
    host_port = proxy.base.removeprefix("http://")
    host, _, port = host_port.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            (
                f"POST /v1/employees/7/salary HTTP/1.1\r\nHost: {host_port}\r\n"
                f"Authorization: Bearer {keys.token()}\r\n"
                "Content-Length: 1000\r\nExpect: 100-continue\r\n\r\n"
            ).encode()
        )
        await writer.drain()
        response = await asyncio.wait_for(read_response(reader), timeout=3)
    finally:
        writer.close()
    assert response.status == 403
    assert upstream.seen == []
