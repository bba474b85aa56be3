"""`explain`: why a call would be allowed or denied, from the code that serves calls.

It verifies the token, describes the request with the HTTP adapter and runs the same
`decide()` with a collecting trace: which rules matched, which conditions were true or false
and the values they read, and the final effect.
"""

from __future__ import annotations

from typing import Any

from agentproxy.core import Facts
from agentproxy.errors import BadRequest
from agentproxy.policy import TraceStep, decide
from agentproxy.policy.testing import explain_lines
from agentproxy.protocols.http import describe
from agentproxy.proxy.runtime import Runtime
from agentproxy.store import Store


async def explain(
    runtime: Runtime,
    token: str,
    request: str,
    now: float,
    *,
    task: str | None = None,
    store: Store | None = None,
) -> dict[str, Any]:
    """Raises Unauthenticated for a token that does not verify, BadRequest for a request
    line that the proxy would refuse, StoreError when the task history cannot be read."""
    method, _, target = request.strip().partition(" ")
    if not method or not target:
        raise BadRequest('write the request as "METHOD /path?query"')
    action, _ = describe(method, target)
    principal = await runtime.verifier.verify(token, now)
    task = principal.task or task
    facts = Facts(task_id=task)
    if store is not None and task is not None and runtime.policy.reads_task:
        history = await store.task_history(task, now)
        facts = Facts(task, history.labels, history.calls, history.spent)
    trace: list[TraceStep] = []
    decision = decide(runtime.policy, action, principal, facts, now, trace)
    upstream = runtime.route(action.target).name
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
