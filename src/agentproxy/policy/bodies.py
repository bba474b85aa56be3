"""What policy needs of an HTTP call's body and answer, before and after it is decided.

`body_reader`: whether a plain HTTP body must be read as `args` for this action (a rule that
may match reads `args`, or requires approval, which binds the body). `answer_shape`: the
obligations on the answer of a call that was let through, from every enforced rule that
allows it (not only the one that decided: an earlier, broader allow must not pass on the
salary a later rule removes). Pure.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agentproxy.core import Action, Effect, Facts, Mode, Principal
from agentproxy.policy.compiler import KeepItems, PolicySet, Rule
from agentproxy.policy.decide import _evaluate, rule_activation
from agentproxy.policy.patterns import ActionPattern
from agentproxy.policy.shaping import FieldPath, Shaped, keep_items, redact

__all__ = ["AnswerShape", "answer_shape", "body_reader", "reads_body"]


def reads_body(rule: Rule) -> bool:
    """Whether a rule reads a call's arguments: in its condition, a limit key or its cost,
    or by requiring approval (an approval binds exactly the arguments it was asked for)."""
    return rule.effect is Effect.REQUIRE_APPROVAL or rule.reads_args


def body_reader(policy: PolicySet, action: Action) -> str | None:
    """The id of a rule whose pattern and upstreams match `action` and that reads its body,
    whoever calls (a superset: the principal is not looked at, so a body that a rule for
    another agent reads is read too), or None. Shadow rules count: what they would decide is
    reported."""
    key = (action.name, action.upstream, action.fold_case)
    if key in policy.body_needs:
        return policy.body_needs[key]
    reader = None
    for name, rule, pattern in _candidates(policy, action):
        if rule.upstreams and action.upstream not in rule.upstreams:
            continue
        if reads_body(rule) and pattern.match(name, action.fold_case) is not None:
            reader = rule.id
            break
    if len(policy.body_needs) < 4096:
        policy.body_needs[key] = reader
    return reader


@dataclass(frozen=True, slots=True)
class AnswerShape:
    """The obligations on one call's answer, ready to apply to its parsed JSON."""

    rules: tuple[str, ...]
    fields: tuple[FieldPath, ...]
    keeps: tuple[tuple[FieldPath, Callable[[Any], bool]], ...]

    def apply(self, document: Any) -> Shaped:
        """Shapes `document` in place: items first (so fields are counted on what is kept).
        Raises ShapeError where the answer has another shape than a path says."""
        items = sum(keep_items(document, path, keep) for path, keep in self.keeps)
        fields = sum(redact(document, path) for path in self.fields)
        return Shaped(fields, items)


def answer_shape(
    policy: PolicySet, action: Action, principal: Principal, facts: Facts, now: float
) -> AnswerShape | None:
    """The obligations of every enforced allow or approval rule matching this call whose
    condition holds (or fails to evaluate: then it shapes too, closed), None if none has any."""
    if not policy.shapes:
        return None
    rules: list[str] = []
    fields: list[FieldPath] = []
    keeps: list[tuple[FieldPath, Callable[[Any], bool]]] = []
    seen: set[str] = set()
    for name, rule, pattern in _candidates(policy, action):
        if rule.id in seen or not (rule.redact_fields or rule.keep_items):
            continue
        if rule.mode is Mode.SHADOW or rule.effect is Effect.DENY:
            continue
        if rule.upstreams and action.upstream not in rule.upstreams:
            continue
        if pattern.match(name, action.fold_case) is None:
            continue
        if not rule.principals.matches(principal):
            continue
        data = rule_activation(rule, action, principal, facts, now)
        if rule.condition is not None and _evaluate(rule.condition, data) is False:
            continue
        seen.add(rule.id)
        rules.append(rule.id)
        fields.extend(rule.redact_fields)
        keeps.extend((keep.path, _keeper(keep, data)) for keep in rule.keep_items)
    if not rules:
        return None
    return AnswerShape(tuple(rules), tuple(fields), tuple(keeps))


def _candidates(policy: PolicySet, action: Action) -> list[tuple[str, Rule, ActionPattern]]:
    """The rules that may match `action`, with the name each is matched on: for an HTTP path
    ending in "/", also the path without it. Express (strict routing off, its default),
    Spring 5 and others serve /v1/employees/ as /v1/employees, so the obligations and the
    body reading of a rule for /v1/employees apply to both (only ever more shaping, or a body
    read that would otherwise stream)."""
    names = [action.name]
    if action.protocol == "http" and len(action.target) > 1 and action.target.endswith("/"):
        names.append(action.name[:-1])
    return [
        (name, rule, pattern)
        for name in names
        for rule, pattern in policy.index.candidates(name, action.fold_case)
    ]


def _keeper(keep: KeepItems, data: dict[str, Any]) -> Callable[[Any], bool]:
    condition = keep.condition
    base = {name: value for name, value in data.items() if name in keep.variables}
    view = base.get("principal")
    if isinstance(view, dict) and keep.principal_fields is not None:
        # Only the members it reads: the view is converted again for every item.
        read = {k: view[k] for k in keep.principal_fields if k in view}
        claims = read.get("claims")
        if keep.claims_fields is not None and isinstance(claims, dict):
            read["claims"] = {k: claims[k] for k in keep.claims_fields if k in claims}
        base["principal"] = read

    def admits(item: Any) -> bool:
        # An item the condition cannot be evaluated on is dropped: kept only when admitted.
        base["item"] = item
        return _evaluate(condition, base) is True

    return admits
