"""limits: the allowing rule's rate limits and budgets, reserved before anything is sent."""

from __future__ import annotations

import logging

from agentproxy.core import Action, Call, Facts, Principal, Reservation
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
        limited = [
            (action, rule)
            for action, decision in call.allowed()
            if (rule := self._policy.rule(decision.rule_id or "")).limits
        ]
        if not limited:
            return
        if call.store_error is not None:
            raise _store_down()
        principal = call.principal
        if principal is None:
            raise MissingCredential()
        # Every message of a batch takes its own rule's limits, all in one atomic step: 40
        # calls of a tool limited to 2 an hour in one batch are 40 calls, not one.
        wanted: list[Reservation] = []
        spend = 0.0
        for action, rule in limited:
            try:
                cost = self._expected_cost(call, action, rule, principal)
                wanted += reservations(
                    rule, action, principal, Facts(task_id=call.task), call.now, cost
                )
            except LimitKeyError as exc:
                raise Denied(str(exc), rule=rule.id) from None
            spend += cost
        call.cost = spend
        merged = merge(wanted)
        try:
            exceeded = await self._store.reserve(merged, call.now)
        except StoreError as exc:
            self._metrics.store_errors.labels("reserve").inc()
            log.warning("call %s: limits not reserved: %s", call.id, exc)
            call.store_error = str(exc)
            raise _store_down() from None
        if exceeded is None:
            call.reservations = tuple(merged)
            await self._tell_remaining(call, limited, merged)
            return
        rule_id = next(
            (r.id for _, r in limited if any(lim.name == exceeded.name for lim in r.limits)),
            limited[0][1].id,
        )
        refusal = LimitRefused(
            f"limit {exceeded.name} of rule {rule_id} is used up for this window "
            f"({exceeded.used:g} of {exceeded.limit:g})",
            limit=exceeded.name,
            retry_after=exceeded.retry_after,
            rule=rule_id,
        )
        if call.enforced:
            call.refusal = refusal
        else:
            call.error = f"shadow: {refusal.detail}"

    async def _tell_remaining(
        self, call: Call, limited: list[tuple[Action, Rule]], taken: list[Reservation]
    ) -> None:
        """What each spend limit the call took from has left (its counter now, this call's
        reservation included), for the answer's X-Agentproxy-Budget-Remaining. One read per
        budgeted call; a failed read only leaves the header out."""
        currencies = {
            limit.name: limit.currency or ""
            for _, rule in limited
            for limit in rule.limits
            if limit.spend
        }
        budgets = [r for r in taken if r.name in currencies]
        if not budgets:
            return
        try:
            used = await self._store.usage(budgets, call.now)
        except StoreError as exc:
            log.info("call %s: budget left not read: %s", call.id, exc)
            return
        call.budgets = tuple(
            (r.name, max(0.0, r.limit - u), currencies[r.name])
            for r, u in zip(budgets, used, strict=True)
        )

    def _expected_cost(self, call: Call, action: Action, rule: Rule, principal: Principal) -> float:
        """Rule cost plus, for an LLM call, its tokens' price estimated from the request
        (input from the body size, output from max_tokens or the model's output cap): what
        spend limits reserve."""
        cost = rule_cost(rule, action, principal, Facts(task_id=call.task), call.now)
        if call.model is not None and call.estimate is not None:
            prices = self._prices
            tokens, asked = call.estimate
            output = prices.output_reserve(call.model, asked)
            estimate = prices.cost(call.model, TokenUsage(tokens, output))
            cost += estimate or 0.0
        return cost


def merge(wanted: list[Reservation]) -> list[Reservation]:
    """One reservation per counter (key and window), its amounts summed and its ceiling the
    lowest asked: a store checks each reservation against the counter as it stood, so two
    takes from one counter in one step must be one take of both amounts."""
    merged: dict[tuple[str, float], Reservation] = {}
    for r in wanted:
        found = merged.get((r.key, r.window))
        if found is None:
            merged[(r.key, r.window)] = r
        else:
            merged[(r.key, r.window)] = Reservation(
                found.name,
                r.key,
                found.amount + r.amount,
                min(found.limit, r.limit),
                r.window,
                r.start,
            )
    return list(merged.values())


def _store_down() -> Unavailable:
    return Unavailable(
        "the decision store is unavailable, so this call's limits cannot be checked; "
        "try again shortly",
        component="store",
    )
