"""limits: the allowing rule's rate limits and budgets, reserved before anything is sent."""

from __future__ import annotations

import logging

from agentproxy.core import Call, Effect, Facts, Principal
from agentproxy.errors import Denied, LimitRefused, MissingCredential, Unavailable
from agentproxy.metering.metrics import Metrics
from agentproxy.metering.prices import PriceTable, TokenUsage
from agentproxy.policy import PolicySet
from agentproxy.policy.compiler import Rule
from agentproxy.policy.limits import LimitKeyError, reservations, rule_cost
from agentproxy.proxy.pipeline import Exchange
from agentproxy.store import Store, StoreError

log = logging.getLogger("agentproxy.limits")


class Limits:
    """Reserves every limit of the allowing rule atomically, or refuses with 429.

    A spend limit reserves the call's expected cost (the rule's cost, plus for an LLM call
    its tokens at the price table); `settle` tops it up or gives it back once the real cost
    is known. With the store down no limit can be checked, so a limited call is refused
    (503) even under `on_error: allow_cached`: a memoized allow says nothing about how much
    of a limit is left.
    """

    __slots__ = ("_metrics", "_policy", "_prices", "_store")

    def __init__(
        self, policy: PolicySet, store: Store, metrics: Metrics, prices: PriceTable
    ) -> None:
        self._policy = policy
        self._store = store
        self._metrics = metrics
        self._prices = prices

    async def __call__(self, call: Call, exchange: Exchange) -> None:
        """Raises Denied (a limit key the call lacks), Unavailable (the store is down)."""
        decision = call.decision
        if decision is None or decision.effect is not Effect.ALLOW or decision.rule_id is None:
            return
        rule = self._policy.rule(decision.rule_id)
        if not rule.limits:
            return
        if call.store_error is not None:
            raise _store_down()
        principal = call.principal
        if principal is None:
            raise MissingCredential()
        try:
            spend = self._expected_cost(call, rule, principal)
            wanted = reservations(
                rule, call.action, principal, Facts(task_id=call.task), call.now, spend
            )
        except LimitKeyError as exc:
            raise Denied(str(exc), rule=rule.id) from None
        call.cost = spend
        try:
            exceeded = await self._store.reserve(wanted, call.now)
        except StoreError as exc:
            self._metrics.store_errors.labels("reserve").inc()
            log.warning("call %s: limits not reserved: %s", call.id, exc)
            call.store_error = str(exc)
            raise _store_down() from None
        if exceeded is None:
            call.reservations = tuple(wanted)
            return
        refusal = LimitRefused(
            f"limit {exceeded.name} of rule {rule.id} is used up for this window "
            f"({exceeded.used:g} of {exceeded.limit:g})",
            limit=exceeded.name,
            retry_after=exceeded.retry_after,
            rule=rule.id,
        )
        if call.enforced:
            call.refusal = refusal
        else:
            call.error = f"shadow: {refusal.detail}"

    def _expected_cost(self, call: Call, rule: Rule, principal: Principal) -> float:
        """Rule cost plus, for an LLM call, its tokens' price estimated from the request
        (input from the body size, output from max_tokens): what spend limits reserve."""
        cost = rule_cost(rule, call.action, principal, Facts(task_id=call.task), call.now)
        if call.model is not None and call.estimate is not None:
            estimate = self._prices.cost(call.model, TokenUsage(*call.estimate))
            cost += estimate or 0.0
        return cost


def _store_down() -> Unavailable:
    return Unavailable(
        "the decision store is unavailable, so this call's limits cannot be checked; "
        "try again shortly",
        component="store",
    )
