"""Compile policy specs into an immutable, indexed `PolicySet`, CEL compiled once.

Cerbos compiles YAML into a rule table and checks requests against it with no I/O; so do we
(`internal/compile` → `internal/ruletable`). Every problem is reported at once, at its line.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

from cel_expr_python import cel

from agentproxy.config.model import PolicyFile, Position, RuleSpec
from agentproxy.config.yamldoc import ConfigError, Issue
from agentproxy.core import Effect, Mode, Principal
from agentproxy.policy.patterns import ActionPattern, PatternError, PatternIndex, compile_pattern

_MAP = cel.Type.Map(cel.Type.STRING, cel.Type.DYN)
CEL_VARIABLES = {
    "principal": _MAP,
    "action": _MAP,
    "resource": _MAP,
    "args": cel.Type.DYN,
    "task": _MAP,
    "request": _MAP,
    "now": cel.Type.TIMESTAMP,
}
CEL_ENV = cel.NewEnv(variables=CEL_VARIABLES)


@dataclass(frozen=True, slots=True)
class PrincipalMatcher:
    """Who a rule is for: agent ids, `role:NAME`, globs; and optionally the users served."""

    any_agent: bool
    agents: frozenset[str]
    roles: frozenset[str]
    agent_globs: re.Pattern[str] | None
    any_user: bool
    users: frozenset[str]
    user_globs: re.Pattern[str] | None

    def matches(self, principal: Principal) -> bool:
        if not (
            self.any_agent
            or principal.agent in self.agents
            or (self.roles and not self.roles.isdisjoint(principal.roles))
            or (self.agent_globs is not None and self.agent_globs.fullmatch(principal.agent))
        ):
            return False
        if self.any_user:
            return True
        user = principal.acting_for
        return user is not None and (
            user in self.users
            or (self.user_globs is not None and bool(self.user_globs.fullmatch(user)))
        )


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    effect: Effect
    mode: Mode
    reason: str
    patterns: tuple[ActionPattern, ...]
    principals: PrincipalMatcher
    when: str | None
    condition: cel.Expression | None
    position: Position


@dataclass(frozen=True, slots=True)
class PolicySet:
    """The compiled policy. `version` changes whenever any policy file's bytes change."""

    version: str
    rules: tuple[Rule, ...]
    index: PatternIndex[tuple[Rule, ActionPattern]]
    has_shadow_rules: bool


def compile_policy(files: Iterable[PolicyFile]) -> PolicySet:
    """Raises ConfigError listing every rule that does not compile."""
    files = tuple(files)
    issues: list[Issue] = []
    rules: list[Rule] = []
    for policy in files:
        for spec in policy.rules:
            rule = _compile_rule(spec, issues)
            if rule is not None:
                rules.append(rule)
    if issues:
        raise ConfigError(issues)
    index: PatternIndex[tuple[Rule, ActionPattern]] = PatternIndex()
    for rule in rules:
        for pattern in rule.patterns:
            index.add(pattern, (rule, pattern))
    digest = hashlib.sha256()
    for policy in files:
        digest.update(policy.path.encode() + b"\0" + policy.source_digest.encode() + b"\0")
    return PolicySet(
        version=digest.hexdigest()[:12],
        rules=tuple(rules),
        index=index,
        has_shadow_rules=any(r.mode is Mode.SHADOW for r in rules),
    )


def policy_issues(files: tuple[PolicyFile, ...]) -> list[Issue]:
    """The compile problems of these policy files, for `config.load(check_policies=...)`."""
    try:
        compile_policy(files)
    except ConfigError as exc:
        return list(exc.issues)
    return []


def _compile_rule(spec: RuleSpec, issues: list[Issue]) -> Rule | None:
    pos = spec.position
    ok = True
    patterns = []
    for text in spec.actions:
        try:
            patterns.append(compile_pattern(text))
        except PatternError as exc:
            issues.append(
                Issue(pos.file, pos.line, pos.column, f"rule {spec.id}", f"action {text!r}: {exc}")
            )
            ok = False
    condition = None
    if spec.when is not None:
        where = spec.when_position or pos
        try:
            condition = CEL_ENV.compile(spec.when)
        except RuntimeError as exc:
            issues.append(
                Issue(
                    where.file,
                    where.line,
                    where.column,
                    f"rule {spec.id}.when",
                    f"CEL does not compile: {_cel_message(exc)}",
                )
            )
            ok = False
        else:
            returns = condition.return_type()
            if returns != cel.Type.BOOL and returns != cel.Type.DYN:
                issues.append(
                    Issue(
                        where.file,
                        where.line,
                        where.column,
                        f"rule {spec.id}.when",
                        f"must be a boolean expression, not {returns.name()}",
                    )
                )
                ok = False
    if not ok:
        return None
    return Rule(
        id=spec.id,
        effect=spec.effect,
        mode=spec.mode,
        reason=spec.reason,
        patterns=tuple(patterns),
        principals=_principal_matcher(spec.agents, spec.users),
        when=spec.when,
        condition=condition,
        position=pos,
    )


def _principal_matcher(agents: tuple[str, ...], users: tuple[str, ...]) -> PrincipalMatcher:
    ids = {a for a in agents if not a.startswith("role:") and not _is_glob(a)}
    roles = {a[5:] for a in agents if a.startswith("role:")}
    globs = [a for a in agents if not a.startswith("role:") and _is_glob(a)]
    user_globs = [u for u in users if _is_glob(u)]
    return PrincipalMatcher(
        any_agent="*" in agents,
        agents=frozenset(ids),
        roles=frozenset(roles),
        agent_globs=_glob_regex(globs),
        any_user=not users or "*" in users,
        users=frozenset(u for u in users if not _is_glob(u)),
        user_globs=_glob_regex(user_globs),
    )


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _glob_regex(globs: list[str]) -> re.Pattern[str] | None:
    if not globs:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in globs))


def _cel_message(exc: Exception) -> str:
    # cel-cpp prefixes its status code and repeats the source; keep the first useful line.
    text = str(exc).replace("INVALID_ARGUMENT: ", "").replace("ERROR: ", "")
    first = text.splitlines()[0] if text else "unknown error"
    return first.replace("<input>:", "column ").strip()
