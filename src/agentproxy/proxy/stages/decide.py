"""decide: the policy's answer for the call, and for every other message of a batch."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from agentproxy.clock import Clock
from agentproxy.core import (
    Action,
    Call,
    Decision,
    Effect,
    Facts,
    Mode,
    Principal,
    task_history_key,
)
from agentproxy.errors import Denied, InsufficientScope, MissingCredential
from agentproxy.metering.metrics import Metrics
from agentproxy.policy import PolicySet, could_allow, decide
from agentproxy.policy.memo import DecisionMemo, memo_key
from agentproxy.protocols.mcp import completion_reference
from agentproxy.proxy.pipeline import Exchange
from agentproxy.proxy.stages.store_down import OnError, degraded
from agentproxy.store import Store, StoreError

log = logging.getLogger("agentproxy.decide")


class Decide:
    """Decides the call's action and every other action of a batch (an MCP JSON-RPC batch):
    a batch is forwarded only if every message in it is allowed. An MCP completion is allowed
    only for a prompt or template the principal could ever get (`_referenced`).

    Decisions whose rules read nothing per call are memoized by credential and action; the
    facts (task history) are read from the store only on a miss and only when a rule reads
    `task`. A call carrying a collecting tracer (explain) is always decided afresh, so that
    the trace shows every condition.
    """

    __slots__ = ("_clock", "_memo", "_metrics", "_mode", "_on_error", "_policy", "_store")

    def __init__(
        self,
        policy: PolicySet,
        memo: DecisionMemo,
        store: Store,
        metrics: Metrics,
        clock: Clock,
        *,
        mode: Mode,
        on_error: OnError,
    ) -> None:
        self._policy = policy
        self._memo = memo
        self._store = store
        self._metrics = metrics
        self._clock = clock
        self._mode = mode
        self._on_error = on_error

    async def __call__(self, call: Call, exchange: Exchange) -> None:
        """Raises MissingCredential (no principal: a stage order bug), Unavailable (the store
        is down and the decision would need it)."""
        principal = call.principal
        if principal is None or call.bearer is None:
            raise MissingCredential()
        started = self._clock.monotonic()
        facts: Facts | None = None
        decisions: list[Decision] = []
        hits = 0
        cache = self._metrics.decision_cache
        trace = call.trace_steps
        for action in (call.action, *call.batch):
            key = memo_key(call.bearer, action)
            decision = self._memo.get(key) if trace is None else None
            if decision is not None:
                hits += 1
                cache.labels("hit").inc()
            else:
                if trace is None:
                    cache.labels("miss").inc()
                if facts is None:
                    facts = await self._facts(call)
                decision = decide(self._policy, action, principal, facts, call.now, trace)
                if decision.memoizable and trace is None:
                    self._memo.put(key, decision)
            if decision.effect is Effect.ALLOW:
                decision = self._referenced(action, principal, call.upstream) or decision
            decisions.append(decision)
        if call.streaming and facts is None:
            facts = await self._facts(call)  # what every later message is decided on
        call.facts = facts
        call.memo_hit = hits == len(decisions)
        call.decisions = tuple(decisions)
        refused = refused_index(decisions)
        call.refused_at = refused
        call.decision = decisions[refused if refused is not None else 0]
        call.enforced = self._mode is Mode.ENFORCE
        call.decision_seconds = (call.decision_seconds or 0.0) + self._clock.monotonic() - started
        if call.store_error is not None:
            degraded(call, self._on_error)
        decision = call.decision
        if decision.effect is Effect.DENY and call.enforced:
            if decision.missing_scopes:
                call.refusal = InsufficientScope(
                    decision.reason, rule=decision.rule_id, scopes=decision.missing_scopes
                )
            else:
                call.refusal = Denied(decision.reason, rule=decision.rule_id)

    def _referenced(self, action: Action, principal: Principal, upstream: str) -> Decision | None:
        """A default deny for an allowed MCP `completion/complete` whose prompt or resource
        template (`mcp:prompts/get/<name>`, `mcp:resources/read/<uri template>`) could never
        be allowed to this principal on this upstream, else None. A completion answers with
        what the prompt's or template's arguments may be (names, ids, file names): the same
        check that hides that prompt or template from its listing keeps it from completing."""
        referenced = completion_reference(action)
        if referenced is None or could_allow(self._policy, referenced, principal, upstream):
            return None
        reason = f"completion/complete refers to {referenced}, which no rule allows"
        return Decision(Effect.DENY, None, reason, self._policy.version, referenced)

    async def _facts(self, call: Call) -> Facts:
        task, principal, parent = call.task, call.principal, call.parent_task
        if not self._policy.reads_task or task is None or principal is None:
            return Facts(task_id=task, task_parent=parent)
        try:
            history = await self._store.task_history(
                task_history_key(principal.agent, task), call.now
            )
        except StoreError as exc:
            self._metrics.store_errors.labels("task_history").inc()
            log.warning("call %s: task history unavailable: %s", call.id, exc)
            call.store_error = str(exc)
            return Facts(task_id=task, task_parent=parent)
        return Facts(task, history.labels, history.calls, history.spent, parent)


def refused_index(decisions: Sequence[Decision]) -> int | None:
    """Which message of a batch the call is refused for, None when all are allowed: the
    strongest refusal, the first of equals. Deny overrides require_approval, and a deny
    overrides one that a step-up could lift (a scope the token lacks): a client must never
    be challenged to ask a person for more scope for a batch that would still be denied."""
    strengths = [_refusal_strength(d) for d in decisions]
    strongest = max(strengths)
    return strengths.index(strongest) if strongest else None


def _refusal_strength(decision: Decision) -> int:
    if decision.effect is Effect.DENY:
        return 2 if decision.missing_scopes else 3
    return 1 if decision.effect is Effect.REQUIRE_APPROVAL else 0
