"""`explain`: why a call would be allowed or denied, from the stages that serve calls.

The request line is described by the adapters that describe the wire, then walked through the
explain pipeline (`assemble.build_explain`: identify with revocations, describe, pins, decide)
with a collecting tracer: which rules matched, which conditions were true or false and the
values they read, and the final effect. Nothing is forwarded and nothing is recorded. A call
the proxy would refuse before deciding (a bad or revoked token, a revoked agent) raises that
refusal, as the data plane would answer it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from agentproxy.core import Action, Call
from agentproxy.errors import InternalError, UnsupportedMediaType
from agentproxy.policy import TraceStep
from agentproxy.policy.testing import explain_lines
from agentproxy.protocols.grpc import Method
from agentproxy.protocols.http import parse_declared_task
from agentproxy.protocols.http_body import check_query_overlap
from agentproxy.protocols.request_line import GrpcMethods, describe_line
from agentproxy.proxy.http import AUDIT_ONLY, why_read_body
from agentproxy.proxy.pipeline import Pipeline, start_call
from agentproxy.proxy.runtime import Runtime


class ExplainExchange:
    """The explain pipeline's shell: the call arrives described, and goes nowhere."""

    responded = False

    async def describe(self, call: Call) -> None:
        """Explained calls arrive described."""

    async def forward(self, call: Call) -> None:
        """Nothing is forwarded: the call is only explained."""

    async def refuse(self, call: Call) -> None:
        """The refusal is reported by `explain` itself."""


def upstream_of(runtime: Runtime, action: Action) -> str:
    """The upstream a described call would go to ("-" for MCP: the endpoint the agent calls
    names it, not the line). Raises NoRoute."""
    if action.protocol == "grpc":
        return runtime.route_grpc(action.operation).name
    if action.protocol == "mcp":
        return "-"
    return runtime.route(action.target).name


def described_methods(runtime: Runtime) -> GrpcMethods:
    """What the descriptor set files say of a gRPC method (reflection is not asked)."""

    def lookup(service: str, path: str) -> Method | None:
        return runtime.grpc_methods.get(runtime.route_grpc(service).name, {}).get(path)

    return lookup


async def explain(
    pipeline: Pipeline,
    token: str,
    request: str,
    *,
    task: str | None = None,
    args: Mapping[str, Any] | None = None,
    body: bytes | None = None,
    content_type: str | None = None,
) -> dict[str, Any]:
    """`body`: an HTTP call's body, read as `args` if the data plane would read it (a rule
    that may match reads it, or the upstream always does), by the same parser.

    Raises Refusal: BadRequest (the request line, the body, or a task id the proxy would
    refuse), UnsupportedMediaType, NoRoute, Unauthenticated (the token), Denied (a revoked
    agent), Unavailable (the store holding the task history, or the issuer's keys)."""
    runtime = pipeline.runtime
    methods = described_methods(runtime)
    action = describe_line(request, args, methods)
    upstream = upstream_of(runtime, action)
    action = replace(action, upstream="" if upstream == "-" else upstream)
    body_note = None
    if body is not None and action.protocol == "http":
        route = runtime.route(action.target)
        why = why_read_body(runtime, route, action)
        if why is None:
            body_note = "not read: no rule that may match reads the body (it would stream)"
        else:
            try:
                read = describe_line(
                    request,
                    None,
                    methods,
                    body=body,
                    content_type=content_type,
                    body_mode=route.body,
                    spellings=runtime.policy.arg_spellings,
                )
            except UnsupportedMediaType:
                if why is not AUDIT_ONLY:
                    raise
                read = None  # the data plane streams it unread (HttpExchange.describe)
            if read is None:
                body_note = "not read: only the audit would, and it is no JSON or form"
            else:
                check_query_overlap(read.args, action.query)
                action = replace(action, args=read.args)
                body_note = f"read as args: {why}"
    steps: list[TraceStep] = []
    clock = pipeline.clock
    call = start_call(
        action,
        upstream,
        started=clock.monotonic(),
        now=clock.now(),
        bearer=token,
        declared_task=parse_declared_task(task),
        refusal=None,
        trace_steps=steps,
    )
    await pipeline.run(call, ExplainExchange())
    decision = call.decision
    if decision is None:
        raise call.refusal or InternalError("explain reached no decision")
    principal = call.principal
    if principal is None:
        raise InternalError("explain decided without a principal")
    return {
        "action": action.name,
        "upstream": upstream,
        "principal": {
            "agent": principal.agent,
            "user": principal.acting_for,
            "chain": list(principal.chain),
            "roles": sorted(principal.roles),
            "task": call.task,
        },
        "decision": {
            "effect": decision.effect.value,
            "rule": decision.rule_id,
            "reason": decision.reason,
            "policy_version": decision.policy_version,
            "enforced": call.enforced,
            "shadow": None
            if decision.shadow_effect is None
            else {"effect": decision.shadow_effect.value, "rule": decision.shadow_rule},
        },
        "body": body_note,
        "trace": [
            {"rule": s.rule, "pattern": s.pattern, "outcome": s.outcome, "values": dict(s.values)}
            for s in steps
        ],
        "text": "\n".join(
            text_lines(action.name, decision.effect.value, decision.rule_id, decision.reason, steps)
            + ([f"body:    {body_note}"] if body_note else [])
        ),
    }


def text_lines(
    action: str, effect: str, rule: str | None, reason: str, trace: list[TraceStep]
) -> list[str]:
    return [
        f"action:  {action}",
        *explain_lines(trace, indent="  "),
        f"effect:  {effect} (rule {rule or 'none: default deny'})",
        f"reason:  {reason}",
    ]
