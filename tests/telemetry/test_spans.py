"""Calls through a real proxy become OpenTelemetry spans at a real OTLP receiver (gRPC and
HTTP/protobuf): one SERVER span whose id is the parent the upstream sees, children for the
token, the decision and the upstream call, semantic-convention attributes, and never a token,
a header value or an argument."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import aiohttp
import orjson

from tests.conftest import UPSTREAM_SECRET, Keys, ProxyFactory, Upstream
from tests.telemetry.conftest import telemetry
from tests.telemetry.receiver import Received, Span

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
SERVER, INTERNAL = 2, 1  # opentelemetry.proto.trace.v1.Span.SpanKind


def by_name(spans: list[Span]) -> dict[str, Span]:
    return {s.name: s for s in spans}


async def test_the_upstream_sees_the_server_span_as_its_parent(
    make_proxy: ProxyFactory, keys: Keys, upstream: Upstream, receiver: Received, tmp_path: Path
) -> None:
    audit = tmp_path / "audit.jsonl"
    proxy = await make_proxy(extra=telemetry(receiver) + f"audit: {{file: {audit}}}\n")
    token = keys.token(jti="tok-trace-1", task="t-1")
    async with (
        aiohttp.ClientSession() as s,
        s.get(
            proxy.base + "/v1/employees/42?ssn=123-45-6789",
            headers={
                "Authorization": f"Bearer {token}",
                "traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01",
            },
        ) as r,
    ):
        assert r.status == 200
    spans = await receiver.wait(4)
    tree = by_name(receiver.trace(CALLER_TRACE))
    assert set(tree) == {"GET", "verify_token", "apply_guardrail agentproxy", "forward"}
    server = tree["GET"]
    assert server.kind == SERVER
    assert server.parent_id == CALLER_SPAN  # the caller's span is ours' parent
    # The upstream's parent is the SERVER span: its own spans hang under the proxy's.
    sent = upstream.seen[-1].headers["traceparent"]
    assert sent == f"00-{CALLER_TRACE}-{server.span_id}-01"
    for child in ("verify_token", "apply_guardrail agentproxy", "forward"):
        assert tree[child].parent_id == server.span_id
        assert tree[child].kind == INTERNAL
        assert server.start <= tree[child].start <= tree[child].end <= server.end
    assert tree["verify_token"].end <= tree["apply_guardrail agentproxy"].start
    assert tree["apply_guardrail agentproxy"].end <= tree["forward"].start
    attrs = server.attributes
    assert attrs["http.request.method"] == "GET"
    assert attrs["url.path"] == "/v1/employees/42"
    assert attrs["http.response.status_code"] == 200
    assert attrs["gen_ai.agent.id"] == "hr-bot"
    assert attrs["agentproxy.task"] == "t-1"
    assert attrs["gen_ai.security.verdict.type"] == "allow"
    assert attrs["gen_ai.security.action.type"] == "allow"
    assert attrs["gen_ai.security.policy.rule.id"] == "read-employees"
    assert attrs["gen_ai.security.policy.version"]
    guard = tree["apply_guardrail agentproxy"].attributes
    assert guard["gen_ai.operation.name"] == "apply_guardrail"
    assert guard["gen_ai.security.policy.rule.id"] == "read-employees"
    assert server.resource["service.name"] == "agentproxy"
    # Never a token, a credential or an argument (the query's SSN) in what was exported.
    exported = b"".join(receiver.raw)
    for secret in (token, UPSTREAM_SECRET, "123-45-6789", "tok-trace-1"):
        assert secret.encode() not in exported
    assert len(spans) == 4
    # The audit trail names the same trace and span.
    records = [orjson.loads(line) for line in audit.read_bytes().splitlines()]
    decision = next(r for r in records if r.get("kind") == "decision")
    assert (decision["trace_id"], decision["span_id"]) == (CALLER_TRACE, server.span_id)


async def test_a_deny_is_a_blocking_verdict_and_nothing_is_forwarded(
    make_proxy: ProxyFactory, keys: Keys, upstream: Upstream, receiver: Received
) -> None:
    proxy = await make_proxy(extra=telemetry(receiver))
    auth = {"Authorization": f"Bearer {keys.token()}"}
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.base + "/v1/employees/42/salary", headers=auth) as r:
            assert r.status == 403
        async with s.get(proxy.base + "/v1/employees/42", headers={"Authorization": "Bearer x"}):
            pass
    spans = await receiver.wait(5)
    servers = [s for s in spans if s.kind == SERVER]
    assert len(servers) == 2
    denied = next(s for s in servers if s.attributes.get("gen_ai.security.verdict.type"))
    assert denied.parent_id == ""  # a trace the proxy started
    assert denied.attributes["gen_ai.security.verdict.type"] == "deny"
    assert denied.attributes["gen_ai.security.action.type"] == "block"
    assert denied.attributes["gen_ai.security.policy.rule.id"] == "no-salaries"
    assert denied.attributes["http.response.status_code"] == 403
    assert denied.status == 0  # a refused caller is not the server's error
    names = {s.name for s in receiver.trace(denied.trace_id)}
    assert names == {"GET", "verify_token", "apply_guardrail agentproxy"}
    # The bad token: its verification span failed, and nothing was decided.
    bad = next(s for s in servers if s is not denied)
    failed = by_name(receiver.trace(bad.trace_id))
    assert set(failed) == {"GET", "verify_token"}
    assert failed["verify_token"].status == 2  # STATUS_CODE_ERROR
    assert failed["verify_token"].attributes["error.type"]
    assert upstream.seen == []


async def test_sampling_is_parent_based(
    make_proxy: ProxyFactory, keys: Keys, upstream: Upstream, receiver: Received
) -> None:
    proxy = await make_proxy(extra=telemetry(receiver, ratio=0))
    auth = {"Authorization": f"Bearer {keys.token()}"}
    async with aiohttp.ClientSession() as s:
        # No parent, ratio 0: not traced, and the upstream is told so (sampled flag 00).
        async with s.get(proxy.base + "/v1/employees/1", headers=auth) as r:
            assert r.status == 200
        assert upstream.seen[-1].headers["traceparent"].endswith("-00")
        # A caller that samples its trace: traced whatever the ratio.
        sampled = {**auth, "traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}
        async with s.get(proxy.base + "/v1/employees/2", headers=sampled) as r:
            assert r.status == 200
        # A caller that does not: not traced, and its flag is passed on.
        unsampled = {**auth, "traceparent": f"00-{'c' * 32}-{CALLER_SPAN}-00"}
        async with s.get(proxy.base + "/v1/employees/3", headers=unsampled) as r:
            assert r.status == 200
        assert upstream.seen[-1].headers["traceparent"].endswith("-00")
    await receiver.wait(4)
    await asyncio.sleep(1.5)  # one more export interval: nothing else arrives
    assert {s.trace_id for s in receiver.spans} == {CALLER_TRACE}


async def test_a_collector_that_is_down_costs_calls_nothing_and_drops_are_counted(
    make_proxy: ProxyFactory, keys: Keys, upstream: Upstream, unused_tcp_port: int
) -> None:
    down = Received(endpoint=f"http://127.0.0.1:{unused_tcp_port}")
    proxy = await make_proxy(extra=telemetry(down, max_queue_size=8))
    auth = {"Authorization": f"Bearer {keys.token()}"}
    async with aiohttp.ClientSession() as s:
        loop = asyncio.get_running_loop()
        started = loop.time()
        for i in range(20):
            async with s.get(proxy.base + f"/public/{i}", headers=auth) as r:
                assert r.status == 200
        assert loop.time() - started < 5  # the exporter retries for 10 s; no call waited
        async with s.get(proxy.admin + "/metrics") as r:
            text = await r.text()
    dropped = next(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("agentproxy_telemetry_dropped_total ")
    )
    assert dropped >= 20 * 4 - 8  # all but what fits in the queue


async def test_latency_histograms_carry_the_trace_as_an_exemplar(
    make_proxy: ProxyFactory, keys: Keys, receiver: Received
) -> None:
    proxy = await make_proxy(extra=telemetry(receiver))
    auth = {
        "Authorization": f"Bearer {keys.token()}",
        "traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01",
    }
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.base + "/v1/employees/7", headers=auth) as r:
            assert r.status == 200
        accept = {"Accept": "application/openmetrics-text; version=1.0.0"}
        async with s.get(proxy.admin + "/metrics", headers=accept) as r:
            assert r.content_type == "application/openmetrics-text"
            text = await r.text()
    server = next(s for s in await receiver.wait(4) if s.kind == SERVER)
    lines = [
        line
        for line in text.splitlines()
        if line.startswith("agentproxy_request_seconds_bucket") and " # {" in line
    ]
    assert lines
    assert f'trace_id="{CALLER_TRACE}"' in lines[0]
    assert f'span_id="{server.span_id}"' in lines[0]


def test_a_proxy_that_does_not_trace_never_imports_the_tracing_sdk() -> None:
    # redis-py imports opentelemetry's metrics API when it is installed (its own
    # observability); the trace SDK, the exporters and our span code are ours to keep out.
    code = (
        "import sys\n"
        "import agentproxy.cli, agentproxy.proxy.server, agentproxy.telemetry\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(\n"
        "    ('opentelemetry.sdk.trace', 'opentelemetry.exporter', 'opentelemetry.proto',\n"
        "     'agentproxy.telemetry.spans', 'agentproxy.telemetry.otlp',\n"
        "     'agentproxy.telemetry.export')))\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


async def test_mcp_calls_carry_the_tool_and_continue_the_trace_named_in_meta(
    make_proxy: ProxyFactory, keys: Keys, upstream: Upstream, receiver: Received
) -> None:
    policy = """
