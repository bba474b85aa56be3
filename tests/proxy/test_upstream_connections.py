"""The upstream client's connections, against a scripted upstream on a raw socket: kept alive
and reused, closed when either side says so, retried only when that is safe, expired when
idle; answers that are not HTTP and certificates nobody vouches for are refused."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agentproxy.proxy import upstream as upstream_module
from tests.conftest import UPSTREAM_SECRET, Keys, ProxyFactory
from tests.proxy.conftest import bearer, raw_request

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


@dataclass
class Scripted:
    """A raw upstream: `answer(n, head)` gives the bytes for the n-th request on a connection
    (None: close without answering); it counts connections and keeps every request head."""

    answer: Callable[[int, bytes], bytes | None]
    port: int = 0
    connections: int = 0
    heads: list[bytes] = field(default_factory=list)
    closed_by_peer: int = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        n = 0
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    self.closed_by_peer += 1
                    return
                self.heads.append(head)
                length = _content_length(head)
                if length:
                    await reader.readexactly(length)
                reply = self.answer(n, head)
                n += 1
                if reply is None:
                    return
                writer.write(reply)
                await writer.drain()
                if b"Connection: close" in reply:
                    return
        finally:
            writer.close()


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


Start = Callable[[Callable[[int, bytes], bytes | None]], Awaitable[Scripted]]


@pytest.fixture
async def scripted() -> AsyncIterator[Start]:
    servers: list[asyncio.Server] = []

    async def start(answer: Callable[[int, bytes], bytes | None]) -> Scripted:
        state = Scripted(answer)
        server = await asyncio.start_server(state.serve, "127.0.0.1", 0)
        servers.append(server)
        state.port = server.sockets[0].getsockname()[1]
        return state

    yield start
    for server in servers:
        server.close()


async def _get(base: str, keys: Keys, path: str = "/public/x", method: str = "GET") -> int:
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, base + path, headers=bearer(keys.token())) as r,
    ):
        await r.read()
        return r.status


async def test_calls_share_one_kept_alive_connection(
    make_proxy: ProxyFactory, keys: Keys, scripted: Start
) -> None:
    up = await scripted(lambda n, head: OK)
    proxy = await make_proxy(upstream_url=f"http://127.0.0.1:{up.port}")
    assert [await _get(proxy.base, keys) for _ in range(10)] == [200] * 10
    assert up.connections == 1
    # What the upstream saw: the upstream's own Host, a body length for nothing only where a
    # body is expected.
    assert b"\r\nHost: 127.0.0.1:%d\r\n" % up.port in up.heads[0]
    assert b"content-length" not in up.heads[0].lower()


async def test_a_bodiless_post_says_its_length_is_zero(
    make_proxy: ProxyFactory, keys: Keys, scripted: Start
) -> None:
    """The agent sends neither Content-Length nor a body (no framing at all, which HTTP/1.1
    allows for a request); some servers answer 411 to a POST without a length."""
    up = await scripted(lambda n, head: OK)
    proxy = await make_proxy(upstream_url=f"http://127.0.0.1:{up.port}")
    sent = await raw_request(proxy.base, "POST", "/upload", list(bearer(keys.token()).items()))
    assert sent.status == 200
    assert b"\r\nContent-Length: 0\r\n" in up.heads[0]
    assert b"transfer-encoding" not in up.heads[0].lower()


async def test_an_upstream_asking_to_close_gets_a_new_connection_per_call(
    make_proxy: ProxyFactory, keys: Keys, scripted: Start
) -> None:
    closing = OK.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
    up = await scripted(lambda n, head: closing)
    proxy = await make_proxy(upstream_url=f"http://127.0.0.1:{up.port}")
    assert [await _get(proxy.base, keys) for _ in range(5)] == [200] * 5
    assert up.connections == 5


async def test_a_dropped_kept_alive_connection_is_retried_only_when_safe(
    make_proxy: ProxyFactory, keys: Keys, scripted: Start
) -> None:
    """The upstream answers the first request on a connection and hangs up on the second
    (what a keep-alive timeout racing a new request looks like). A GET is sent once more on
    a new connection; a POST, which the upstream may have acted on, is not: 502."""
    up = await scripted(lambda n, head: OK if n == 0 else None)
    proxy = await make_proxy(upstream_url=f"http://127.0.0.1:{up.port}")
    assert await _get(proxy.base, keys) == 200
    assert await _get(proxy.base, keys) == 200  # reused, dropped, retried
    assert up.connections == 2
    assert await _get(proxy.base, keys, "/upload", "POST") == 502  # reused, dropped
    assert up.connections == 2
    assert await _get(proxy.base, keys, "/upload", "POST") == 200  # a new connection
    assert up.connections == 3


async def test_interim_answers_are_skipped_for_the_final_one(
    make_proxy: ProxyFactory, keys: Keys, scripted: Start
) -> None:
    """1xx answers (100 Continue, 103 Early Hints) precede the final answer on the same
    connection; the agent gets the final one, and the connection stays usable."""
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
    up = await scripted(lambda n, head: interim + OK)
    proxy = await make_proxy(upstream_url=f"http://127.0.0.1:{up.port}")
    async with (
        aiohttp.ClientSession() as s,
        s.get(proxy.base + "/public/x", headers=bearer(keys.token())) as r,
    ):
        assert r.status == 200
        assert await r.read() == b"{}"
    assert await _get(proxy.base, keys) == 200
    assert up.connections == 1


async def test_idle_connections_expire(
    make_proxy: ProxyFactory,
    keys: Keys,
    scripted: Start,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(upstream_module, "KEEPALIVE", 0.2)
    up = await scripted(lambda n, head: OK)
    proxy = await make_proxy(upstream_url=f"http://127.0.0.1:{up.port}")
    assert await _get(proxy.base, keys) == 200
    await asyncio.sleep(0.3)
    assert await _get(proxy.base, keys) == 200
    assert up.connections == 2
    await asyncio.sleep(0.05)
    assert up.closed_by_peer == 1  # the expired one was closed, not leaked


@pytest.mark.parametrize(
    "garbage",
    [
        b"HELLO\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nBad\x00Header: x\r\n\r\n",
    ],
    ids=["not-http", "two-lengths", "nul-in-name"],
)
async def test_an_answer_that_is_not_http_is_502_and_its_connection_dropped(
    make_proxy: ProxyFactory, keys: Keys, scripted: Start, garbage: bytes
) -> None:
    up = await scripted(lambda n, head: garbage if len(up.heads) == 1 else OK)
    proxy = await make_proxy(upstream_url=f"http://127.0.0.1:{up.port}")
    async with (
        aiohttp.ClientSession() as s,
        s.get(proxy.base + "/public/x", headers=bearer(keys.token())) as r,
    ):
        assert r.status == 502
        assert r.content_type == "application/problem+json"
        text = (await r.read()).decode()
    assert orjson.loads(text)["type"].endswith("/upstream-unavailable")
    for leak in ("Traceback", "HELLO", str(up.port), UPSTREAM_SECRET):
        assert leak not in text
    assert await _get(proxy.base, keys) == 200
    assert up.connections == 2


def _self_signed(d: Path) -> ssl.SSLContext:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(d / "cert.pem", d / "key.pem")
    return context


async def test_an_https_upstream_must_present_a_certificate_the_system_trusts(
    make_proxy: ProxyFactory, keys: Keys, tmp_path: Path
) -> None:
    seen: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            seen.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(OK)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=_self_signed(tmp_path))
    port = server.sockets[0].getsockname()[1]
    try:
        proxy = await make_proxy(upstream_url=f"https://127.0.0.1:{port}")
        assert await _get(proxy.base, keys) == 502
        assert seen == []  # the request (and its credential) never went out
    finally:
        server.close()
