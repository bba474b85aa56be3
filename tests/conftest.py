"""Shared fixtures: real keys, real tokens, a real upstream and a real proxy on free ports."""

from __future__ import annotations

import asyncio
import importlib
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from grpc_tools import protoc

from agentproxy.clock import SYSTEM
from agentproxy.proxy.runtime import load_config
from agentproxy.proxy.server import ProxyServer
from tests.harness.redis import (
    make_cluster,
    make_redis_server,
    make_sentinel,
    redis_cluster,
    redis_sentinel,
    redis_server,
    redis_url,
    valkey_server_process,
)

# fixtures, shared with tests/store
__all__ = [
    "make_cluster",
    "make_redis_server",
    "make_sentinel",
    "redis_cluster",
    "redis_sentinel",
    "redis_server",
    "redis_url",
    "valkey_server_process",
]

ISSUER = "https://idp.test"
GRPC_PROTO_DIR = Path(__file__).parent / "grpc_proxy" / "proto"
AUDIENCE = "agentproxy"
UPSTREAM_SECRET = "tool-secret-3f9a"


@dataclass
class Keys:
    private: rsa.RSAPrivateKey
    public_pem: bytes
    private_pem: bytes

    def token(self, sub: str = "hr-bot", **claims: Any) -> str:
        now = int(time.time())
        payload: dict[str, Any] = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": sub,
            "iat": now,
            "exp": now + 300,
        }
        payload.update(claims)
        return jwt.encode(
            {k: v for k, v in payload.items() if v is not None}, self.private, algorithm="RS256"
        )


