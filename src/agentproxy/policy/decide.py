"""`decide()`: pure, synchronous, no I/O and no clock.

The pipeline fetches the facts and reads the clock once per call; `explain` calls this same
function with a collecting trace, so explanation can never drift from enforcement.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple
from urllib.parse import unquote

from cel_expr_python import cel

from agentproxy.core import Action, Decision, Effect, Facts, Mode, Principal, plain, principal_view
from agentproxy.policy.compiler import CEL_ENV, PolicySet, Rule

_PRIORITY = {Effect.DENY: 0, Effect.REQUIRE_APPROVAL: 1, Effect.ALLOW: 2}


@dataclass(frozen=True, slots=True)
class TraceStep:
    """One rule considered for a call, and what became of it.

    `values` are what the rule's condition read (`resource.id` → "13"), or an error text
    for a path that could not be read; filled only when a trace is collected (explain).
    """

    rule: str
    pattern: str
    outcome: str
    values: Mapping[str, Any] = field(default_factory=dict)


class _Match(NamedTuple):
    # A tuple: built for every matching rule of every decision, and a frozen dataclass costs
    # several times more to build.
    rule: Rule
    pattern: str
    effect: Effect
    reason: str


def decide(
    policy: PolicySet,
    action: Action,
    principal: Principal,
    facts: Facts,
    now: float,
    trace: list[TraceStep] | None = None,
) -> Decision:
    """Deny overrides require_approval overrides allow; no matching rule is the default deny.

    A rule whose condition fails to evaluate counts as a deny by that rule (there is no
    lenient mode: a broken deny condition must never turn into "no match"). Shadow rules are
    evaluated too, and what they would change is reported in `shadow_effect`.
    """
    enforced: list[_Match] = []
    shadow: list[_Match] = []
    inputs: _Inputs | None = None
    seen: set[str] = set()
    memoizable = True
    # The first rule that would apply but for the token's scopes, and the scopes it lacks.
    wanting: tuple[Rule, tuple[str, ...]] | None = None
    for rule, pattern in policy.index.candidates(action.name, action.fold_case):
        if rule.id in seen:
            continue
        bindings = pattern.match(action.name, action.fold_case)
        if bindings is None:
            continue
        if rule.upstreams and action.upstream not in rule.upstreams:
            if trace is not None:
                trace.append(TraceStep(rule.id, pattern.text, "upstream does not match"))
            continue
        if not rule.principals.matches(principal):
            if trace is not None:
                trace.append(TraceStep(rule.id, pattern.text, "agent or user does not match"))
            continue
        if rule.scopes and not rule.scopes <= principal.scopes:
            missing = tuple(sorted(rule.scopes - principal.scopes))
            if wanting is None and rule.mode is Mode.ENFORCE:
                wanting = (rule, missing)
            if trace is not None:
                trace.append(
                    TraceStep(rule.id, pattern.text, f"token lacks scope {' '.join(missing)}")
                )
            continue
        seen.add(rule.id)
        memoizable = memoizable and rule.memoizable
        effect, reason = rule.effect, rule.decided_reason
        if rule.condition is not None:
            if inputs is None:
                inputs = _Inputs(action, principal, facts, now)
            data = inputs.activation(rule, bindings)
            outcome = _evaluate(rule.condition, data)
            read = read_values(rule.when, data) if trace is not None else {}
            if outcome is False:
                if trace is not None:
                    trace.append(
                        TraceStep(rule.id, pattern.text, f"condition false: {rule.when}", read)
                    )
                continue
            if outcome is not True:
                effect = Effect.DENY
                reason = f"condition of rule {rule.id} could not be evaluated: {outcome}"
        else:
            read = {}
        if trace is not None:
            outcome_text = f"matched: {effect.value}"
            if rule.condition is not None and effect is not rule.effect:
                outcome_text = f"condition error, counted as deny: {reason}"
            trace.append(TraceStep(rule.id, pattern.text, outcome_text, read))
        (shadow if rule.mode is Mode.SHADOW else enforced).append(
            _Match(rule, pattern.text, effect, reason)
        )

    winner = strongest(enforced)
    if winner is None and wanting is not None:
        rule, missing = wanting
        needed = " ".join(sorted(rule.scopes))
        decision = Decision(
            effect=Effect.DENY,
            rule_id=None,
            reason=(
                f"rule {rule.id} allows {action.name} only with scope {needed};"
                f" the token lacks {' '.join(missing)}"
            ),
            policy_version=policy.version,
            memoizable=memoizable,
            missing_scopes=tuple(sorted(rule.scopes)),
        )
    elif winner is None:
        decision = Decision(
            effect=Effect.DENY,
            rule_id=None,
            reason=f"no rule allows {action.name} for agent {principal.agent}",
            policy_version=policy.version,
            memoizable=memoizable,
        )
    elif winner.reason is winner.rule.decided_reason:  # decided as written: shared
        key = (id(winner.rule), winner.pattern, memoizable)
        shared = policy.decisions.get(key)
        if shared is None:
            shared = policy.decisions[key] = _decision(policy, winner, memoizable)
        decision = shared
    else:
        decision = _decision(policy, winner, memoizable)
    if shadow:
        would = strongest(enforced + shadow)
        would_effect = would.effect if would else Effect.DENY
        would_rule = would.rule.id if would else None
        if (would_effect, would_rule) != (decision.effect, decision.rule_id):
            return Decision(
                decision.effect,
                decision.rule_id,
                decision.reason,
                decision.policy_version,
                decision.matched_action,
                shadow_effect=would_effect,
                shadow_rule=would_rule,
                memoizable=memoizable,
            )
    return decision


def _decision(policy: PolicySet, winner: _Match, memoizable: bool) -> Decision:
    return Decision(
        winner.effect,
        winner.rule.id,
        winner.reason,
        policy.version,
        winner.pattern,
        memoizable=memoizable,
    )


def could_allow(policy: PolicySet, action: str, principal: Principal, upstream: str = "") -> bool:
    """Whether any call of `action` on `upstream` by this principal could ever be allowed: an
    enforced allow rule matches it (its condition aside), and no unconditional deny does.

    Used to hide what an agent can never use (MCP `tools/list`); the call itself is still
    decided in full when it comes.
    """
    allowed = False
    for rule, pattern in policy.index.candidates(action):
        if rule.mode is Mode.SHADOW or pattern.match(action) is None:
            continue
        if rule.upstreams and upstream not in rule.upstreams:
            continue
        if not rule.principals.matches(principal):
            continue
        if rule.effect is Effect.DENY and rule.condition is None:
            return False
        if rule.effect is not Effect.DENY:
            allowed = True
    return allowed


def strongest(matches: list[_Match]) -> _Match | None:
    """Deny > require_approval > allow; among equals, the rule written first wins."""
    best: _Match | None = None
    for match in matches:
        if best is None or _PRIORITY[match.effect] < _PRIORITY[best.effect]:
            best = match
    return best


def cel_inputs(action: Action, principal: Principal, facts: Facts, now: float) -> dict[str, Any]:
    """The CEL variables for one call, as plain dicts and lists (what cel-cpp accepts)."""
    return {name: build(action, principal, facts, now) for name, build in _BUILDERS.items()}


def _principal(action: Action, principal: Principal, facts: Facts, now: float) -> Any:
    return principal_view(principal)


def _action(action: Action, principal: Principal, facts: Facts, now: float) -> Any:
    return {
        "name": action.name,
        "protocol": action.protocol,
        "operation": action.operation,
        "target": action.target,
        "upstream": action.upstream,
    }


def _args(action: Action, principal: Principal, facts: Facts, now: float) -> Any:
    return plain(action.args) if action.args is not None else {}


def _task(action: Action, principal: Principal, facts: Facts, now: float) -> Any:
    return {
        "id": facts.task_id,
        "parent": facts.task_parent,
        "labels": sorted(facts.task_labels),
        "calls": facts.task_calls,
        "spent": facts.task_spent,
    }


def _request(action: Action, principal: Principal, facts: Facts, now: float) -> Any:
    return {"method": action.operation, "path": action.target, "query": _query(action)}


def _query(action: Action) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in action.query.items()}


def _llm(action: Action, principal: Principal, facts: Facts, now: float) -> Any:
    return dict(action.llm) if action.llm is not None else {}


def _now(action: Action, principal: Principal, facts: Facts, now: float) -> Any:
    return datetime.fromtimestamp(now, UTC)


_BUILDERS: dict[str, Callable[[Action, Principal, Facts, float], Any]] = {
    "principal": _principal,
    "action": _action,
    "args": _args,
    "task": _task,
    "request": _request,
    "now": _now,
    "llm": _llm,
}


class _Inputs:
    """The CEL variables of one call, each built the first time a rule reads it.

    cel-cpp converts every entry of the activation it is given, read or not, so a rule is
    handed only the variables its condition mentions (`Rule.variables`, a superset found in
    its source): a condition on `principal.claims` does not pay for `args` or `now`.
    """

    __slots__ = ("_action", "_built", "_facts", "_now", "_principal", "_query")

    def __init__(self, action: Action, principal: Principal, facts: Facts, now: float) -> None:
        self._action = action
        self._principal = principal
        self._facts = facts
        self._now = now
        self._built: dict[str, Any] = {}
        self._query: dict[str, Any] | None = None

    def get(self, name: str) -> Any:
        built = self._built
        if name not in built:
            built[name] = _BUILDERS[name](self._action, self._principal, self._facts, self._now)
        return built[name]

    def activation(self, rule: Rule, bindings: Mapping[str, str]) -> dict[str, Any]:
        """The variables one rule's condition reads (of `principal` and its claims, the
        members it reads), `resource` bound from its own template.

        Raises UnicodeDecodeError for a binding whose escapes are not UTF-8 (as `_activation`).
        """
        data: dict[str, Any] = {}
        for name in rule.variables:
            if name == "principal":
                data[name] = _principal_read(self.get(name), rule)
                continue
            if name != "resource":
                data[name] = self.get(name)
                continue
            # `resource.query` alone: building all of `request` for it cost a dict per rule.
            if self._query is None:
                self._query = _query(self._action)
            data["resource"] = _resource(bindings, self._query)
        return data


def rule_activation(
    rule: Rule, action: Action, principal: Principal, facts: Facts, now: float
) -> dict[str, Any]:
    """The CEL variables a rule's other expressions (cost, limit keys) see for this call:
    the same as its condition saw, `resource` bound from its own matching action pattern."""
    inputs = cel_inputs(action, principal, facts, now)
    for pattern in rule.patterns:
        bindings = pattern.match(action.name, action.fold_case)
        if bindings is not None:
            return _activation(inputs, bindings)
    return _activation(inputs, {})


def _activation(inputs: dict[str, Any], bindings: Mapping[str, str]) -> dict[str, Any]:
    """The CEL variables for one rule: the call's, plus `resource` from its own template."""
    data = dict(inputs)
    data["resource"] = _resource(bindings, inputs["request"]["query"])
    return data


