"""Which counters a call takes from: the allowing rule's limits, keyed per call.

Pure: the pipeline passes the result to the store, which takes them atomically.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from cel_expr_python import cel

from agentproxy.core import Action, Facts, Principal, Reservation
from agentproxy.policy.compiler import Limit, Rule
from agentproxy.policy.decide import rule_activation


class LimitKeyError(ValueError):
    """A limit's CEL key could not be evaluated for this call (the call is refused)."""


def reservations(
    rule: Rule, action: Action, principal: Principal, facts: Facts, now: float, spend: float
) -> list[Reservation]:
    """`spend` is what the call is expected to cost (spend limits take it up front and are
    settled with the real cost afterwards). Raises LimitKeyError when a CEL key fails to
    evaluate or is not a string or number."""
    out = []
    inputs = None
    for limit in rule.limits:
        if limit.key_expr is not None and inputs is None:
            inputs = rule_activation(rule, action, principal, facts, now)
        key = limit_key(limit, principal, facts, inputs)
        amount = 1.0 if limit.calls is not None else spend
        ceiling = float(limit.calls) if limit.calls is not None else float(limit.spend or 0.0)
        start, length = None, limit.window
        if limit.calendar is not None:
            start, length = calendar_window(limit.calendar, now)
        out.append(Reservation(limit.name, f"{limit.name}:{key}", amount, ceiling, length, start))
    return out


def calendar_window(kind: str, now: float) -> tuple[float, float]:
    """(start, length) of the UTC calendar day, ISO week (from Monday) or month containing
    `now`: budgets that reset when finance's do, not 24 h after the first call."""
    moment = datetime.fromtimestamp(now, UTC)
    midnight = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    if kind == "day":
        start, end = midnight, midnight + timedelta(days=1)
    elif kind == "week":
        start = midnight - timedelta(days=midnight.weekday())
        end = start + timedelta(days=7)
    elif kind == "month":
        start = midnight.replace(day=1)
        end = (start + timedelta(days=32)).replace(day=1)
    else:
        raise ValueError(f"unknown calendar window {kind!r}")
    return start.timestamp(), (end - start).total_seconds()


def limit_key(
    limit: Limit, principal: Principal, facts: Facts, inputs: dict[str, object] | None
) -> str:
    """`agent`, `user` or `task`, or the CEL key's value, as a counter key.

    A per-task counter is also per agent: the task id is the agent's own to choose, so a
    task limit can never let one agent spend another's budget or escape its own.
    """
    if limit.key == "agent":
        return "agent=" + principal.agent
    if limit.key == "user":
        return "user=" + (principal.acting_for or "-")
    if limit.key == "task":
        return f"agent={principal.agent}/task={facts.task_id or '-'}"
    if limit.key_expr is None or inputs is None:
        raise LimitKeyError(f"limit {limit.name}: no key")
    try:
        result = limit.key_expr.eval(data=inputs)
    except Exception as exc:  # cel-cpp raises on values it cannot convert
        raise LimitKeyError(f"limit {limit.name}: key could not be evaluated: {exc}") from None
    value = result.value()
    if result.type() == cel.Type.ERROR:
        raise LimitKeyError(f"limit {limit.name}: key could not be evaluated: {value}")
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise LimitKeyError(f"limit {limit.name}: key {limit.key!r} gave {value!r}, not a string")
    return "expr=" + str(value)


def rule_cost(rule: Rule, action: Action, principal: Principal, facts: Facts, now: float) -> float:
    """The rule's own price for this call: its fixed amount, or its CEL expression's value.

    Raises LimitKeyError when the expression fails or is not a non-negative number.
    """
    if rule.cost is None:
        return 0.0
    if rule.cost_expr is None:
        return rule.cost.amount
    try:
        result = rule.cost_expr.eval(data=rule_activation(rule, action, principal, facts, now))
    except Exception as exc:  # cel-cpp raises on values it cannot convert
        raise LimitKeyError(f"cost of rule {rule.id} could not be evaluated: {exc}") from None
    value = result.value()
    if (
        result.type() == cel.Type.ERROR
        or isinstance(value, bool)
        or not isinstance(value, int | float)
    ):
        raise LimitKeyError(f"cost of rule {rule.id} is not a number: {value!r}")
    if value < 0:
        raise LimitKeyError(f"cost of rule {rule.id} is negative: {value!r}")
    return float(value)
