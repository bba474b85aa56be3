"""OpenID AuthZEN access evaluation (`POST /access/v1/evaluation`, `/evaluations`): the
decision for a gateway or SDK that asks over plain HTTP, from the same pipeline as the data
plane (it is `Authorizer.Check` in AuthZEN's shape).

agentproxy decides on verified identities only, so the subject carries the agent's bearer
token (`subject.properties.token`); the subject's `id` is read from the token, never taken
from the request. The call is the resource and the action:

    {"type": "http", "id": "/v1/employees/42"}       action {"name": "GET"}; body as args
    {"type": "mcp", "id": "search"}                   action {"name": "tools/call"}; arguments
    {"type": "grpc", "id": "/hr.v1.Employees/Get"}    action {"name": "call"}; arguments

Pure: JSON in, a described action (or why not) out, and a finished call back to JSON.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agentproxy.core import Action, Call, Effect
from agentproxy.errors import BadRequest, Refusal
from agentproxy.protocols import grpc as grpc_adapter
from agentproxy.protocols import mcp as mcp_adapter
from agentproxy.protocols.http import describe as describe_http
from agentproxy.protocols.strict_json import JsonError, check_value

__all__ = ["MEMBERS", "Evaluation", "answer", "evaluation", "evaluations"]

MEMBERS = frozenset({"subject", "action", "resource", "context"})


class Evaluation:
    """One evaluation request: the token, what it asks for (or why it cannot be read), and
    the declared task (`context.task`)."""

    __slots__ = ("describe", "task", "token", "traceparent")

    def __init__(
        self,
        token: str | None,
        describe: Action | Refusal,
        task: str | None,
        traceparent: str | None,
    ) -> None:
        self.token = token
        self.describe = describe
        self.task = task
        self.traceparent = traceparent


def evaluation(data: Mapping[str, Any]) -> Evaluation:
    """The evaluation an AuthZEN request asks for. A request that cannot be read becomes a
    refusal to answer (decision false), never an exception."""
    token: str | None = None
    task = traceparent = None
    try:
        unknown = set(data) - MEMBERS
        if unknown:
            raise BadRequest(f"unknown member(s): {', '.join(sorted(unknown))}")
        subject = _object(data, "subject")
        properties = _object(subject, "properties", required=False)
        raw_token = properties.get("token")
        if raw_token is not None and not isinstance(raw_token, str):
            raise BadRequest('"subject.properties.token" must be the agent\'s bearer token')
        token = raw_token
        context = _object(data, "context", required=False)
        task = _string(context, "task")
        traceparent = _string(context, "traceparent")
        action = _object(data, "action")
        resource = _object(data, "resource")
        return Evaluation(token, _describe(action, resource), task, traceparent)
    except Refusal as refusal:
        return Evaluation(token, refusal, task, traceparent)


def evaluations(data: Mapping[str, Any]) -> list[Evaluation]:
    """`/access/v1/evaluations`: each item of `evaluations`, its missing subject, action,
    resource or context taken from the top level (AuthZEN's defaults)."""
    items = data.get("evaluations")
    if not isinstance(items, list) or not items or len(items) > 100:
        raise BadRequest('"evaluations" must be a list of 1 to 100 evaluations')
    defaults = {key: data[key] for key in MEMBERS if key in data}
    out = []
    for item in items:
        if not isinstance(item, dict):
            out.append(Evaluation(None, BadRequest("each evaluation is an object"), None, None))
            continue
        out.append(evaluation({**defaults, **item}))
    return out


def answer(call: Call) -> dict[str, Any]:
    """AuthZEN's answer for a finished call: `decision`, and in `context` why."""
    decision = call.decision
    allowed = call.refusal is None and call.forwarded
    context: dict[str, Any] = {"decision_id": call.id}
    if decision is not None:
        context.update(
            effect=decision.effect.value if allowed else _refused_effect(call),
            rule=decision.rule_id,
            policy_version=decision.policy_version,
        )
    refusal = call.refusal
    if refusal is not None:
        context["reason_admin"] = {"type": refusal.problem_type, "detail": refusal.detail}
        context["status"] = refusal.status
        context.update({k: v for k, v in refusal.members.items() if k not in context})
    return {"decision": allowed, "context": context}


def _refused_effect(call: Call) -> str:
    decision = call.decision
    if decision is not None and decision.effect is Effect.REQUIRE_APPROVAL:
        return Effect.REQUIRE_APPROVAL.value
    return Effect.DENY.value


def _describe(action: Mapping[str, Any], resource: Mapping[str, Any]) -> Action:
    kind = resource.get("type")
    name = _string(action, "name")
    target = _string(resource, "id")
    if not name or not target:
        raise BadRequest('"action.name" and "resource.id" name the call')
    properties = _object(resource, "properties", required=False)
    if kind == "http":
        described, _ = describe_http(name, target)
        body = properties.get("body")
        if body is None:
            return described
        try:
            check_value(body)
        except JsonError as exc:
            raise BadRequest(f'"resource.properties.body": {exc}') from None
        return Action(
            described.protocol,
            described.operation,
            described.target,
            query=described.query,
            args=body,
            name=described.name,
        )
    arguments = properties.get("arguments")
    if arguments is not None and not isinstance(arguments, dict):
        raise BadRequest('"resource.properties.arguments" must be an object')
    if kind == "mcp":
        return mcp_adapter.describe_call(name, target, arguments)
    if kind == "grpc":
        base = grpc_adapter.describe(target)
        return Action(
            base.protocol, base.operation, base.target, args=arguments or {}, name=base.name
        )
    raise BadRequest('"resource.type" is one of http, mcp, grpc')


def _object(data: Mapping[str, Any], key: str, *, required: bool = True) -> Mapping[str, Any]:
    value = data.get(key)
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f'"{key}" must be an object')
    return value


def _string(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise BadRequest(f'"{key}" must be a string')
    return value