def _resource(bindings: Mapping[str, str], query: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {
        name: unquote(value, errors="strict") for name, value in bindings.items()
    }
    resource["query"] = query
    return resource


def _principal_read(view: dict[str, Any], rule: Rule) -> dict[str, Any]:
    """The members of a principal's view (shared: never changed) that `rule` reads."""
    members, claims = rule.principal_fields, rule.claims_fields
    if members is None:
        # `principal` used whole or indexed: its claims may be read in ways the claims'
        # analysis does not see (`principal["claims"]`), so nothing is left out.
        return view
    read = {k: view[k] for k in members if k in view}
    if claims is not None and isinstance(read.get("claims"), dict):
        every = read["claims"]
        read["claims"] = {k: every[k] for k in claims if k in every}
    return read


def _evaluate(condition: cel.Expression, data: dict[str, Any]) -> bool | str:
    """True or False, or the evaluation error's message."""
    try:
        result = condition.eval(data=data)
    except Exception as exc:  # cel-cpp raises on values it cannot convert
        return f"{type(exc).__name__}: {exc}"
    value = result.value()
    if isinstance(value, bool):
        return value
    if result.type() == cel.Type.ERROR:
        return str(value)
    return f"condition returned {result.type().name()}, not a boolean"


_STRINGS = re.compile(r"'(?:[^'\\]|\\.)*'" + r'|"(?:[^"\\]|\\.)*"')
_PATH = re.compile(r"(?<![.\w])((?:principal|resource|request|action|task|args|now|llm)(?:\.\w+)*)")


def read_values(source: str | None, data: dict[str, Any]) -> dict[str, Any]:
    """The value of every variable path a condition mentions, for explanations.

    Each path is evaluated on its own in the same activation, so the explanation shows what
    the condition saw, not a re-implementation of it. Only runs when a trace is collected.
    """
    if not source:
        return {}
    text = _STRINGS.sub("''", source)
    paths = []
    for match in _PATH.finditer(text):
        path = match.group(1)
        if text[match.end() : match.end() + 1] == "(" and "." in path:
            path = path.rsplit(".", 1)[0]  # `principal.roles.exists(...)`: the list it reads
        paths.append(path)
    out: dict[str, Any] = {}
    for path in dict.fromkeys(paths):
        try:
            result = _path_expression(path).eval(data=data)
            value = result.value()
            if result.type() == cel.Type.ERROR:
                out[path] = f"error: {value}"
            else:
                out[path] = _printable(result.plain_value())
        except Exception as exc:  # a path the condition guards with has() may not exist
            out[path] = f"error: {exc}"
    return out


@functools.lru_cache(maxsize=1024)
def _path_expression(path: str) -> cel.Expression:
    return CEL_ENV.compile(path)


def _printable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): _printable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_printable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def decide_next_message(
    policy: PolicySet,
    action: Action,
    principal: Principal,
    facts: Facts,
    now: float,
    first_rule: str | None,
) -> tuple[str, str | None] | None:
    """A later message of a client-streaming or bidi call, decided on its own arguments with
    the facts of the call's first: None to forward it, else (why not, the rule).

    The call's limits, cost, budget and approval were taken once, for its first message under
    `first_rule`. A later message passes only when a rule allows it outright and that rule is
    `first_rule`, or one that takes nothing per call (no limits, no cost); a message that
    would need an approval is refused (the approval, if any, was for the first message).
    """
    decision = decide(policy, action, principal, facts, now)
    if decision.effect is Effect.DENY:
        return decision.reason, decision.rule_id
    if decision.effect is Effect.REQUIRE_APPROVAL:
        return (
            "a message later in the stream needs an approval; a streaming call's approval "
            "covers its first message only: send it in a call of its own",
            decision.rule_id,
        )
    if decision.rule_id is not None and decision.rule_id != first_rule:
        rule = policy.rule(decision.rule_id)
        if rule.limits or rule.cost is not None:
            return (
                f"a message later in the stream falls under rule {rule.id}, whose limits or "
                f"cost were not taken for this call (they are taken for the first message "
                f"under rule {first_rule}): send it in a call of its own",
                rule.id,
            )
    return None
