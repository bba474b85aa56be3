"""OTLP trace receivers for the tests, built on opentelemetry-proto: a real gRPC
`TraceService` and a real HTTP `POST /v1/traces`, each keeping every span it was sent (and
the raw bytes, so a test can look for what must never be exported)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from aiohttp import web
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from tests.conftest import start_app


@dataclass
class Span:
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    attributes: dict[str, Any]
    status: int
    start: int
    end: int
    resource: dict[str, Any]


@dataclass
class Received:
    endpoint: str = ""
    protocol: str = "grpc"
    spans: list[Span] = field(default_factory=list)
    raw: list[bytes] = field(default_factory=list)

    def take(self, request: trace_service_pb2.ExportTraceServiceRequest, raw: bytes) -> None:
        self.raw.append(raw)
        for resource_spans in request.resource_spans:
            resource = {a.key: value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    self.spans.append(
                        Span(
                            s.name,
                            s.trace_id.hex(),
                            s.span_id.hex(),
                            s.parent_span_id.hex(),
                            s.kind,
                            {a.key: value(a.value) for a in s.attributes},
                            s.status.code,
                            s.start_time_unix_nano,
                            s.end_time_unix_nano,
                            resource,
                        )
                    )

    async def wait(self, count: int, within: float = 10.0) -> list[Span]:
        """The spans received once there are at least `count` (fails after `within` seconds)."""
        deadline = time.monotonic() + within
        while len(self.spans) < count:
            assert time.monotonic() < deadline, f"{len(self.spans)} span(s), wanted {count}"
            await asyncio.sleep(0.05)
        return self.spans

    def trace(self, trace_id: str) -> list[Span]:
        return [s for s in self.spans if s.trace_id == trace_id]


def value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [value(x) for x in v.array_value.values]
    return None if kind is None else getattr(v, kind)


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, received: Received) -> None:
        self.received = received

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.received.take(request, request.SerializeToString())
        return trace_service_pb2.ExportTraceServiceResponse()


async def grpc_receiver() -> AsyncIterator[Received]:
    received = Received()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
        _TraceService(received), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    received.endpoint = f"http://127.0.0.1:{port}"
    try:
        yield received
    finally:
        await server.stop(None)


async def http_receiver() -> AsyncIterator[Received]:
    received = Received(protocol="http/protobuf")

    async def export(request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        body = await request.read()
        message = trace_service_pb2.ExportTraceServiceRequest()
        message.ParseFromString(body)
        received.take(message, body)
        return web.Response(
            body=trace_service_pb2.ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    app = web.Application()
    app.router.add_post("/v1/traces", export)
    runner, port = await start_app(app)
    received.endpoint = f"http://127.0.0.1:{port}"
    try:
        yield received
    finally:
        await runner.cleanup()
