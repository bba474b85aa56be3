"""audit: the decision's record, in the tamper-evident trail before anything is forwarded."""

from __future__ import annotations

import asyncio
from typing import Any

from agentproxy.audit.records import decision_record
from agentproxy.audit.sinks import AuditError
from agentproxy.audit.trail import AuditTrail
from agentproxy.clock import Clock
from agentproxy.core import Call
from agentproxy.errors import Unavailable
from agentproxy.policy import PolicySet
from agentproxy.proxy.pipeline import Exchange

# How long a call waits for its decision record when `audit.required` (then 503).
AUDIT_WAIT = 2.0


class AuditDecision:
    """With `audit.required` the record is awaited, and a record that cannot be written
    refuses the call (503), as secret managers treat their audit devices; otherwise a loss is
    counted and logged (and the trail records a gap)."""

    __slots__ = ("_clock", "_policy", "_required", "_trail")

    def __init__(self, trail: AuditTrail, policy: PolicySet, clock: Clock, *, required: bool):
        self._trail = trail
        self._policy = policy
        self._clock = clock
        self._required = required

    async def __call__(self, call: Call, exchange: Exchange) -> None:
        """Raises Unavailable when a required record cannot be written."""
        call.audited = True
        record = decision_record(call, self._clock, rule_cost(self._policy, call))
        if not self._required:
            self._trail.post(record)
            return
        written = self._trail.submit(record)
        try:
            await asyncio.wait_for(asyncio.shield(written), AUDIT_WAIT)
        except (AuditError, TimeoutError) as exc:
            raise Unavailable(
                "the audit trail cannot record this call, so it is not forwarded",
                component="audit",
            ) from exc


def rule_cost(policy: PolicySet, call: Call) -> dict[str, Any] | None:
    """The deciding rule's fixed cost, as the decision record states it."""
    decision = call.decision
    if decision is None or decision.rule_id is None:
        return None
    rule = policy.rule(decision.rule_id)
    if rule.cost is None:
        return None
    return {"amount": rule.cost.amount, "currency": rule.cost.currency}
