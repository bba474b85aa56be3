"""A finished call as OpenTelemetry spans: one SERVER span, and a child for each stage that
took the proxy's time (token verification, the decision, an approval wait, the upstream call).

The SERVER span's id is the call's `trace.span_id`, the parent named in the `traceparent` the
upstream received, so the upstream's own spans hang under the proxy's in any trace viewer.
Attribute names are the OpenTelemetry semantic conventions' (HTTP, RPC, MCP, GenAI; the
decision as a guardrail verdict, after the GenAI security proposal in
open-telemetry/semantic-conventions-genai#427). Built from the `Call`'s fields only, like the
decision log: never a token, a header value or an argument. Imported only when tracing is on.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from agentproxy.core import Call, Effect

SCOPE = InstrumentationScope("agentproxy", "0.1.0")
SAMPLED = TraceFlags(TraceFlags.SAMPLED)

# The stages that get a span, by class name, and what the span is called.
_CHILDREN = {
    "Identify": "verify_token",
    "Decide": "apply_guardrail agentproxy",
    "Gate": "approval",
    "forward": "forward",
}
_VERDICT = {Effect.ALLOW: "allow", Effect.DENY: "deny", Effect.REQUIRE_APPROVAL: "escalate"}


class _Resource(Resource):
    """A resource whose hash is computed once. The OTLP encoder groups every span by its
    resource, and `Resource.__hash__` serializes the attributes as JSON each time: a quarter
    of the encoding's cost per span."""

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource.attributes, resource.schema_url)
        self._hash = super().__hash__()

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return self is other or super().__eq__(other)


def resource(environ: dict[str, str] | None = None) -> Resource:
    """`service.name` agentproxy unless `OTEL_SERVICE_NAME` or `OTEL_RESOURCE_ATTRIBUTES`
    say otherwise (the SDK reads both)."""
    env = os.environ if environ is None else environ
    if "OTEL_SERVICE_NAME" in env or "service.name=" in env.get("OTEL_RESOURCE_ATTRIBUTES", ""):
        return _Resource(Resource.create())
    return _Resource(Resource.create({"service.name": "agentproxy"}))


def call_spans(
    call: Call, ended: float, where: Resource, captured: Mapping[str, str] | None = None
) -> list[ReadableSpan]:
    """The spans of `call`, sampled, whose stages ran on the monotonic clock (`ended`: when
    its answer was complete)."""
    trace = call.trace
    trace_id = int(trace.trace_id, 16)
    server = SpanContext(trace_id, int(trace.span_id, 16), True, SAMPLED)
    parent = (
        None
        if trace.parent_id is None
        else SpanContext(trace_id, int(trace.parent_id, 16), True, SAMPLED)
    )
    wall = call.now - call.started  # monotonic → wall seconds

    def ns(monotonic: float) -> int:
        return int((monotonic + wall) * 1e9)

    for stage, at, _ in call.spans or ():
        if stage == "answered":
            ended = at

    spans = [
        ReadableSpan(
            _server_name(call),
            server,
            parent,
            where,
            {**_server_attributes(call), **(captured or {})},
            kind=SpanKind.SERVER,
            status=_server_status(call),
            start_time=ns(call.started),
            end_time=ns(ended),
            instrumentation_scope=SCOPE,
        )
    ]
    ids = os.urandom(8 * len(call.spans or ()))
    for i, (stage, started, stopped) in enumerate(call.spans or ()):
        name = _CHILDREN.get(stage)
        if name is None or (stage == "Gate" and not _waited(call)):
            continue
        raised = stopped is None
        span_id = int.from_bytes(ids[8 * i : 8 * i + 8]) or 1
        spans.append(
            ReadableSpan(
                name,
                SpanContext(trace_id, span_id, False, SAMPLED),
                server,
                where,
                _child_attributes(call, stage, raised),
                kind=SpanKind.INTERNAL,
                status=Status(StatusCode.ERROR, _error_type(call)) if raised else Status(),
                start_time=ns(started),
                end_time=ns(ended if stopped is None else stopped),
                instrumentation_scope=SCOPE,
            )
        )
    return spans


def _waited(call: Call) -> bool:
    d = call.decision
    return d is not None and d.effect is Effect.REQUIRE_APPROVAL and call.enforced


def _server_name(call: Call) -> str:
    action = call.action
    if action.protocol == "mcp":
        # MCP conventions: "{mcp.method.name} {target}", the target a tool, prompt or resource.
        if action.operation in ("tools/call", "prompts/get") and action.target:
            return f"{action.operation} {action.target}"
        return action.operation
    if action.protocol == "llm":
        return f"{action.operation} {action.target}" if action.target else action.operation
    if action.protocol == "grpc":
        return action.target.lstrip("/")
    return action.operation  # HTTP: "{method}" (the route template is the upstream's)


