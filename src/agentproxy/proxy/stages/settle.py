"""settle: after the answer, the call's real cost, its spend settled, its task's history;
for a call the upstream never served, its reservations given back."""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import replace

from agentproxy.core import Action, Call, Decision, Facts, task_history_key
from agentproxy.errors import UpstreamTimeout
from agentproxy.metering.meter import Meter
from agentproxy.metering.metrics import Metrics
from agentproxy.metering.prices import TokenUsage
from agentproxy.policy import PolicySet
from agentproxy.policy.compiler import Rule
from agentproxy.policy.limits import LimitKeyError, rule_cost
from agentproxy.store import Store, StoreError

log = logging.getLogger("agentproxy.settle")


class Settle:
    """Runs once per call, on every path, and never raises (the answer is already sent)."""

    __slots__ = ("_meter", "_metrics", "_policy", "_store", "_task_ttl")

    def __init__(
        self, policy: PolicySet, meter: Meter, store: Store, metrics: Metrics, *, task_ttl: float
    ) -> None:
        self._policy = policy
        self._meter = meter
        self._store = store
        self._metrics = metrics
        self._task_ttl = task_ttl

    async def __call__(self, call: Call) -> None:
        try:
            if answered(call):
                await self._meter_call(call)
                await self._record_task(call)
            elif call.reservations and not _may_have_acted(call):
                await self._release(call)
        except Exception:
            log.exception("failed to settle call %s", call.id)

    async def _meter_call(self, call: Call) -> None:
        """The call's real cost into the metrics, every message of a batch at its own rule's
        price, and spend limits settled with it (the estimate reserved up front is topped up
        or given back)."""
        principal = call.principal
        decided = _decided(call)
        if principal is None or not decided:
            return
        meter = self._meter
        answered = (
            call.forwarded
            and call.refusal is None
            and call.status is not None
            and call.status < 400
        )
        total = 0.0
        rules = []
        for index, (action, decision) in enumerate(decided):
            rule = self._policy.rule(decision.rule_id or "")
            rules.append(rule)
            cost = 0.0
            if rule.cost is not None:  # most rules have none: no Facts to build, no CEL to run
                with contextlib.suppress(LimitKeyError):  # a cost key the call lacks: no cost
                    cost = rule_cost(rule, action, principal, Facts(task_id=call.task), call.now)
            usage = None
            if index == 0 and call.tokens is not None:  # an LLM call is never a batch
                usage = TokenUsage(*call.tokens)
                cost += meter.token_cost(call.model, usage) or 0.0
            meter.record(
                principal=principal,
                upstream=call.upstream,
                action=decision.matched_action or "other",
                model=call.model,
                cost=cost,
                currency=rule.cost.currency if rule.cost else meter.settings.currency,
                usage=usage,
                answered=answered,
            )
            total += cost
        reserved = call.cost or 0.0
        first = rules[0]
        call.cost = total
        call.currency = first.cost.currency if first.cost else meter.settings.currency
        spend = [r for r in call.reservations if any(_is_spend(rule, r.name) for rule in rules)]
        difference = total - reserved
        if not spend or abs(difference) < 1e-12:
            return
        try:
            if difference > 0:
                extra = [replace(r, amount=difference, limit=math.inf) for r in spend]
                await self._store.reserve(extra, call.now)
            else:
                back = [replace(r, amount=-difference) for r in spend]
                await self._store.release(back, call.now)
        except StoreError as exc:
            self._metrics.store_errors.labels("settle").inc()
            log.error("call %s: spend not settled: %s", call.id, exc)

    async def _record_task(self, call: Call) -> None:
        """One call of the task per message, with every message's rule's labels."""
        principal = call.principal
        if call.task is None or principal is None:
            return
        if call.status is None or call.status >= 400:
            return
        rules = [self._policy.rule(d.rule_id or "") for _, d in _decided(call)]
        if not any(rule.label_task or rule.cost for rule in rules) and not (
            rules and self._policy.reads_task
        ):
            return
        labels = {label for rule in rules for label in rule.label_task}
        try:
            await self._store.record_task(
                task_history_key(principal.agent, call.task),
                sorted(labels),
                call.cost or 0.0,
                self._task_ttl,
                call.now,
                calls=len(rules),
            )
        except StoreError as exc:
            self._metrics.store_errors.labels("record_task").inc()
            log.error("call %s: task history not recorded: %s", call.id, exc)

    async def _release(self, call: Call) -> None:
        """Gives back the reservations of a call that never reached the upstream."""
        try:
            await self._store.release(call.reservations, call.now)
        except StoreError as exc:
            self._metrics.store_errors.labels("release").inc()
            log.error("call %s: reservations not released: %s", call.id, exc)
        call.reservations = ()


def answered(call: Call) -> bool:
    """The call was forwarded and the upstream answered it."""
    return call.forwarded and call.refusal is None and call.status is not None


def _may_have_acted(call: Call) -> bool:
    """A forwarded call that timed out keeps what it reserved: the upstream may have acted
    before its answer was lost. One refused before or while it was sent (a stage refused it,
    the upstream was unreachable, the body went over the limit) gives it back."""
    return call.forwarded and isinstance(call.refusal, UpstreamTimeout)


def _decided(call: Call) -> list[tuple[Action, Decision]]:
    """Each forwarded message with the rule that let it through (an allow, or an approval a
    grant released)."""
    decisions = call.decisions or ((call.decision,) if call.decision is not None else ())
    return [
        (action, decision)
        for action, decision in zip((call.action, *call.batch), decisions, strict=False)
        if decision.rule_id is not None
    ]


def _is_spend(rule: Rule, name: str) -> bool:
    return any(limit.name == name and limit.spend is not None for limit in rule.limits)
