"""What the audit trail says about a call: built from the `Call`'s fields only.

A `decision` record for every call (allow, deny, refusal, error), written before anything is
forwarded; an `outcome` record for calls that were forwarded (status, latency, bytes). No
header, no body, no token: the arguments policy saw are recorded in a safe view, and the
configured `audit.redact` paths are replaced by keyed HMACs by the trail.

Each record is new and holds JSON types only, so the pipeline hands it to `AuditTrail.post`
as it is; nested values may be shared with others (the principal's view) but are only read.
"""

from __future__ import annotations

from typing import Any

from agentproxy.clock import Clock, rfc3339
from agentproxy.core import Call, jsonable, plain, principal_view


def decision_record(call: Call, clock: Clock, cost: dict[str, Any] | None = None) -> dict[str, Any]:
    """The decision's record, written now (`clock`); a refused call's carries its latency."""
    p = call.principal
    d = call.decision
    record: dict[str, Any] = {
        "kind": "decision",
        "time": rfc3339(clock.now(), 6),
        "decision_id": call.id,
        "trace_id": call.trace.trace_id,
        "span_id": call.trace.span_id,
        "principal": None if p is None else {**principal_view(p), "token_id": p.token_id},
        "task": call.task,
        "parent_task": call.parent_task,
        "parent_source": call.parent_source,
        "session": call.session,
        "action": call.action.name,
        # Every further message of a batch, with its arguments: what was decided for each.
        "batch": [{"action": a.name, "args": jsonable(a.args)} for a in call.batch] or None,
        "upstream": call.upstream,
        "resource": {"path": call.action.target, "query": plain(call.action.query)},
        "args": jsonable(call.action.args),
        "effect": d.effect.value if d else None,
        "rule": d.rule_id if d else None,
        "reason": d.reason if d else None,
        "policy_version": d.policy_version if d else None,
        "enforced": call.enforced,
        "shadow": None
        if d is None or d.shadow_effect is None
        else {"effect": d.shadow_effect.value, "rule": d.shadow_rule},
        "cost": cost,
    }
    if call.refusal is not None:
        record["refusal"] = {
            "status": call.refusal.status,
            "type": call.refusal.problem_type,
            "detail": call.refusal.detail,
            **dict(call.refusal.members),
        }
        record["status"] = call.status
        record["latency_ms"] = round((clock.monotonic() - call.started) * 1000, 3)
    return record


def redaction_paths(paths: tuple[str, ...]) -> tuple[str, ...]:
    """The configured `audit.redact` paths, and for each `args.…` one the same path in every
    message of a batch (`batch.args.…`) and in approval records (`approval.arguments.…`,
    `approval.summary.…`), and for each `resource.query.…` one `approval.query.…`: no
    argument escapes redaction by being sent second or by needing an approval."""
    extra = [
        prefix + path[len("args.") :]
        for path in paths
        if path.startswith("args.")
        for prefix in ("batch.args.", "approval.arguments.", "approval.summary.")
    ]
    extra += [
        "approval.query." + path[len("resource.query.") :]
        for path in paths
        if path.startswith("resource.query.")
    ]
    return paths + tuple(p for p in dict.fromkeys(extra) if p not in paths)


def outcome_record(call: Call, now: float, latency: float) -> dict[str, Any]:
    return {
        "kind": "outcome",
        "time": rfc3339(now, 6),
        "decision_id": call.id,
        "status": call.status,
        "latency_ms": round(latency * 1000, 3),
        "upstream_ms": None
        if call.upstream_seconds is None
        else round(call.upstream_seconds * 1000, 3),
        "bytes_in": call.bytes_in,
        "bytes_out": call.bytes_out,
        "error": call.error,
        "cost": None if not call.cost else {"amount": call.cost, "currency": call.currency},
        "model": call.model,
        "tokens": None
        if call.tokens is None
        else {"input": call.tokens[0], "output": call.tokens[1], "cached_input": call.tokens[2]},
        "approval_id": call.approval,
        "refusal": None
        if call.refusal is None
        else {
            "status": call.refusal.status,
            "type": call.refusal.problem_type,
            "detail": call.refusal.detail,
        },
    }
