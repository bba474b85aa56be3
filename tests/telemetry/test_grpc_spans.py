"""A gRPC call through the proxy's gRPC listener is an RPC span: rpc.system, service, method
and status code, and the upstream's traceparent metadata names the SERVER span."""

from __future__ import annotations

import grpc
import pytest

from tests.conftest import Generated, Keys
from tests.grpc_proxy.conftest import (
    GrpcProxyFactory,
    GrpcUpstream,
    bearer,
    grpc_upstream,
    make_grpc_proxy,
)
from tests.telemetry.conftest import telemetry
from tests.telemetry.receiver import Received

__all__ = ["grpc_upstream", "make_grpc_proxy"]  # fixtures, shared with tests/grpc_proxy


async def test_a_grpc_call_is_an_rpc_span(
    make_grpc_proxy: GrpcProxyFactory,
    grpc_upstream: GrpcUpstream,
    hr: Generated,
    keys: Keys,
    collector: Received,
) -> None:
    proxy = await make_grpc_proxy(extra=telemetry(collector))
    async with proxy.channel() as channel:
        employees = hr.grpc.EmployeesStub(channel)
        employee = await employees.Get(
            hr.pb2.GetRequest(id="emp-4711"), metadata=bearer(keys.token())
        )
        assert employee.name == "Employee emp-4711"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await employees.Get(hr.pb2.GetRequest(id="13"), metadata=bearer(keys.token()))
        assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
    spans = await collector.wait(7)
    servers = [s for s in spans if s.kind == 2]
    assert len(servers) == 2
    allowed = next(s for s in servers if s.attributes["rpc.grpc.status_code"] == 0)
    assert allowed.name == "hrtest.v1.Employees/Get"
    attrs = allowed.attributes
    assert (attrs["rpc.system"], attrs["rpc.service"], attrs["rpc.method"]) == (
        "grpc",
        "hrtest.v1.Employees",
        "Get",
    )
    assert attrs["gen_ai.security.policy.rule.id"] == "grpc-reads"
    trace_id, span_id = grpc_upstream.metadata()["traceparent"].split("-")[1:3]
    assert (trace_id, span_id) == (allowed.trace_id, allowed.span_id)
    denied = next(s for s in servers if s is not allowed)
    assert denied.attributes["rpc.grpc.status_code"] == 7
    assert denied.attributes["gen_ai.security.verdict.type"] == "deny"
    # The message's fields (the argument policy read) are on no span.
    assert not any("emp-4711" in str(v) for s in spans for v in s.attributes.values())
    assert b"emp-4711" not in b"".join(collector.raw)
