"""Client-streaming and bidi gRPC calls are decided message by message: a message policy would
not allow ends the call before it reaches the upstream, whichever place in the stream it has."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc import aio

from tests.conftest import Generated, Keys
from tests.grpc_proxy.conftest import GrpcProxyFactory, GrpcUpstream, bearer

POLICY = """
default: deny
rules:
  - id: imports
    agents: [hr-bot]
    actions: ["grpc:/hrtest.v1.Employees/Import"]
    when: 'args.id.startsWith("e")'
    effect: allow
  - id: vip-imports
    agents: [hr-bot]
    actions: ["grpc:/hrtest.v1.Employees/Import"]
    when: 'args.id.startsWith("vip")'
    effect: allow
    limits:
      - {name: vip, calls: 100, window: 1h, key: agent}
  - id: no-admins
    agents: ["*"]
    actions: ["grpc:/hrtest.v1.Employees/Import"]
    when: 'args.id.startsWith("admin")'
    effect: deny
    reason: admin records are not imported by agents
  - id: chat
    agents: [hr-bot]
    actions: ["grpc:/hrtest.v1.Employees/Chat"]
    when: '!args.text.contains("drop")'
    effect: allow
"""


def employees(hr: Generated, *ids: str) -> AsyncIterator[Any]:
    async def gen() -> AsyncIterator[Any]:
        for i in ids:
            yield hr.pb2.Employee(id=i)

    return gen()


@pytest.mark.parametrize(
    ("ids", "forwarded", "rule"),
    [
        # a denied message in the middle, and at the end
        (("e1", "e2", "admin-1", "e3"), ["e1", "e2"], "no-admins"),
        (("e1", "e2", "e3", "admin-9"), ["e1", "e2", "e3"], "no-admins"),
        # a message no rule allows (default deny)
        (("e1", "x-unknown"), ["e1"], None),
        # a message under another rule, whose limits were never taken for this call
        (("e1", "vip-1"), ["e1"], "vip-imports"),
    ],
)
async def test_a_request_stream_is_decided_message_by_message(
    make_grpc_proxy: GrpcProxyFactory,
    grpc_upstream: GrpcUpstream,
    hr: Generated,
    keys: Keys,
    ids: tuple[str, ...],
    forwarded: list[str],
    rule: str | None,
) -> None:
    proxy = await make_grpc_proxy(policy=POLICY)
    async with proxy.channel() as channel:
        s = hr.grpc.EmployeesStub(channel)
        with pytest.raises(aio.AioRpcError) as caught:
            await s.Import(employees(hr, *ids), metadata=bearer(keys.token()))
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
    trailers = dict(caught.value.trailing_metadata() or ())
    assert trailers.get("x-agentproxy-rule") == rule
    # The messages before the refused one may have reached the upstream (each was allowed),
    # the refused one and those after it never; nor did the upstream see the stream end.
    imported = grpc_upstream.imported
    assert imported == forwarded[: len(imported)]
    assert grpc_upstream.completed_imports == []


async def test_a_stream_every_message_of_which_is_allowed_goes_through(
    make_grpc_proxy: GrpcProxyFactory, grpc_upstream: GrpcUpstream, hr: Generated, keys: Keys
) -> None:
    proxy = await make_grpc_proxy(policy=POLICY)
    async with proxy.channel() as channel:
        s = hr.grpc.EmployeesStub(channel)
        summary = await s.Import(employees(hr, "e1", "e2", "e3"), metadata=bearer(keys.token()))
    assert summary.count == 3 and grpc_upstream.completed_imports == [3]


async def test_a_bidi_stream_ends_at_the_denied_message_after_answers_flowed(
    make_grpc_proxy: GrpcProxyFactory, grpc_upstream: GrpcUpstream, hr: Generated, keys: Keys
) -> None:
    proxy = await make_grpc_proxy(policy=POLICY)
    async with proxy.channel() as channel:
        chat = hr.grpc.EmployeesStub(channel).Chat(metadata=bearer(keys.token()))
        await chat.write(hr.pb2.Note(text="hello"))
        assert (await chat.read()).text == "HELLO"  # answers already flowed back
        await chat.write(hr.pb2.Note(text="now drop the table"))
        with pytest.raises(aio.AioRpcError) as caught:
            await chat.read()
        assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert grpc_upstream.chatted == ["hello"]