def _server_attributes(call: Call) -> dict[str, Any]:
    action = call.action
    attrs: dict[str, Any] = {
        "agentproxy.upstream": call.upstream,
        "agentproxy.action": action.name,
        "agentproxy.decision_id": call.id,
    }
    if action.protocol == "grpc":
        service, _, method = action.target.lstrip("/").partition("/")
        attrs["rpc.system"] = "grpc"
        attrs["rpc.service"] = service
        attrs["rpc.method"] = method
        if call.grpc_status is not None:
            attrs["rpc.grpc.status_code"] = call.grpc_status
    else:
        attrs["network.protocol.name"] = "http"
        if call.status is not None:
            attrs["http.response.status_code"] = call.status
    if action.protocol == "http":
        attrs["http.request.method"] = action.operation
        attrs["url.path"] = action.target
    elif action.protocol == "mcp":
        attrs["mcp.method.name"] = action.operation
        if action.operation == "tools/call":
            attrs["gen_ai.operation.name"] = "execute_tool"
            attrs["gen_ai.tool.name"] = action.target
        elif action.operation == "prompts/get":
            attrs["gen_ai.prompt.name"] = action.target
        if call.batch:
            attrs["agentproxy.mcp.batch_size"] = len(call.batch) + 1
    elif action.protocol == "llm":
        attrs["gen_ai.operation.name"] = action.operation
        if action.target:
            attrs["gen_ai.request.model"] = action.target
        if call.model is not None:
            attrs["gen_ai.response.model"] = call.model
        if call.tokens is not None:
            attrs["gen_ai.usage.input_tokens"] = call.tokens[0] + call.tokens[2]
            attrs["gen_ai.usage.output_tokens"] = call.tokens[1]
            attrs["gen_ai.usage.cache_read.input_tokens"] = call.tokens[2]
    p = call.principal
    if p is not None:
        attrs["gen_ai.agent.id"] = p.agent
        if p.acting_for is not None:
            attrs["enduser.id"] = p.acting_for
        if p.chain:
            attrs["agentproxy.chain"] = list(p.chain)
    if call.task is not None:
        attrs["agentproxy.task"] = call.task
    if call.parent_task is not None:
        attrs["agentproxy.parent_task"] = call.parent_task
    if call.approval is not None:
        attrs["agentproxy.approval_id"] = call.approval
    if call.cost:
        attrs["agentproxy.cost"] = call.cost
        attrs["agentproxy.cost.currency"] = call.currency or ""
    _decision_attributes(call, attrs)
    if call.refusal is not None:
        attrs["error.type"] = call.refusal.problem_type
    elif call.error is not None:
        attrs["error.type"] = "upstream"
    return attrs


def _decision_attributes(call: Call, attrs: dict[str, Any]) -> None:
    d = call.decision
    if d is None:
        return
    attrs["gen_ai.security.verdict.type"] = _VERDICT[d.effect]
    if d.rule_id is not None:
        attrs["gen_ai.security.policy.rule.id"] = d.rule_id
    attrs["gen_ai.security.policy.version"] = d.policy_version
    attrs["gen_ai.security.verdict.reason"] = d.reason
    # What was enforced: shadow mode lets a deny through; an approval wait ends either way.
    if call.refusal is None:
        action = "allow"
    elif d.effect is Effect.REQUIRE_APPROVAL and call.approval is None:
        action = "escalate"
    else:
        action = "block"
    attrs["gen_ai.security.action.type"] = action
    attrs["agentproxy.enforced"] = call.enforced


def _child_attributes(call: Call, stage: str, raised: bool) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    if stage == "Identify" and call.principal is not None:
        attrs["gen_ai.agent.id"] = call.principal.agent
        attrs["agentproxy.issuer"] = call.principal.issuer
    elif stage == "Decide":
        attrs["gen_ai.operation.name"] = "apply_guardrail"
        attrs["gen_ai.security.guardrail.name"] = "agentproxy"
        attrs["gen_ai.security.target.type"] = "tool_call"
        _decision_attributes(call, attrs)
    elif stage == "Gate":
        if call.approval is not None:
            attrs["agentproxy.approval_id"] = call.approval
        elif call.refusal is not None:
            attrs["agentproxy.approval_id"] = str(call.refusal.members.get("approval_id", ""))
    elif stage == "forward":
        attrs["agentproxy.upstream"] = call.upstream
        if call.upstream_seconds is not None:
            attrs["agentproxy.upstream_ms"] = round(call.upstream_seconds * 1000, 3)
    if raised:
        attrs["error.type"] = _error_type(call)
    return attrs


def _error_type(call: Call) -> str:
    if call.refusal is not None:
        return call.refusal.problem_type
    return call.error or "error"


def _server_status(call: Call) -> Status:
    """SERVER spans: an error is the proxy's or the upstream's fault, not a refused caller
    (HTTP conventions: 4xx is not an error on the server side)."""
    refusal = call.refusal
    if refusal is not None and refusal.fault != "client" and refusal.status >= 500:
        return Status(StatusCode.ERROR, refusal.problem_type)
    if call.error is not None or (call.status is not None and call.status >= 500):
        return Status(StatusCode.ERROR, call.error or str(call.status))
    return Status()
