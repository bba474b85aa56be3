"""The gRPC data plane against a real gRPC upstream, with real grpc.aio clients."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from agentproxy.audit.verify import verify
from tests.conftest import UPSTREAM_SECRET, Generated, Keys
from tests.grpc_proxy.conftest import (
    GRPC_POLICY,
    GrpcProxyFactory,
    GrpcUpstream,
    bearer,
    employees_servicer,
)
from tests.harness.redis import MakeRedisServer


def stub(hr: Generated, channel: aio.Channel) -> Any:
    return hr.grpc.EmployeesStub(channel)


def policy_for(path: str) -> str:
    """The stream path is the one without a descriptor set: rules there cannot read args."""
    if path == "unary":
        return GRPC_POLICY
    return GRPC_POLICY.replace("    when: 'args.id != \"13\"'\n", "").replace(
        "    when: 'args.amount > 1000'\n", "    when: 'false'\n"
    )


def unary(channel: aio.Channel, method: str) -> Any:
    """A raw-bytes unary method (no serializers): whatever bytes the test chooses."""
    return channel.unary_unary(method)


def trailers(error: aio.AioRpcError) -> dict[str, Any]:
    return dict(error.trailing_metadata() or ())


@pytest.mark.parametrize("path", ["unary", "stream"])
async def test_unary_allowed_with_metadata_both_ways(
    make_grpc_proxy: GrpcProxyFactory,
    grpc_upstream: GrpcUpstream,
    hr: Generated,
    keys: Keys,
    path: str,
) -> None:
    proxy = await make_grpc_proxy(descriptors=path == "unary", policy=policy_for(path))
    async with proxy.channel() as channel:
        call = stub(hr, channel).Get(
            hr.pb2.GetRequest(id="42"),
            metadata=(*bearer(keys.token()), ("x-request-id", "r-1"), ("x-trace-bin", b"\x01\x02")),
        )
        employee = await call
        assert employee.name == "Employee 42"
        assert ("x-upstream-initial", "yes") in tuple(await call.initial_metadata())
        assert ("x-upstream-trailer", "done") in tuple(await call.trailing_metadata())
        assert await call.code() is grpc.StatusCode.OK
    seen = grpc_upstream.metadata()
    assert seen["x-request-id"] == "r-1"
    assert seen["x-trace-bin"] == b"\x01\x02"
    assert seen["x-agentproxy-agent"] == "hr-bot"
    assert len(seen["x-agentproxy-decision"]) == 24
    assert seen["x-agentproxy-context"].count(".") == 2
    assert seen["traceparent"].startswith("00-")
    assert seen["x-api-key"] == UPSTREAM_SECRET
    assert "authorization" not in seen


async def test_spoofed_context_metadata_and_credential_never_reach_the_upstream(
    make_grpc_proxy: GrpcProxyFactory, grpc_upstream: GrpcUpstream, hr: Generated, keys: Keys
) -> None:
    proxy = await make_grpc_proxy()
    spoofed = (
        ("x-agentproxy-agent", "root"),
        ("x-agentproxy-user", "ceo"),
        ("x-agentproxy-context", "forged.jwt.value"),
        ("x-agentproxy-decision", "fake"),
        ("x-api-key", "agent-chosen-key"),
        ("x-forwarded-for", "10.0.0.1"),
        # `_` for `-`: one key to a service that maps metadata to CGI-style names
        ("x_agentproxy_user", "ceo"),
        ("x_api_key", "agent-chosen-key"),
        ("x_forwarded_for", "10.0.0.1"),
        ("x-real-ip", "10.0.0.1"),
        ("x-http-method-override", "Delete"),
    )
    async with proxy.channel() as channel:
        await stub(hr, channel).Get(
            hr.pb2.GetRequest(id="1"), metadata=(*bearer(keys.token()), *spoofed)
        )
    seen = grpc_upstream.metadata()
    assert seen["x-agentproxy-agent"] == "hr-bot"
    assert "x-agentproxy-user" not in seen
    assert seen["x-agentproxy-decision"] != "fake"
    assert seen["x-agentproxy-context"] != "forged.jwt.value"
    assert seen["x-api-key"] == UPSTREAM_SECRET
    for key in ("x_agentproxy_user", "x_api_key", "x_forwarded_for", "x-real-ip"):
        assert key not in seen, key
    assert "x-http-method-override" not in seen
    assert seen["x-forwarded-for"] == "127.0.0.1"


async def test_every_streaming_kind(
    make_grpc_proxy: GrpcProxyFactory, grpc_upstream: GrpcUpstream, hr: Generated, keys: Keys
) -> None:
    proxy = await make_grpc_proxy()
    md = bearer(keys.token())
    async with proxy.channel() as channel:
        s = stub(hr, channel)
        listed = [e async for e in s.List(hr.pb2.ListRequest(dept="hr", count=50), metadata=md)]
        assert [e.id for e in listed] == [str(i) for i in range(50)]

        async def employees() -> AsyncIterator[Any]:
            for i in range(20):
                yield hr.pb2.Employee(id=f"e{i}", photo=b"x" * 1000)

        summary = await s.Import(employees(), metadata=md)
        assert (summary.count, summary.bytes) == (20, 20_000)
        assert grpc_upstream.imported == [f"e{i}" for i in range(20)]

        chat = s.Chat(metadata=md)
        for word in ("hello", "world"):
            await chat.write(hr.pb2.Note(text=word))
            assert (await chat.read()).text == word.upper()  # a real round trip each time
        await chat.done_writing()
        assert await chat.read() is aio.EOF
        assert await chat.code() is grpc.StatusCode.OK


async def test_no_token_and_bad_token_are_unauthenticated(
    make_grpc_proxy: GrpcProxyFactory, grpc_upstream: GrpcUpstream, hr: Generated, keys: Keys
) -> None:
    proxy = await make_grpc_proxy()
    async with proxy.channel() as channel:
        for metadata in (
            (),
            (("authorization", "Bearer not.a.jwt"),),
            (("authorization", "Basic aGk6dGhlcmU="),),
            (*bearer(keys.token()), *bearer(keys.token())),
            bearer(keys.token(aud="someone-else")),
        ):
            with pytest.raises(aio.AioRpcError) as caught:
                await stub(hr, channel).Get(hr.pb2.GetRequest(id="1"), metadata=metadata)
            assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED, metadata
            assert "x-agentproxy-decision-id" in trailers(caught.value)
    assert grpc_upstream.seen == []


async def test_denied_by_method_and_by_argument(
    make_grpc_proxy: GrpcProxyFactory, grpc_upstream: GrpcUpstream, hr: Generated, keys: Keys
) -> None:
    proxy = await make_grpc_proxy()
    async with proxy.channel() as channel:
        s = stub(hr, channel)
        with pytest.raises(aio.AioRpcError) as caught:
            await s.Get(hr.pb2.GetRequest(id="1"), metadata=bearer(keys.token("intern")))
        assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
        t = trailers(caught.value)
        assert t["x-agentproxy-decision-id"] in (caught.value.details() or "")
        assert "x-agentproxy-rule" not in t  # the default deny has no rule

        with pytest.raises(aio.AioRpcError) as caught:
            await s.Get(hr.pb2.GetRequest(id="13"), metadata=bearer(keys.token()))
        assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED

        with pytest.raises(aio.AioRpcError) as caught:
            await s.Get(hr.pb2.GetRequest(id="7", amount=5000), metadata=bearer(keys.token()))
        assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert trailers(caught.value)["x-agentproxy-rule"] == "big-amounts"
        assert "rule big-amounts" in (caught.value.details() or "")

        ok = await s.Get(hr.pb2.GetRequest(id="7", amount=999), metadata=bearer(keys.token()))
        assert ok.id == "7"
    assert [name for name, _ in grpc_upstream.seen] == ["Get"]


async def test_without_a_descriptor_set_rules_on_args_deny(
    make_grpc_proxy: GrpcProxyFactory, grpc_upstream: GrpcUpstream, hr: Generated, keys: Keys
) -> None:
    """No descriptor set: `args` is empty, so a condition reading it errors, and denies."""
    proxy = await make_grpc_proxy(descriptors=False)
    async with proxy.channel() as channel:
        s = stub(hr, channel)
        with pytest.raises(aio.AioRpcError) as caught:
            await s.Get(hr.pb2.GetRequest(id="1"), metadata=bearer(keys.token()))
        assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
        listed = [
            e async for e in s.List(hr.pb2.ListRequest(count=2), metadata=bearer(keys.token()))
        ]
        assert len(listed) == 2


async def test_a_message_that_does_not_decode_is_invalid_argument(
    make_grpc_proxy: GrpcProxyFactory, grpc_upstream: GrpcUpstream, keys: Keys
) -> None:
    proxy = await make_grpc_proxy()
    async with proxy.channel() as channel:
        get: Any = channel.unary_unary("/hrtest.v1.Employees/Get")
        with pytest.raises(aio.AioRpcError) as caught:
            await get(b"\xff\xff\xff", metadata=bearer(keys.token()))
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "hrtest.v1.GetRequest" in (caught.value.details() or "")
    assert grpc_upstream.seen == []


async def test_unknown_service_and_odd_method_paths(
    make_grpc_proxy: GrpcProxyFactory, grpc_upstream: GrpcUpstream, keys: Keys
) -> None:
    # Only a service-specific upstream, no default: another service has no route.
    proxy = await make_grpc_proxy(grpc_extra="    match: {service: hrtest.v1.Employees}\n")
    async with proxy.channel() as channel:
        with pytest.raises(aio.AioRpcError) as caught:
            await unary(channel, "/other.Svc/Do")(b"", metadata=bearer(keys.token()))
        assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED
        for path in ("/hrtest.v1.Employees/../Get", "/hrtest.v1.Employees/Get/x", "/hr..v1.X/Get"):
            with pytest.raises(aio.AioRpcError) as caught:
                await unary(channel, path)(b"", metadata=bearer(keys.token()))
            assert caught.value.code() in (
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.UNIMPLEMENTED,
            ), path
    assert grpc_upstream.seen == []


@pytest.mark.parametrize("path", ["unary", "stream"])
async def test_upstream_status_details_and_trailers_pass_through(
    make_grpc_proxy: GrpcProxyFactory,
    grpc_upstream: GrpcUpstream,
    hr: Generated,
    keys: Keys,
    path: str,
) -> None:
    proxy = await make_grpc_proxy(descriptors=path == "unary", policy=policy_for(path))
    async with proxy.channel() as channel:
        for code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL):
            with pytest.raises(aio.AioRpcError) as caught:
                await stub(hr, channel).Fail(
                    hr.pb2.GetRequest(id="1", code=code.value[0]), metadata=bearer(keys.token())
                )
            assert caught.value.code() is code
            assert caught.value.details() == f"upstream says {code.name}"
            t = trailers(caught.value)
            assert t["x-why"] == "asked"
            assert t["x-blob-bin"] == b"\x00\xff"


@pytest.mark.parametrize("path", ["unary", "stream"])
async def test_upstream_down_is_unavailable_with_the_decision_id(
    make_grpc_proxy: GrpcProxyFactory,
    hr: Generated,
    keys: Keys,
    path: str,
) -> None:
    from tests.harness.processes import free_port

    proxy = await make_grpc_proxy(
        grpc_url=f"grpc://127.0.0.1:{free_port()}",
        descriptors=path == "unary",
        policy=policy_for(path),
    )
    async with proxy.channel() as channel:
        with pytest.raises(aio.AioRpcError) as caught:
            await stub(hr, channel).Get(hr.pb2.GetRequest(id="1"), metadata=bearer(keys.token()))
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "x-agentproxy-decision-id" in trailers(caught.value)


@pytest.mark.parametrize("path", ["unary", "stream"])
async def test_deadline_exceeded_upstream_and_the_remaining_deadline_travels(
    make_grpc_proxy: GrpcProxyFactory,
    grpc_upstream: GrpcUpstream,
    hr: Generated,
    keys: Keys,
    path: str,
) -> None:
    proxy = await make_grpc_proxy(descriptors=path == "unary", policy=policy_for(path))
    async with proxy.channel() as channel:
        with pytest.raises(aio.AioRpcError) as caught:
            await stub(hr, channel).Slow(
                hr.pb2.GetRequest(id="1"), metadata=bearer(keys.token()), timeout=0.5
            )
        assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    # The upstream got a deadline of its own (what was left), so it gave up too.
    await asyncio.wait_for(grpc_upstream.cancelled.wait(), 5)
    remaining = grpc_upstream.deadlines[-1]
    # grpcio carries a deadline as an absolute time on each side and reads it back against
    # the clock, so what the upstream sees can exceed the caller's 0.5 s by microseconds
    # (0.50017 once, in a full run): "what was left" is at most the caller's, within 10 ms.
    assert remaining is not None and 0 < remaining <= 0.51


@pytest.mark.parametrize("path", ["unary", "stream"])
async def test_cancellation_by_the_client_cancels_upstream(
    make_grpc_proxy: GrpcProxyFactory,
    grpc_upstream: GrpcUpstream,
    hr: Generated,
    keys: Keys,
    path: str,
) -> None:
    proxy = await make_grpc_proxy(descriptors=path == "unary", policy=policy_for(path))
    async with proxy.channel() as channel:
        call = stub(hr, channel).Slow(hr.pb2.GetRequest(id="1"), metadata=bearer(keys.token()))
        for _ in range(100):
            if grpc_upstream.seen:
                break
            await asyncio.sleep(0.02)
        assert grpc_upstream.seen, "the call never reached the upstream"
        call.cancel()
        await asyncio.wait_for(grpc_upstream.cancelled.wait(), 5)


async def test_message_size_limits(
    make_grpc_proxy: GrpcProxyFactory, grpc_upstream: GrpcUpstream, hr: Generated, keys: Keys
) -> None:
    proxy = await make_grpc_proxy(grpc_extra="    max_message_bytes: 2048\n")
    async with proxy.channel() as channel:
        s = stub(hr, channel)
        with pytest.raises(aio.AioRpcError) as caught:
            await s.Get(hr.pb2.GetRequest(id="1", blob=b"x" * 4096), metadata=bearer(keys.token()))
        assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED

        async def employees() -> AsyncIterator[Any]:
            yield hr.pb2.Employee(id="small")
            yield hr.pb2.Employee(id="big", photo=b"x" * 4096)

        with pytest.raises(aio.AioRpcError) as caught:
            await s.Import(employees(), metadata=bearer(keys.token()))
        assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "big" not in grpc_upstream.imported


@pytest.mark.parametrize("descriptors", [True, False])
async def test_an_oversized_message_never_half_closes_the_upstream_stream(
    make_grpc_proxy: GrpcProxyFactory,
    grpc_upstream: GrpcUpstream,
    hr: Generated,
    keys: Keys,
    descriptors: bool,
) -> None:
    """grpcio reports a message over the listener's limit as the end of the stream; the
    upstream must see a cancelled call, never a complete (shorter) one it would act on."""
    proxy = await make_grpc_proxy(
        descriptors=descriptors, grpc_extra="    max_message_bytes: 2048\n"
    )
    for first_ok in (True, False) * 3:  # a race: a few rounds to catch it

        async def employees(first_ok: bool = first_ok) -> AsyncIterator[Any]:
            if first_ok:
                yield hr.pb2.Employee(id="small")
            yield hr.pb2.Employee(id="big", photo=b"x" * 4096)
            yield hr.pb2.Employee(id="after")

        async with proxy.channel() as channel:
            with pytest.raises(aio.AioRpcError) as caught:
                await stub(hr, channel).Import(employees(), metadata=bearer(keys.token()))
        assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    await asyncio.sleep(0.2)  # anything the upstream would still finish
    assert grpc_upstream.completed_imports == []


async def test_compressed_calls_pass(
    make_grpc_proxy: GrpcProxyFactory, grpc_upstream: GrpcUpstream, hr: Generated, keys: Keys
) -> None:
    proxy = await make_grpc_proxy()
    async with aio.insecure_channel(proxy.target, compression=grpc.Compression.Gzip) as channel:
        employee = await stub(hr, channel).Get(
            hr.pb2.GetRequest(id="9", blob=b"a" * 10_000), metadata=bearer(keys.token())
        )
    assert employee.id == "9"


async def test_standard_health_check_needs_no_token(make_grpc_proxy: GrpcProxyFactory) -> None:
    proxy = await make_grpc_proxy()
    async with proxy.channel() as channel:
        health: Any = health_pb2_grpc.HealthStub(channel)
        answer = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def test_calls_are_recorded_with_metrics_and_decision_log(
    make_grpc_proxy: GrpcProxyFactory,
    grpc_upstream: GrpcUpstream,
    hr: Generated,
    keys: Keys,
    capsys: pytest.CaptureFixture[str],
) -> None:
    proxy = await make_grpc_proxy()
    async with proxy.channel() as channel:
        await stub(hr, channel).Get(hr.pb2.GetRequest(id="5"), metadata=bearer(keys.token()))
        with pytest.raises(aio.AioRpcError):
            await stub(hr, channel).Get(hr.pb2.GetRequest(id="13"), metadata=bearer(keys.token()))
    proxy.server.decision_log.flush()
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    calls = [x for x in lines if x.get("action") == "grpc:/hrtest.v1.Employees/Get"]
    assert [(c["effect"], c["status"], c["rpc.grpc.status_code"]) for c in calls] == [
        ("allow", 200, 0),
        ("deny", 403, 7),
    ]
    assert calls[0]["upstream"] == "hr"
    sample = proxy.server.registry.get_sample_value(
        "agentproxy_requests_total",
        {"upstream": "hr", "action": "grpc:/hrtest.v1.Employees/Get", "decision": "allow"},
    )
    assert sample == 1.0


@pytest.fixture
async def reflecting_upstream(hr: Generated) -> AsyncIterator[str]:
    """The same service, with the standard reflection service and no descriptor file."""
    server = aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    hr.grpc.add_EmployeesServicer_to_server(employees_servicer(hr, GrpcUpstream(port)), server)
    names = (
        hr.pb2.DESCRIPTOR.services_by_name["Employees"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server)
    await server.start()
    yield f"grpc://127.0.0.1:{port}"
    await server.stop(None)


async def test_descriptors_fetched_by_reflection(
    make_grpc_proxy: GrpcProxyFactory, reflecting_upstream: str, hr: Generated, keys: Keys
) -> None:
    proxy = await make_grpc_proxy(
        grpc_url=reflecting_upstream,
        descriptors=False,
        grpc_extra="    descriptor_set: reflection\n",
    )
    async with proxy.channel() as channel:
        s = stub(hr, channel)
        assert (await s.Get(hr.pb2.GetRequest(id="1"), metadata=bearer(keys.token()))).id == "1"
        with pytest.raises(aio.AioRpcError) as caught:
            await s.Get(hr.pb2.GetRequest(id="13"), metadata=bearer(keys.token()))
        assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
        descriptors = proxy.server.descriptors

        def known() -> object:
            runtime = proxy.server.pipeline.runtime
            return descriptors.known(runtime, runtime.grpc_routes[""])

        assert known() is not None
        assert await proxy.server.reload()  # a redeployed upstream may have new methods
        assert known() is None
        assert (await s.Get(hr.pb2.GetRequest(id="2"), metadata=bearer(keys.token()))).id == "2"
        assert known() is not None


async def test_without_reflection_on_the_upstream_calls_fail_closed(
    make_grpc_proxy: GrpcProxyFactory, grpc_upstream: GrpcUpstream, hr: Generated, keys: Keys
) -> None:
    proxy = await make_grpc_proxy(descriptors=False, grpc_extra="    descriptor_set: reflection\n")
    async with proxy.channel() as channel:
        for _ in range(2):  # the second is refused from the remembered failure
            with pytest.raises(aio.AioRpcError) as caught:
                await stub(hr, channel).Get(
                    hr.pb2.GetRequest(id="1"), metadata=bearer(keys.token())
                )
            assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "reflection" in (caught.value.details() or "")
    assert grpc_upstream.seen == []


async def test_limits_answer_resource_exhausted_with_retry_after(
    make_grpc_proxy: GrpcProxyFactory, grpc_upstream: GrpcUpstream, hr: Generated, keys: Keys
) -> None:
    policy = GRPC_POLICY.replace(
        '              "grpc:/hrtest.v1.Employees/Chat"]\n    effect: allow\n',
        '              "grpc:/hrtest.v1.Employees/Chat"]\n    effect: allow\n'
        "    limits: [{name: lists, calls: 1, window: 1h, key: principal.agent}]\n",
    )
    assert policy != GRPC_POLICY
    proxy = await make_grpc_proxy(policy=policy)
    async with proxy.channel() as channel:
        request = hr.pb2.ListRequest(count=1)
        assert (
            len([e async for e in stub(hr, channel).List(request, metadata=bearer(keys.token()))])
            == 1
        )
        with pytest.raises(aio.AioRpcError) as caught:
            async for _ in stub(hr, channel).List(request, metadata=bearer(keys.token())):
                pass
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    t = trailers(caught.value)
    assert t["x-agentproxy-limit"] == "lists" and int(t["retry-after"]) >= 1
    assert t["x-agentproxy-rule"] == "list-and-import"
    assert len(grpc_upstream.seen) == 1


async def test_shutdown_lets_grpc_calls_in_flight_finish(
    make_grpc_proxy: GrpcProxyFactory, grpc_upstream: GrpcUpstream, hr: Generated, keys: Keys
) -> None:
    proxy = await make_grpc_proxy()
    async with proxy.channel() as channel:
        chat = stub(hr, channel).Chat(metadata=bearer(keys.token()))
        await chat.write(hr.pb2.Note(text="before"))
        assert (await chat.read()).text == "BEFORE"
        stopping = asyncio.ensure_future(proxy.server.stop())
        await asyncio.sleep(0.3)
        assert not stopping.done()  # waiting for the call in flight
        await chat.write(hr.pb2.Note(text="during"))
        assert (await chat.read()).text == "DURING"
        await chat.done_writing()
        assert await chat.code() is grpc.StatusCode.OK
        await asyncio.wait_for(stopping, 10)


async def test_grpc_calls_are_audited_bytes_fields_included(
    make_grpc_proxy: GrpcProxyFactory, grpc_upstream: GrpcUpstream, hr: Generated, keys: Keys
) -> None:
    """`args` may hold bytes (a proto `bytes` field): the audit record carries them as
    base64 text, so a required audit trail records the call instead of refusing it."""
    proxy = await make_grpc_proxy(extra="audit: {file: audit.jsonl, required: true}")
    async with proxy.channel() as channel:
        employee = await stub(hr, channel).Get(
            hr.pb2.GetRequest(id="5", blob=b"\x00\xff"), metadata=bearer(keys.token())
        )
    assert employee.id == "5"
    await proxy.server.stop()
    report = verify([proxy.dir / "audit.jsonl"], None)
    assert report.ok, report.problems
    records = [json.loads(line) for line in (proxy.dir / "audit.jsonl").read_text().splitlines()]
    (decision,) = [r for r in records if r.get("kind") == "decision"]
    assert decision["action"] == "grpc:/hrtest.v1.Employees/Get"
    assert decision["args"]["blob"] == "base64:AP8="
    (outcome,) = [r for r in records if r.get("kind") == "outcome"]
    assert outcome["status"] == 200


def test_peer_addresses_for_x_forwarded_for() -> None:
    from agentproxy.proxy.grpc import peer_address

    assert peer_address("ipv4:10.0.0.1:5555") == "10.0.0.1"
    assert peer_address("ipv6:[::1]:5555") == "::1"
    assert peer_address("unix:/tmp/socket") is None
    assert peer_address("ipv4:") is None


async def test_health_is_not_serving_until_the_store_is_reached(
    make_grpc_proxy: GrpcProxyFactory, make_redis_server: MakeRedisServer
) -> None:
    """As /readyz: a proxy started before its Redis is not serving, then serving by itself."""
    redis = make_redis_server()
    await asyncio.to_thread(redis.stop)
    proxy = await make_grpc_proxy(extra=f"store: {{redis: {{url: '{redis.url}'}}}}")
    async with proxy.channel() as channel:
        health: Any = health_pb2_grpc.HealthStub(channel)
        answer = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING
        await asyncio.to_thread(redis.start)
        deadline = time.monotonic() + 10
        while (
            await health.Check(health_pb2.HealthCheckRequest(service=""))
        ).status != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, "health never turned serving"
            await asyncio.sleep(0.1)