default: deny
rules:
  - id: lookups
    agents: [mcp-agent]
    actions: ["mcp:tools/call/lookup"]
    effect: allow
"""
    proxy = await make_proxy(
        policy=policy, extra=telemetry(receiver, ratio=0), upstream_extra="    protocol: mcp"
    )
    body = orjson.dumps(
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {
                "name": "lookup",
                "arguments": {"id": "patient-4711-secret"},
                "_meta": {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"},
            },
        }
    )
    headers = {
        "Authorization": f"Bearer {keys.token('mcp-agent')}",
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
    }
    async with (
        aiohttp.ClientSession() as s,
        s.post(proxy.base + "/mcp", data=body, headers=headers) as r,
    ):
        assert r.status == 200
    spans = await receiver.wait(4)  # ratio 0, but the caller's trace is sampled
    server = next(s for s in spans if s.kind == SERVER)
    assert server.name == "tools/call lookup"
    assert (server.trace_id, server.parent_id) == (CALLER_TRACE, CALLER_SPAN)
    assert server.attributes["mcp.method.name"] == "tools/call"
    assert server.attributes["gen_ai.tool.name"] == "lookup"
    assert server.attributes["gen_ai.operation.name"] == "execute_tool"
    assert server.attributes["gen_ai.security.policy.rule.id"] == "lookups"
    seen = upstream.seen[-1]
    assert seen.headers["traceparent"] == f"00-{CALLER_TRACE}-{server.span_id}-01"
    assert seen.body_bytes == len(body)  # forwarded as authorized, not rewritten
    assert b"patient-4711-secret" not in b"".join(receiver.raw)
