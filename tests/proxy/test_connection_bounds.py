"""One client cannot hold the proxy or its upstream: connections are capped per listener,
heads and bodies must keep arriving, idle connections are closed, and slow uploads never hold
a sync upstream's workers. Each attack runs while a second, well-behaved agent works."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import Keys, Proxy, ProxyFactory, Upstream
from tests.harness.processes import free_port


async def good_calls(
    proxy: Proxy, keys: Keys, n: int = 10, path: str = "/v1/employees"
) -> list[int]:
    """A well-behaved agent's calls, one after another, each on a fresh connection."""
    headers = {"Authorization": f"Bearer {keys.token()}"}
    statuses = []
    for i in range(n):
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"{proxy.base}{path}/{i}", headers=headers) as r,
        ):
            await r.read()
            statuses.append(r.status)
    return statuses


async def metric(proxy: Proxy, sample: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(proxy.admin + "/metrics") as r:
        text = await r.text()
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def open_idle(
    proxy: Proxy, n: int
) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    port = int(proxy.base.rsplit(":", 1)[1])
    return [await asyncio.open_connection("127.0.0.1", port) for _ in range(n)]


async def closed_by_server(reader: asyncio.StreamReader, within: float) -> bytes:
    """What the server sent before closing; fails if it did not close within `within`."""
    return await asyncio.wait_for(reader.read(-1), within)


async def test_connections_beyond_the_cap_are_refused_and_idle_ones_closed(
    make_proxy: ProxyFactory, keys: Keys
) -> None:
    proxy = await make_proxy(listen="max_connections: 20, idle_timeout: 1s")
    idle = await open_idle(proxy, 20)
    await asyncio.sleep(0.1)
    assert await metric(proxy, 'agentproxy_connections{listener="http"}') == 20
    # The 21st is answered 503 at once and closed; nothing of it is read.
    extra_reader, extra_writer = (await open_idle(proxy, 1))[0]
    refused = await closed_by_server(extra_reader, 5)
    assert refused.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1" in refused
    extra_writer.close()
    assert (
        await metric(proxy, 'agentproxy_connections_refused_total{reason="max_connections"}') == 1
    )
    # The idle ones are closed after idle_timeout (aiohttp's own default: 3,630 s) ...
    for reader, writer in idle:
        assert await closed_by_server(reader, 10) == b""
        writer.close()
    # ... and a well-behaved agent is served again.
    assert await good_calls(proxy, keys, 5) == [200] * 5
    assert await metric(proxy, 'agentproxy_connections{listener="http"}') <= 1


async def test_a_trickled_head_is_cut_at_the_header_timeout_while_others_are_served(
    make_proxy: ProxyFactory, keys: Keys, upstream: Upstream
) -> None:
    proxy = await make_proxy(listen="header_timeout: 1s, idle_timeout: 60s")
    port = int(proxy.base.rsplit(":", 1)[1])
    attackers = [await asyncio.open_connection("127.0.0.1", port) for _ in range(30)]
    head = b"GET /v1/employees/1 HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100

    async def trickle(writer: asyncio.StreamWriter) -> None:
        try:
            for byte in head:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.05)
        except (ConnectionError, RuntimeError):
            return

    began = time.monotonic()
    trickles = [asyncio.ensure_future(trickle(w)) for _, w in attackers]
    served = await good_calls(proxy, keys, 10)
    for reader, writer in attackers:
        assert await closed_by_server(reader, 10) == b""  # closed, never answered
        writer.close()
    # Each head had 1 s; it would have needed 7 s. (A hang detector, not a timing goal.)
    assert time.monotonic() - began < 8
    for task in trickles:
        task.cancel()
    assert served == [200] * 10
    assert (
        await metric(proxy, 'agentproxy_connections_refused_total{reason="header_timeout"}') == 30
    )
    assert all(
        seen.path != "/v1/employees/1" or seen.headers.get("X-Slow") is None
        for seen in upstream.seen
    )


async def test_a_stalled_body_is_408_and_never_reaches_the_upstream(
    make_proxy: ProxyFactory, keys: Keys, upstream: Upstream
) -> None:
    proxy = await make_proxy(listen="body_timeout: 1s")
    port = int(proxy.base.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1/employees HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + keys.token(dept="hr").encode() + b"\r\n"
        b"Content-Length: 100\r\n\r\n" + b'{"name": "'
    )
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(2000), 10)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert await closed_by_server(reader, 10) == b""  # and the connection is closed
    writer.close()
    assert b"body-timeout" in answer
    assert [s for s in upstream.seen if s.method == "POST"] == []


GUNICORN_APP = """
import time

def app(environ, start_response):
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length) if length else b""
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"got %d bytes" % len(body)]
"""


@pytest.fixture
def gunicorn(tmp_path: Path) -> Iterator[str]:
    """A real gunicorn with two sync workers: each holds one request at a time."""
    (tmp_path / "slowapp.py").write_text(GUNICORN_APP)
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "--workers",
            "2",
            "--worker-class",
            "sync",
            "--timeout",
            "60",
            "--bind",
            f"127.0.0.1:{port}",
            "--chdir",
            str(tmp_path),
            "slowapp:app",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    import socket

    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


POLICY = """
default: deny
rules:
  - id: uploads
    agents: ["*"]
    actions: ["http:* /**"]
    effect: allow
"""


async def test_trickled_uploads_do_not_hold_a_sync_upstreams_workers(
    make_proxy: ProxyFactory, keys: Keys, gunicorn: str
) -> None:
    """Two uploads trickled a byte every 0.2 s (one small, read whole by the proxy before the
    upstream is involved; one large, which streams and is cut by the upstream's timeout)
    while a well-behaved agent posts: its calls all pass (before: 504 while both gunicorn
    workers waited for the trickles)."""
    proxy = await make_proxy(policy=POLICY, upstream_url=gunicorn, timeout="2s")
    port = int(proxy.base.rsplit(":", 1)[1])
    token = keys.token("uploader").encode()

    async def trickle(length: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token + b"\r\n"
            b"Content-Length: " + str(length).encode() + b"\r\n\r\n"
        )
        try:
            for _ in range(40):
                writer.write(b"x")
                await writer.drain()
                await asyncio.sleep(0.2)
            return b"still sending"
        except ConnectionError:
            return b"cut"
        finally:
            try:
                answer = await asyncio.wait_for(reader.read(200), 0.5)
            except TimeoutError:
                answer = b""
            writer.close()
            del answer

    attacks = [
        asyncio.ensure_future(trickle(200)),
        asyncio.ensure_future(trickle(200)),
        asyncio.ensure_future(trickle(1_000_000)),
        asyncio.ensure_future(trickle(1_000_000)),
    ]
    await asyncio.sleep(0.5)
    headers = {"Authorization": f"Bearer {keys.token('good')}"}
    statuses = []
    async with aiohttp.ClientSession() as s:
        for _ in range(8):
            async with s.post(f"{proxy.base}/upload", data=b"y" * 100, headers=headers) as r:
                statuses.append((r.status, await r.text()))
            await asyncio.sleep(0.3)
    for attack in attacks:
        attack.cancel()
    assert statuses == [(200, "got 100 bytes")] * 8
