"""gRPC server reflection through the proxy (issue 24): grpcurl, grpcui and Postman ask the
proxy's listener, and get what the upstreams' own reflection services say, filtered to the
services and methods the caller could be allowed to call, for both v1 and v1alpha.

Two real grpcio servers with grpcio-reflection: `hr` (the default upstream; it also lists
agentproxy.v1.Approvals, which the proxy routes elsewhere) and `approvals` (match.service)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc import aio
from grpc_reflection.v1alpha import reflection, reflection_pb2

from agentproxy.proxy.runtime import load_config
from agentproxy.proxy.server import ProxyServer
from agentproxy.v1 import approvals_pb2  # noqa: F401 - its descriptors, for the upstream
from tests.conftest import AUDIENCE, ISSUER, Generated, Keys

POLICY = """
default: deny
rules:
  - id: hr-reads
    agents: [hr-bot]
    actions: ["grpc:/hrtest.v1.Employees/Get", "grpc:/hrtest.v1.Employees/List"]
    when: 'args.id != "13"'
    effect: allow
  - id: hr-fail-never
    agents: ["*"]
    actions: ["grpc:/hrtest.v1.Employees/Fail"]
    effect: deny
  - id: ops-everything
    agents: [ops-bot]
    actions: ["grpc:/**"]
    effect: allow
"""
NO_REFLECTION = """
  - id: no-reflection
    agents: [hr-bot]
    actions: ["grpc:/grpc.reflection.*/**"]
    effect: deny
"""
VERSIONS = ["grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"]


@dataclass
class Upstreams:
    hr: int
    approvals: int
    methods: list[str]


@pytest.fixture
async def upstreams(hr: Generated) -> AsyncIterator[Upstreams]:
    seen: list[str] = []

    class Record(aio.ServerInterceptor):
        async def intercept_service(self, continuation: Any, details: Any) -> Any:
            seen.append(details.method)
            return await continuation(details)

    hr_server = aio.server(interceptors=[Record()])
    hr_port = hr_server.add_insecure_port("127.0.0.1:0")
    hr.grpc.add_EmployeesServicer_to_server(hr.grpc.EmployeesServicer(), hr_server)
    names = ["hrtest.v1.Employees", "agentproxy.v1.Approvals", reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, hr_server)
    approvals_server = aio.server()
    approvals_port = approvals_server.add_insecure_port("127.0.0.1:0")
    reflection.enable_server_reflection(
        ["agentproxy.v1.Approvals", reflection.SERVICE_NAME], approvals_server
    )
    await hr_server.start()
    await approvals_server.start()
    yield Upstreams(hr_port, approvals_port, seen)
    await hr_server.stop(None)
    await approvals_server.stop(None)


@pytest.fixture
async def proxy_target(
    tmp_path: Path, keys: Keys, upstreams: Upstreams, request: pytest.FixtureRequest
) -> AsyncIterator[str]:
    policy = POLICY + (NO_REFLECTION if getattr(request, "param", "") == "denied" else "")
    (tmp_path / "issuer.pem").write_bytes(keys.public_pem)
    (tmp_path / "secret").write_text("grpc-secret\n")
    (tmp_path / "policy.yaml").write_text(policy)
    (tmp_path / "agentproxy.yaml").write_text(
        f"""
listen: {{http: "127.0.0.1:0", admin: "127.0.0.1:0", grpc: "127.0.0.1:0"}}
upstreams:
  - name: hr
    url: "grpc://127.0.0.1:{upstreams.hr}"
    protocol: grpc
    credentials: {{header: x-api-key, value_file: secret}}
  - name: approvals
    url: "grpc://127.0.0.1:{upstreams.approvals}"
    protocol: grpc
    match: {{service: agentproxy.v1.Approvals}}
identity:
  issuers: [{{issuer: "{ISSUER}", audiences: [{AUDIENCE}], public_key_file: issuer.pem,
             algorithms: [RS256]}}]
