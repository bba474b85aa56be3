"""agentproxy.v1 on the admin gRPC listener: Authorizer.Check and Approvals, real channels."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import grpc
import pytest
from google.protobuf import struct_pb2
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentproxy.approvals.lifecycle import Event
from agentproxy.v1 import approvals_pb2, approvals_pb2_grpc, authorizer_pb2, authorizer_pb2_grpc
from tests.conftest import DEFAULT_POLICY, Generated, Keys
from tests.grpc_proxy.conftest import (
    GRPC_POLICY,
    GrpcProxy,
    GrpcProxyFactory,
    GrpcUpstream,
    bearer,
)

Outcome = authorizer_pb2.Outcome
BOTH = DEFAULT_POLICY + GRPC_POLICY.split("rules:\n", 1)[1]

APPROVAL_POLICY = (
    BOTH
    + """
  - id: raises
    agents: [hr-bot]
    actions: ["grpc:/hrtest.v1.Employees/Import"]
    effect: require_approval
    reason: imports change payroll
    approval: {approvers: ["user:carol"], timeout: 1h, hold: 0s}
"""
).replace('"grpc:/hrtest.v1.Employees/Import",\n              ', "")


def admin(proxy: GrpcProxy) -> aio.Channel:
    return aio.insecure_channel(f"127.0.0.1:{proxy.server.admin_grpc_port}")


def authorizer(channel: aio.Channel) -> Any:
    make: Any = authorizer_pb2_grpc.AuthorizerStub  # generated, untyped
    return make(channel)


def approvals(channel: aio.Channel) -> Any:
    make: Any = approvals_pb2_grpc.ApprovalsStub
    return make(channel)


async def http_answer(proxy: GrpcProxy, token: str | None, method: str, path: str) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, f"http://127.0.0.1:{proxy.server.http_port}{path}", headers=headers) as r,
    ):
        return r.status


async def test_check_answers_what_the_http_path_answers(
    make_grpc_proxy: GrpcProxyFactory, keys: Keys
) -> None:
    proxy = await make_grpc_proxy(policy=BOTH, admin_grpc=True)
    hr, intern, ops = keys.token(), keys.token("intern"), keys.token("ops-bot", roles=["ops"])
    cases = [
        (hr, "GET", "/v1/employees/42", Outcome.ALLOWED),
        (hr, "GET", "/v1/employees/13", Outcome.DENIED),
        (hr, "GET", "/v1/employees/42/salary", Outcome.DENIED),
        (intern, "GET", "/v1/employees/42", Outcome.DENIED),
        (ops, "DELETE", "/v1/employees/42", Outcome.ALLOWED),
        (None, "GET", "/v1/employees/42", Outcome.UNAUTHENTICATED),
        ("not-a-jwt", "GET", "/v1/employees/42", Outcome.UNAUTHENTICATED),
        (hr, "GET", "/v1/employees/%2e%2e/13", Outcome.DENIED),  # resolves to /v1/13
        (hr, "GET", "/v1/employees/42;jsessionid=x", Outcome.INVALID),
    ]
    async with admin(proxy) as channel:
        for token, method, path, expected in cases:
            answer = await authorizer(channel).Check(
                authorizer_pb2.CheckRequest(
                    token=token or "", http=authorizer_pb2.HttpCall(method=method, path=path)
                )
            )
            status = await http_answer(proxy, token, method, path)
            assert (answer.outcome, answer.http_status) == (expected, status), (method, path)
            if expected == Outcome.ALLOWED:
                assert answer.context["x-agentproxy-agent"] in ("hr-bot", "ops-bot")
                assert answer.context["x-agentproxy-decision"] == answer.decision_id
                assert answer.context["x-agentproxy-context"].count(".") == 2
            else:
                assert not answer.context
    denied = await _check_http(proxy, hr, "GET", "/v1/employees/42/salary")
    assert (denied.rule, denied.effect, denied.grpc_code) == ("no-salaries", "deny", 7)
    assert denied.problem_type.endswith("/denied")
    assert "salaries are out of bounds" in denied.reason


async def _check_http(proxy: GrpcProxy, token: str, method: str, path: str) -> Any:
    async with admin(proxy) as channel:
        return await authorizer(channel).Check(
            authorizer_pb2.CheckRequest(
                token=token, http=authorizer_pb2.HttpCall(method=method, path=path)
            )
        )


async def test_check_answers_what_the_grpc_path_answers(
    make_grpc_proxy: GrpcProxyFactory, grpc_upstream: GrpcUpstream, hr: Generated, keys: Keys
) -> None:
    proxy = await make_grpc_proxy(policy=BOTH, admin_grpc=True)
    token = keys.token()
    async with admin(proxy) as a, proxy.channel() as data:
        cases: list[tuple[dict[str, Any], grpc.StatusCode]] = [
            ({"id": "42"}, grpc.StatusCode.OK),
            ({"id": "13"}, grpc.StatusCode.PERMISSION_DENIED),
            ({"id": "7", "amount": 5000}, grpc.StatusCode.PERMISSION_DENIED),
        ]
        for fields, expected in cases:
            args = struct_pb2.Struct()
            args.update(fields)
            answer = await authorizer(a).Check(
                authorizer_pb2.CheckRequest(
                    token=token,
                    grpc=authorizer_pb2.GrpcCall(method="/hrtest.v1.Employees/Get", args=args),
                )
            )
            try:
                await hr.grpc.EmployeesStub(data).Get(
                    hr.pb2.GetRequest(**fields), metadata=bearer(token)
                )
                code = grpc.StatusCode.OK
            except aio.AioRpcError as error:
                code = error.code()
            assert code is expected
            assert answer.grpc_code == expected.value[0], fields
            assert answer.action == "grpc:/hrtest.v1.Employees/Get"
            serialized = await authorizer(a).Check(
                authorizer_pb2.CheckRequest(
                    token=token,
                    grpc=authorizer_pb2.GrpcCall(
                        method="/hrtest.v1.Employees/Get",
                        message=hr.pb2.GetRequest(**fields).SerializeToString(),
                    ),
                )
            )
            assert serialized.grpc_code == expected.value[0], fields
        args = struct_pb2.Struct()
        args.update({"id": "1", "no_such_field": 1})
        for call in (
            authorizer_pb2.GrpcCall(method="/hrtest.v1.Employees/Get", args=args),
            authorizer_pb2.GrpcCall(method="/hrtest.v1.Employees/Get", message=b"\xff\xff"),
            authorizer_pb2.GrpcCall(method="/hrtest.v1.Employees/../Get"),
        ):
            answer = await authorizer(a).Check(authorizer_pb2.CheckRequest(token=token, grpc=call))
            assert (answer.outcome, answer.grpc_code) == (Outcome.INVALID, 3), call


async def test_check_of_an_mcp_call_and_of_nothing(
    make_grpc_proxy: GrpcProxyFactory, keys: Keys
) -> None:
    policy = BOTH + (
        "  - id: small-transfers\n    agents: [hr-bot]\n"
        '    actions: ["mcp:tools/call/payments.transfer"]\n'
        "    when: 'args.amount <= 100'\n    effect: allow\n"
    )
    proxy = await make_grpc_proxy(policy=policy, admin_grpc=True)
    async with admin(proxy) as channel:
        cases: list[tuple[dict[str, Any], Any]] = [
            ({"amount": 50}, Outcome.ALLOWED),
            ({"amount": 500}, Outcome.DENIED),
            # The caller will forward these as JSON: a Go tool would read 5000000 (issue 20.2).
            ({"amount": 50, "AMOUNT": 5000000}, Outcome.INVALID),
            ({"amount": 50, "memo": {"to": "a", "TO": "b"}}, Outcome.INVALID),
        ]
        for values, expected in cases:
            arguments = struct_pb2.Struct()
            arguments.update(values)
            answer = await authorizer(channel).Check(
                authorizer_pb2.CheckRequest(
                    token=keys.token(),
                    mcp=authorizer_pb2.McpCall(
                        method="tools/call", name="payments.transfer", arguments=arguments
                    ),
                )
            )
            assert answer.outcome == expected, values
            if expected == Outcome.INVALID:
                assert "one key to a parser that ignores case" in answer.reason
            else:
                assert answer.action == "mcp:tools/call/payments.transfer"
        empty = await authorizer(channel).Check(authorizer_pb2.CheckRequest(token=keys.token()))
        assert empty.outcome == Outcome.INVALID and "one of http, grpc or mcp" in empty.reason


async def test_checks_and_proxied_calls_share_limits(
    make_grpc_proxy: GrpcProxyFactory, keys: Keys
) -> None:
    policy = BOTH.replace(
        "    reason: HR reads employee records\n",
        "    reason: HR reads employee records\n"
        "    limits: [{name: reads, calls: 2, window: 1m, key: principal.agent}]\n",
        1,
    )
    proxy = await make_grpc_proxy(policy=policy, admin_grpc=True)
    token = keys.token()
    first = await _check_http(proxy, token, "GET", "/v1/employees/1")
    assert first.outcome == Outcome.ALLOWED
    assert await http_answer(proxy, token, "GET", "/v1/employees/2") == 200
    limited = await _check_http(proxy, token, "GET", "/v1/employees/3")
    assert (limited.outcome, limited.limit, limited.http_status) == (Outcome.LIMITED, "reads", 429)
    assert limited.retry_after_seconds >= 1
    assert await http_answer(proxy, token, "GET", "/v1/employees/4") == 429


async def test_approval_over_grpc_end_to_end(
    make_grpc_proxy: GrpcProxyFactory, grpc_upstream: GrpcUpstream, hr: Generated, keys: Keys
) -> None:
    proxy = await make_grpc_proxy(policy=APPROVAL_POLICY, admin_grpc=True)
    agent, carol, mallory = keys.token(), keys.token("carol"), keys.token("mallory")

    async def one_import() -> Any:
        async def employees() -> Any:
            yield hr.pb2.Employee(id="new-1")

        return await hr.grpc.EmployeesStub(data).Import(employees(), metadata=bearer(agent))

    async with admin(proxy) as a, proxy.channel() as data:
        watch = approvals(a).Watch(approvals_pb2.WatchApprovalsRequest(), metadata=bearer(carol))
        with pytest.raises(aio.AioRpcError) as caught:
            await one_import()
        assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        trailers = dict(caught.value.trailing_metadata() or ())
        approval_id = trailers["x-agentproxy-approval-id"]
        assert trailers["x-agentproxy-rule"] == "raises"
        assert approval_id in (caught.value.details() or "")
        assert grpc_upstream.imported == []

        event = await asyncio.wait_for(watch.read(), 5)
        assert event.event in ("pending", "requested") and event.approval.id == approval_id
        assert event.approval.action == "grpc:/hrtest.v1.Employees/Import"

        listed = await approvals(a).List(
            approvals_pb2.ListApprovalsRequest(), metadata=bearer(carol)
        )
        assert [x.id for x in listed.approvals] == [approval_id]
        # A list names the arguments by digest; Get has them whole, as JSON.
        assert listed.approvals[0].arguments_json == ""
        assert len(listed.approvals[0].arguments_sha256) == 64
        got = await approvals(a).Get(
            approvals_pb2.GetApprovalRequest(id=approval_id), metadata=bearer(carol)
        )
        assert json.loads(got.arguments_json)["id"] == "new-1"
        assert got.arguments_bytes == len(got.arguments_json.replace(" ", ""))
        hidden = await approvals(a).List(
            approvals_pb2.ListApprovalsRequest(), metadata=bearer(mallory)
        )
        assert list(hidden.approvals) == []
        with pytest.raises(aio.AioRpcError) as caught:
            await approvals(a).Get(approvals_pb2.GetApprovalRequest(id=approval_id))
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(aio.AioRpcError) as caught:
            await approvals(a).Approve(
                approvals_pb2.DecideApprovalRequest(id=approval_id), metadata=bearer(agent)
            )
        assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(aio.AioRpcError) as caught:
            await approvals(a).Approve(
                approvals_pb2.DecideApprovalRequest(id="nope"), metadata=bearer(carol)
            )
        assert caught.value.code() is grpc.StatusCode.NOT_FOUND

        approved = await approvals(a).Approve(
            approvals_pb2.DecideApprovalRequest(id=approval_id, reason="ok for Q4"),
            metadata=bearer(carol),
        )
        assert (approved.state, approved.decided_by) == ("approved", "carol")
        event = await asyncio.wait_for(watch.read(), 5)
        assert (event.event, event.approval.state) == ("approved", "approved")
        watch.cancel()

        summary = await one_import()
        assert summary.count == 1 and grpc_upstream.imported == ["new-1"]
        with pytest.raises(aio.AioRpcError) as caught:
            await approvals(a).Deny(
                approvals_pb2.DecideApprovalRequest(id=approval_id), metadata=bearer(carol)
            )
        assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION


async def test_admin_grpc_health_and_no_listener_by_default(
    make_grpc_proxy: GrpcProxyFactory,
) -> None:
    proxy = await make_grpc_proxy(admin_grpc=True)
    async with admin(proxy) as channel:
        health: Any = health_pb2_grpc.HealthStub(channel)
        answer = await health.Check(health_pb2.HealthCheckRequest())
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    plain = await make_grpc_proxy()
    assert plain.server.admin_grpc_port == 0


async def test_watch_sees_the_fleet_through_the_shared_store(
    make_grpc_proxy: GrpcProxyFactory,
    grpc_upstream: GrpcUpstream,
    hr: Generated,
    keys: Keys,
    redis_url: str,
) -> None:
    """An approval opened and decided on replica A reaches a Watch on replica B."""
    store = f'store: {{redis: {{url: "{redis_url}"}}}}'
    a = await make_grpc_proxy(policy=APPROVAL_POLICY, extra=store)
    b = await make_grpc_proxy(policy=APPROVAL_POLICY, extra=store, admin_grpc=True)
    carol = keys.token("carol")

    async def employees() -> Any:
        yield hr.pb2.Employee(id="x")

    async with admin(b) as channel, a.channel() as data:
        watch = approvals(channel).Watch(
            approvals_pb2.WatchApprovalsRequest(), metadata=bearer(carol)
        )
        await asyncio.sleep(0.2)  # the Watch has read the (empty) pending list
        with pytest.raises(aio.AioRpcError) as caught:
            await hr.grpc.EmployeesStub(data).Import(employees(), metadata=bearer(keys.token()))
        approval_id = dict(caught.value.trailing_metadata() or ())["x-agentproxy-approval-id"]
        event = await asyncio.wait_for(watch.read(), 5)
        assert (event.event, event.approval.id) == ("requested", approval_id)
        decided = await a.server.backend.decide_approval(
            approval_id, Event.APPROVE, await a.server.backend.approver(carol), "fine"
        )
        assert decided.state.value == "approved"
        event = await asyncio.wait_for(watch.read(), 5)
        assert (event.event, event.approval.id) == ("approved", approval_id)
        watch.cancel()
