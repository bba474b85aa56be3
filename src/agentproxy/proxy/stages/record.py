"""record: metrics, the decision log line and the audit trail's last word on the call."""

from __future__ import annotations

import logging

from agentproxy.audit.decision_log import DecisionLog
from agentproxy.audit.records import decision_record, outcome_record
from agentproxy.audit.trail import AuditTrail
from agentproxy.clock import Clock
from agentproxy.core import Call, Effect
from agentproxy.errors import LimitRefused, Unauthenticated, Unavailable
from agentproxy.metering.metrics import Metrics
from agentproxy.policy import PolicySet
from agentproxy.proxy.stages.audit import rule_cost

log = logging.getLogger("agentproxy.record")


class Record:
    """Runs once per call, on every path, and never raises: a record failure is logged.

    A call whose decision was already audited gets its `outcome` record; any other (refused
    before the audit stage, or with no audit stage) gets its `decision` record now."""

    __slots__ = ("_clock", "_decision_log", "_metrics", "_policy", "_trail")

    def __init__(
        self,
        metrics: Metrics,
        decision_log: DecisionLog,
        trail: AuditTrail | None,
        policy: PolicySet,
        clock: Clock,
    ) -> None:
        self._metrics = metrics
        self._decision_log = decision_log
        self._trail = trail
        self._policy = policy
        self._clock = clock

    async def __call__(self, call: Call) -> None:
        try:
            total = self._clock.monotonic() - call.started
            m = self._metrics
            decision = call.decision
            action = (decision.matched_action if decision else None) or "other"
            m.requests.labels(call.upstream, action, outcome_label(call)).inc()
            if decision is not None:
                if not call.enforced and decision.effect is not Effect.ALLOW:
                    m.shadow_decisions.labels(
                        action, decision.rule_id or "", decision.effect.value
                    ).inc()
                if decision.shadow_effect is not None:
                    m.shadow_decisions.labels(
                        action, decision.shadow_rule or "", decision.shadow_effect.value
                    ).inc()
            # A traced call's latencies carry its trace (OpenMetrics exemplars): a slow bucket
            # leads to a trace that exists. An untraced call's would lead nowhere.
            exemplar = (
                {"trace_id": call.trace.trace_id, "span_id": call.trace.span_id}
                if call.spans is not None and call.trace.sampled
                else None
            )
            if call.decision_seconds is not None:
                m.decision_seconds.observe(call.decision_seconds, exemplar)
            m.request_seconds.labels(call.upstream).observe(total, exemplar)
            if call.upstream_seconds is not None:
                m.upstream_seconds.labels(call.upstream).observe(call.upstream_seconds, exemplar)
            m.overhead_seconds.observe(max(0.0, total - (call.upstream_seconds or 0.0)), exemplar)
            self._decision_log.write(call, total)
            trail = self._trail
            if trail is not None:
                if call.audited:
                    trail.post(outcome_record(call, self._clock.now(), total))
                else:
                    trail.post(decision_record(call, self._clock, rule_cost(self._policy, call)))
        except Exception:
            log.exception("failed to record call %s", call.id)


def outcome_label(call: Call) -> str:
    """The `decision` label: the policy's effect, or why no decision was made."""
    refusal = call.refusal
    if isinstance(refusal, LimitRefused):
        return "limited"
    if isinstance(refusal, Unavailable):
        return "error"
    if call.decision is not None:
        return call.decision.effect.value
    if isinstance(refusal, Unauthenticated):
        return "unauthenticated"
    if refusal is None or refusal.fault == "client":
        return "invalid"
    return "error"