policy_files: [policy.yaml]
decision_log: "off"
"""
    )
    server = ProxyServer(load_config(tmp_path / "agentproxy.yaml"), watch_interval=None)
    await server.start()
    yield f"127.0.0.1:{server.grpc_port}"
    await server.stop()


async def reflect(
    target: str,
    token: str | None,
    requests: Sequence[reflection_pb2.ServerReflectionRequest],
    service: str = VERSIONS[0],
) -> list[reflection_pb2.ServerReflectionResponse]:
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    async with aio.insecure_channel(target) as channel:
        info = channel.stream_stream(
            f"/{service}/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        stream = info(metadata=metadata)
        answers: list[reflection_pb2.ServerReflectionResponse] = []
        for request in requests:
            await stream.write(request)
            answer = await stream.read()
            assert isinstance(answer, reflection_pb2.ServerReflectionResponse)
            answers.append(answer)
        await stream.done_writing()
        return answers


def services_of(answer: reflection_pb2.ServerReflectionResponse) -> dict[str, list[str]]:
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in answer.file_descriptor_response.file_descriptor_proto
    ]
    return {f"{f.package}.{s.name}": [m.name for m in s.method] for f in files for s in f.service}


LIST = reflection_pb2.ServerReflectionRequest(list_services="")


def symbol(name: str) -> reflection_pb2.ServerReflectionRequest:
    return reflection_pb2.ServerReflectionRequest(file_containing_symbol=name)


@pytest.mark.parametrize("service", VERSIONS, ids=["v1alpha", "v1"])
async def test_reflection_shows_only_what_the_caller_may_call(
    proxy_target: str, keys: Keys, upstreams: Upstreams, service: str
) -> None:
    answers = await reflect(
        proxy_target,
        keys.token("hr-bot"),
        [
            LIST,
            symbol("hrtest.v1.Employees"),
            symbol("hrtest.v1.Employees.Get"),
            symbol("hrtest.v1.GetRequest"),  # a message type: from whichever upstream has it
            symbol("hrtest.v1.Employees.Fail"),  # denied outright: as if it did not exist
            symbol("agentproxy.v1.Approvals"),  # another upstream's, not for hr-bot
            symbol("no.such.Thing"),
        ],
        service,
    )
    listed, employees, get, message, fail, approvals, missing = answers
    assert [s.name for s in listed.list_services_response.service] == ["hrtest.v1.Employees"]
    assert listed.original_request == LIST
    # only the methods a rule could let hr-bot call; the file's other definitions stay
    assert services_of(employees) == {"hrtest.v1.Employees": ["Get", "List"]}
    assert services_of(get) == {"hrtest.v1.Employees": ["Get", "List"]}
    assert get.original_request == symbol("hrtest.v1.Employees.Get")
    assert message.WhichOneof("message_response") == "file_descriptor_response"
    for refused in (fail, approvals, missing):
        assert refused.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
    # the upstreams were asked in v1alpha, which every grpcio server serves
    assert set(upstreams.methods) == {
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    }


async def test_reflection_spans_upstreams_for_whom_may_call_them(
    proxy_target: str, keys: Keys
) -> None:
    listed, approvals, employees = await reflect(
        proxy_target,
        keys.token("ops-bot"),
        [LIST, symbol("agentproxy.v1.Approvals"), symbol("hrtest.v1.Employees")],
        VERSIONS[1],
    )
    assert [s.name for s in listed.list_services_response.service] == [
        "agentproxy.v1.Approvals",
        "hrtest.v1.Employees",
    ]
    assert "Approve" in services_of(approvals)["agentproxy.v1.Approvals"]
    # deny-overrides: Fail is denied to everyone, ops-bot included
    assert "Fail" not in services_of(employees)["hrtest.v1.Employees"]


async def test_reflection_needs_a_token(proxy_target: str, upstreams: Upstreams) -> None:
    with pytest.raises(aio.AioRpcError) as info:
        await reflect(proxy_target, None, [LIST])
    assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert upstreams.methods == []


async def test_a_principal_allowed_nothing_sees_nothing(proxy_target: str, keys: Keys) -> None:
    listed, employees = await reflect(
        proxy_target, keys.token("stranger"), [LIST, symbol("hrtest.v1.Employees")]
    )
    assert list(listed.list_services_response.service) == []
    assert employees.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


@pytest.mark.parametrize("proxy_target", ["denied"], indirect=True)
async def test_a_deny_rule_turns_reflection_off(
    proxy_target: str, keys: Keys, upstreams: Upstreams
) -> None:
    with pytest.raises(aio.AioRpcError) as info:
        await reflect(proxy_target, keys.token("hr-bot"), [LIST])
    assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert upstreams.methods == []