@pytest.fixture(scope="session")
def keys() -> Keys:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return Keys(
        private=private,
        public_pem=private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        private_pem=private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    header_list: list[tuple[str, str]]
    body_bytes: int


@dataclass
class Upstream:
    url: str
    seen: list[Seen] = field(default_factory=list)
    events: dict[str, asyncio.Event] = field(default_factory=dict)


async def start_app(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, port


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    """An HTTP tool that records what reached it. Bodies are counted, never kept."""
    state = Upstream(url="")
    state.events["sse-release"] = asyncio.Event()

    async def record(request: web.Request) -> int:
        size = 0
        async for chunk in request.content.iter_chunked(256 * 1024):
            size += len(chunk)
        state.seen.append(
            Seen(
                request.method,
                request.raw_path,
                dict(request.headers),
                list(request.headers.items()),
                size,
            )
        )
        return size

    async def echo(request: web.Request) -> web.StreamResponse:
        size = await record(request)
        return web.json_response(
            {"path": request.raw_path, "method": request.method, "bytes": size}
        )

    async def sse(request: web.Request) -> web.StreamResponse:
        await record(request)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        await state.events["sse-release"].wait()
        await response.write(b"data: second\n\n")
        await response.write_eof()
        return response

    async def download(request: web.Request) -> web.StreamResponse:
        await record(request)
        total = int(request.query.get("bytes", "1048576"))
        response = web.StreamResponse()
        response.content_length = total
        await response.prepare(request)
        chunk = b"x" * 65536
        sent = 0
        while sent < total:
            part = chunk[: total - sent]
            await response.write(part)
            sent += len(part)
        await response.write_eof()
        return response

    async def slow(request: web.Request) -> web.StreamResponse:
        await record(request)
        await asyncio.sleep(float(request.query.get("s", "5")))
        return web.json_response({"slow": True})

    async def cut(request: web.Request) -> web.StreamResponse:
        await record(request)
        response = web.StreamResponse()
        response.content_length = 1000
        await response.prepare(request)
        await response.write(b"y" * 100)
        assert request.transport is not None
        request.transport.abort()
        return response

    async def cookie(request: web.Request) -> web.StreamResponse:
        await record(request)
        response = web.json_response({"ok": True})
        response.set_cookie("session", "agent-a-secret")
        return response

    async def status(request: web.Request) -> web.StreamResponse:
        await record(request)
        body = b"s" * int(request.query.get("bytes", "0")) or None
        return web.Response(status=int(request.query["code"]), headers={"ETag": '"v1"'}, body=body)

    async def chunked(request: web.Request) -> web.StreamResponse:
        await record(request)
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b"small ")
        await response.write(b"answer")
        await response.write_eof()
        return response

    app = web.Application(client_max_size=1024**3)
    app.router.add_route("*", "/status", status)
    app.router.add_route("*", "/chunked", chunked)
    app.router.add_route("*", "/sse", sse)
    app.router.add_route("*", "/download", download)
    app.router.add_route("*", "/slow", slow)
    app.router.add_route("*", "/cut", cut)
    app.router.add_route("*", "/cookie", cookie)
    app.router.add_route("*", "/{tail:.*}", echo)
    runner, port = await start_app(app)
    state.url = f"http://127.0.0.1:{port}"
    try:
        yield state
    finally:
        state.events["sse-release"].set()
        await runner.cleanup()


DEFAULT_POLICY = """
default: deny
rules:
  - id: read-employees
    agents: [hr-bot, "role:hr"]
    actions: ["http:GET /v1/employees/{id}"]
    when: 'resource.id != "13"'
    effect: allow
    reason: HR reads employee records
  - id: hr-writes
    agents: [hr-bot]
    actions: ["http:POST /v1/employees", "http:PUT /v1/employees/{id}"]
    when: 'principal.claims.dept == "hr"'
    effect: allow
  - id: on-behalf
    agents: [assistant]
    users: [alice, "team-*"]
    actions: ["http:GET /v1/me/**"]
    effect: allow
  - id: no-salaries
    agents: ["*"]
    actions: ["http:* /v1/employees/{id}/salary"]
    effect: deny
    reason: salaries are out of bounds for agents
  - id: everything-for-ops
    agents: ["role:ops"]
    actions: ["http:* /**"]
    effect: allow
  - id: public
    agents: ["*"]
    actions: ["http:GET /public/**", "http:* /sse", "http:* /download", "http:* /slow",
              "http:* /cut", "http:POST /upload", "http:GET /cookie", "http:* /status",
              "http:GET /chunked"]
    effect: allow
"""


@dataclass
class Proxy:
    server: ProxyServer
    base: str
    admin: str
    dir: Path

    @property
    def config_path(self) -> Path:
        return self.dir / "agentproxy.yaml"


ProxyFactory = Callable[..., Awaitable[Proxy]]


def write_config(
    d: Path,
    keys: Keys,
    upstream_url: str,
    *,
    policy: str = DEFAULT_POLICY,
    extra: str = "",
    upstream_extra: str = "",
    mode: str = "enforce",
    timeout: str = "2s",
    decision_log: str = "stdout",
    listen: str = "",
) -> Path:
    (d / "issuer.pem").write_bytes(keys.public_pem)
    (d / "secret").write_text(UPSTREAM_SECRET + "\n")
    (d / "policies").mkdir(exist_ok=True)
    (d / "policies" / "main.yaml").write_text(policy)
    path = d / "agentproxy.yaml"
    path.write_text(
        f"""
mode: {mode}
listen: {{http: "127.0.0.1:0", admin: "127.0.0.1:0"{", " + listen if listen else ""}}}
upstreams:
  - name: tool
    url: "{upstream_url}"
    timeout: {timeout}
    credentials: {{header: X-Api-Key, value_file: secret}}
{upstream_extra}
identity:
  issuers:
    - issuer: "{ISSUER}"
      audiences: [{AUDIENCE}]
      public_key_file: issuer.pem
      algorithms: [RS256]
policy_files: ["policies/*.yaml"]
decision_log: {decision_log}
{extra}
"""
    )
    return path


@pytest.fixture
async def make_proxy(tmp_path: Path, keys: Keys, upstream: Upstream) -> AsyncIterator[ProxyFactory]:
    servers: list[ProxyServer] = []

    async def factory(**kw: Any) -> Proxy:
        d = tmp_path / f"proxy{len(servers)}"
        d.mkdir()
        clock = kw.pop("clock", SYSTEM)  # a FakeClock: expiries without sleeping
        path = write_config(d, keys, kw.pop("upstream_url", upstream.url), **kw)
        server = ProxyServer(load_config(path), clock=clock)
        await server.start()
        servers.append(server)
        return Proxy(
            server,
            f"http://127.0.0.1:{server.http_port}",
            f"http://127.0.0.1:{server.admin_port}",
            d,
        )

    yield factory
    for server in servers:
        await server.stop()


@pytest.fixture
async def proxy(make_proxy: ProxyFactory) -> Proxy:
    return await make_proxy()


@dataclass
class Generated:
    pb2: ModuleType
    grpc: ModuleType
    descriptor_set: Path


@pytest.fixture(scope="session")
def hr(tmp_path_factory: pytest.TempPathFactory) -> Generated:
    """Python code and a descriptor set, generated from the test proto by grpcio-tools."""
    out = tmp_path_factory.mktemp("hrgrpc")
    include = str(Path(protoc.__file__).parent / "_proto")
    descriptor_set = out / "hr.binpb"
    code = protoc.main(
        [
            "protoc",
            f"-I{GRPC_PROTO_DIR}",
            f"-I{include}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            f"--descriptor_set_out={descriptor_set}",
            "--include_imports",
            str(GRPC_PROTO_DIR / "hrgrpc.proto"),
        ]
    )
    assert code == 0, "protoc failed"
    sys.path.insert(0, str(out))
    try:
        return Generated(
            importlib.import_module("hrgrpc_pb2"),
            importlib.import_module("hrgrpc_pb2_grpc"),
            descriptor_set,
        )
    finally:
        sys.path.remove(str(out))


CustomProxyFactory = Callable[[str, dict[str, bytes]], Awaitable[Proxy]]


@pytest.fixture
async def custom_proxy(tmp_path: Path) -> AsyncIterator[CustomProxyFactory]:
    """Starts a proxy from a whole config text, with extra files written next to it."""
    servers: list[ProxyServer] = []

    async def factory(config_text: str, files: dict[str, bytes]) -> Proxy:
        d = tmp_path / f"custom{len(servers)}"
        d.mkdir()
        for name, content in files.items():
            (d / name).parent.mkdir(parents=True, exist_ok=True)
            (d / name).write_bytes(content)
        (d / "agentproxy.yaml").write_text(config_text)
        server = ProxyServer(load_config(d / "agentproxy.yaml"))
        await server.start()
        servers.append(server)
        return Proxy(
            server,
            f"http://127.0.0.1:{server.http_port}",
            f"http://127.0.0.1:{server.admin_port}",
            d,
        )

    yield factory
    for server in servers:
        await server.stop()
