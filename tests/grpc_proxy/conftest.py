"""A real gRPC upstream generated from tests/grpc/proto/hrgrpc.proto, and a proxy with a gRPC
listener in front of it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio

from agentproxy.proxy.runtime import load_config
from agentproxy.proxy.server import ProxyServer
from tests.conftest import Generated, Keys, Upstream, write_config

GRPC_POLICY = """
default: deny
rules:
  - id: grpc-reads
    agents: [hr-bot]
    actions: ["grpc:/hrtest.v1.Employees/Get", "grpc:/hrtest.v1.Employees/Slow",
              "grpc:/hrtest.v1.Employees/Fail"]
    when: 'args.id != "13"'
    effect: allow
    reason: HR reads employee records, except record 13
  - id: list-and-import
    agents: [hr-bot]
    actions: ["grpc:/hrtest.v1.Employees/List", "grpc:/hrtest.v1.Employees/Import",
              "grpc:/hrtest.v1.Employees/Chat"]
    effect: allow
  - id: big-amounts
    agents: ["*"]
    actions: ["grpc:/hrtest.v1.Employees/Get"]
    when: 'args.amount > 1000'
    effect: deny
    reason: amounts above 1000 need a human
"""


@dataclass
class GrpcUpstream:
    port: int
    seen: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    imported: list[str] = field(default_factory=list)
    completed_imports: list[int] = field(default_factory=list)  # streams that ended whole
    chatted: list[str] = field(default_factory=list)
    deadlines: list[float | None] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"grpc://127.0.0.1:{self.port}"

    def metadata(self, index: int = -1) -> dict[str, Any]:
        return self.seen[index][1]


def employees_servicer(hr: Generated, state: GrpcUpstream) -> Any:
    pb2 = hr.pb2

    def remember(name: str, context: aio.ServicerContext[Any, Any]) -> None:
        state.seen.append((name, {k: v for k, v in context.invocation_metadata() or ()}))
        state.deadlines.append(context.time_remaining())

    class Employees(hr.grpc.EmployeesServicer):  # type: ignore[name-defined,misc]
        async def Get(self, request: Any, context: Any) -> Any:
            remember("Get", context)
            await context.send_initial_metadata((("x-upstream-initial", "yes"),))
            context.set_trailing_metadata((("x-upstream-trailer", "done"),))
            return pb2.Employee(id=request.id, name=f"Employee {request.id}")

        async def List(self, request: Any, context: Any) -> AsyncIterator[Any]:
            remember("List", context)
            for i in range(request.count):
                yield pb2.Employee(id=str(i), name=request.dept)

        async def Import(self, requests: Any, context: Any) -> Any:
            remember("Import", context)
            count, size = 0, 0
            while (employee := await context.read()) is not aio.EOF:
                count += 1
                size += len(employee.photo)
                state.imported.append(employee.id)
            # grpcio ends the request stream of a cancelled call as if it were complete; a
            # second read tells them apart (it raises CancelledError for a cancelled call), as
            # a careful server must before acting on the whole stream.
            if await context.read() is aio.EOF:
                state.completed_imports.append(count)
            return pb2.ImportSummary(count=count, bytes=size)

        async def Chat(self, requests: Any, context: Any) -> AsyncIterator[Any]:
            remember("Chat", context)
            async for note in requests:
                state.chatted.append(note.text)
                yield pb2.Note(text=note.text.upper())

        async def Slow(self, request: Any, context: Any) -> Any:
            remember("Slow", context)
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                state.cancelled.set()
                raise
            return pb2.Employee(id=request.id)

        async def Fail(self, request: Any, context: Any) -> Any:
            remember("Fail", context)
            code = next(c for c in grpc.StatusCode if c.value[0] == request.code)
            await context.abort(
                code,
                f"upstream says {code.name}",
                trailing_metadata=(("x-why", "asked"), ("x-blob-bin", b"\x00\xff")),
            )

    return Employees()


@pytest.fixture
async def grpc_upstream(hr: Generated) -> AsyncIterator[GrpcUpstream]:
    server = aio.server()
    state = GrpcUpstream(port=server.add_insecure_port("127.0.0.1:0"))
    hr.grpc.add_EmployeesServicer_to_server(employees_servicer(hr, state), server)
    await server.start()
    yield state
    await server.stop(None)


@dataclass
class GrpcProxy:
    server: ProxyServer
    target: str
    dir: Path

    def channel(self) -> aio.Channel:
        return aio.insecure_channel(self.target)


GrpcProxyFactory = Callable[..., Awaitable[GrpcProxy]]


def grpc_config(
    d: Path,
    keys: Keys,
    http_url: str,
    grpc_url: str,
    *,
    policy: str = GRPC_POLICY,
    grpc_extra: str = "",
    extra: str = "",
    descriptor_set: Path | None = None,
    admin_grpc: bool = False,
) -> Path:
    """A write_config config with a gRPC listener and a gRPC upstream `hr` beside `tool`."""
    descriptor = f"\n    descriptor_set: {descriptor_set}" if descriptor_set else ""
    path = write_config(
        d,
        keys,
        http_url,
        policy=policy,
        extra=extra,
        upstream_extra=(
            f'  - name: hr\n    url: "{grpc_url}"\n    protocol: grpc\n'
            f"    credentials: {{header: x-api-key, value_file: secret}}{descriptor}\n" + grpc_extra
        ),
    )
    listen = 'admin: "127.0.0.1:0", grpc: "127.0.0.1:0"'
    if admin_grpc:
        listen += ', admin_grpc: "127.0.0.1:0"'
    path.write_text(path.read_text().replace('admin: "127.0.0.1:0"', listen))
    return path


@pytest.fixture
async def make_grpc_proxy(
    tmp_path: Path, keys: Keys, upstream: Upstream, grpc_upstream: GrpcUpstream, hr: Generated
) -> AsyncIterator[GrpcProxyFactory]:
    servers: list[ProxyServer] = []

    async def factory(**kw: Any) -> GrpcProxy:
        d = tmp_path / f"proxy{len(servers)}"
        d.mkdir()
        if kw.pop("descriptors", True):
            kw.setdefault("descriptor_set", hr.descriptor_set)
        path = grpc_config(d, keys, upstream.url, kw.pop("grpc_url", grpc_upstream.url), **kw)
        server = ProxyServer(load_config(path), watch_interval=None)
        await server.start()
        servers.append(server)
        return GrpcProxy(server, f"127.0.0.1:{server.grpc_port}", d)

    yield factory
    for server in servers:
        await server.stop()


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)
