"""`explain`: why a call would be allowed or denied, from the code that serves calls.

It verifies the token, describes the request with the HTTP adapter and runs the same
`decide()` with a collecting trace: which rules matched, which conditions were true or false
and the values they read, and the final effect.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agentproxy.core import Action, Facts
from agentproxy.errors import BadRequest
from agentproxy.policy import TraceStep, decide
from agentproxy.policy.testing import explain_lines
from agentproxy.protocols import grpc, mcp
from agentproxy.protocols.http import describe
from agentproxy.proxy.runtime import Runtime
from agentproxy.store import Store

USAGE = (
    'write the request as "METHOD /path?query", "grpc /package.Service/Method" or '
    '"mcp tools/call <tool>" (with args for gRPC and MCP)'
)


def describe_request(
    runtime: Runtime, request: str, args: Mapping[str, Any] | None
) -> tuple[Action, str]:
    """The action a request line names and the upstream it goes to, as the data plane would
    describe it. Raises BadRequest, or NoRoute when no upstream serves it."""
    first, _, rest = request.strip().partition(" ")
    rest = rest.strip()
    if not first or not rest:
        raise BadRequest(USAGE)
    if first == "grpc":
        base = grpc.describe(rest)
        upstream = runtime.route_grpc(base.operation)
        described = runtime.grpc_methods.get(upstream.name, {}).get(base.target)
        values = dict(args or {})
        if described is not None:
            values = grpc.args_from_json(described, values)
        action = Action("grpc", base.operation, base.target, args=values, name=base.name)
        return action, upstream.name
    if first == "mcp":
        mcp_method, _, name = rest.partition(" ")
        return mcp.describe_call(mcp_method, name.strip(), dict(args or {})), "-"
    action, _ = describe(first, rest)
    return action, runtime.route(action.target).name


async def explain(
    runtime: Runtime,
    token: str,
    request: str,
    now: float,
    *,
    task: str | None = None,
    store: Store | None = None,
    args: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Raises Unauthenticated for a token that does not verify, BadRequest for a request
    line that the proxy would refuse, StoreError when the task history cannot be read."""
    action, upstream = describe_request(runtime, request, args)
    principal = await runtime.verifier.verify(token, now)
    task = principal.task or task
    facts = Facts(task_id=task)
    if store is not None and task is not None and runtime.policy.reads_task:
        history = await store.task_history(task, now)
        facts = Facts(task, history.labels, history.calls, history.spent)
    trace: list[TraceStep] = []
    decision = decide(runtime.policy, action, principal, facts, now, trace)
    return {
        "action": action.name,
        "upstream": upstream,
        "principal": {
            "agent": principal.agent,
            "user": principal.acting_for,
            "chain": list(principal.chain),
            "roles": sorted(principal.roles),
            "task": task,
        },
        "decision": {
            "effect": decision.effect.value,
            "rule": decision.rule_id,
            "reason": decision.reason,
            "policy_version": decision.policy_version,
            "enforced": runtime.config.mode.value == "enforce",
            "shadow": None
            if decision.shadow_effect is None
            else {
                "effect": decision.shadow_effect.value,
                "rule": decision.shadow_rule,
            },
        },
        "trace": [
            {"rule": s.rule, "pattern": s.pattern, "outcome": s.outcome, "values": dict(s.values)}
            for s in trace
        ],
        "text": "\n".join(
            text_lines(action.name, decision.effect.value, decision.rule_id, decision.reason, trace)
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
