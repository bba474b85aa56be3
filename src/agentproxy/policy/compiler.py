"""Compile policy specs into an immutable, indexed `PolicySet`, CEL compiled once.

Cerbos compiles YAML into a rule table and checks requests against it with no I/O; so do we
(`internal/compile` → `internal/ruletable`). Every problem is reported at once, at its line.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from cel_expr_python import cel
from cel_expr_python.ext import ext_math, ext_strings

from agentproxy.config.model import (
    ApprovalSpec,
    CostSpec,
    PolicyFile,
    Position,
    PrincipalRef,
    RuleSpec,
)
from agentproxy.config.yamldoc import ConfigError, Issue
from agentproxy.core import Decision, Effect, Mode, Principal
from agentproxy.policy.patterns import ActionPattern, PatternError, PatternIndex, compile_pattern
from agentproxy.policy.shaping import FieldPath, parse_path

_MAP = cel.Type.Map(cel.Type.STRING, cel.Type.DYN)
CEL_VARIABLES = {
    "principal": _MAP,
    "action": _MAP,
    "resource": _MAP,
    "args": cel.Type.DYN,
    "task": _MAP,
    "request": _MAP,
    "now": cel.Type.TIMESTAMP,
    "llm": _MAP,
}
# The standard string and math extensions (split, lowerAscii, math.greatest, …): policies
# read paths, ids and amounts.
CEL_ENV = cel.NewEnv(
    variables=CEL_VARIABLES, extensions=[ext_strings.ExtStrings(), ext_math.ExtMath()]
)
# `keep_items` conditions: the call's variables and `item`, the list entry being considered.
ITEM_ENV = cel.NewEnv(
    variables={**CEL_VARIABLES, "item": cel.Type.DYN},
    extensions=[ext_strings.ExtStrings(), ext_math.ExtMath()],
)


@dataclass(frozen=True, slots=True)
class KeepItems:
    """A compiled `keep_items` obligation: the lists at `path` keep the items `condition`
    (over `item` and the call) is true for."""

    path: FieldPath
    when: str
    condition: cel.Expression
    # What the condition may read besides `item` (cel-cpp converts every variable it is
    # handed, for every item: handing it all of them cost 3x the rest of the shaping).
    variables: frozenset[str] = frozenset(CEL_VARIABLES)
    principal_fields: frozenset[str] | None = None
    claims_fields: frozenset[str] | None = None


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
    # Entries bound to an issuer (`pay-bot@https://idp.example`): matched one by one.
    bound: tuple[PrincipalRef, ...] = ()

    def matches(self, principal: Principal) -> bool:
        if not (
            self.any_agent
            or principal.agent in self.agents
            or (self.roles and not self.roles.isdisjoint(principal.roles))
            or (
                self.agent_globs is not None
                and not principal.agent.startswith("role:")  # a role entry is never an id
                and self.agent_globs.fullmatch(principal.agent)
            )
            or any(ref.matches(principal) for ref in self.bound)
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
class Limit:
    """A compiled limit: `key` is agent, user, task, or a CEL expression (`key_expr`)."""

    name: str
    window: float
    key: str
    key_expr: cel.Expression | None
    calls: int | None
    spend: float | None
    currency: str | None = None
    calendar: str | None = None  # "day", "week", "month" (UTC), or None: `window` seconds


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
    limits: tuple[Limit, ...] = ()
    cost: CostSpec | None = None
    label_task: tuple[str, ...] = ()
    # False when the condition reads per-call facts (args, now, task, request): its
    # decision for a principal and action cannot be reused for the next call.
    memoizable: bool = True
    reads_task: bool = False
    # The condition, a limit key or the cost reads `args` (the body, for HTTP).
    reads_args: bool = False
    # The member names of `args` it names (`args.a.b`, `args["a"]`, `"a" in args`): a body
    # spelling one in another case is refused (`PolicySet.arg_spellings`).
    arg_names: frozenset[str] = frozenset()
    builtin: bool = False
    approval: ApprovalSpec | None = None
    cost_expr: cel.Expression | None = None
    # The upstreams (by name) the rule applies to; empty: all of them.
    upstreams: frozenset[str] = frozenset()
    # The token scopes it needs (all of them): without them it does not apply.
    scopes: frozenset[str] = frozenset()
    # Obligations on the JSON answer (policy/shaping.py).
    redact_fields: tuple[FieldPath, ...] = ()
    keep_items: tuple[KeepItems, ...] = ()
    # The CEL variables the condition may read (a superset): all that it is handed.
    variables: frozenset[str] = frozenset(CEL_VARIABLES)
    # The members of `principal` and of `principal.claims` it may read (supersets), None for
    # all of them: cel-cpp converts every member it is handed, and a token's claims are most
    # of an activation.
    principal_fields: frozenset[str] | None = None
    claims_fields: frozenset[str] | None = None
    # The reason a decision by this rule gives: its own, or which rule and effect. Set once
    # here, not formatted (or looked up) for every decision.
    decided_reason: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        decided = self.reason or f"{self.effect.value} by rule {self.id}"
        object.__setattr__(self, "decided_reason", decided)


@dataclass(frozen=True, slots=True)
class PolicySet:
    """The compiled policy. `version` changes whenever any policy file's bytes change."""

    version: str
    rules: tuple[Rule, ...]
    index: PatternIndex[tuple[Rule, ActionPattern]]
    reads_task: bool = False
    # Whether any rule shapes answers (its obligations): if none, no answer is looked at.
    shapes: bool = False
    # The pipeline looks the deciding rule up several times per allowed call (limits, cost,
    # metering): a scan would make every call pay for the size of the policy.
    _by_id: Mapping[str, Rule] = field(init=False, repr=False, compare=False)
    # What `decide` answers when a rule decides as written (no condition error, no shadow
    # difference), by rule, matched pattern and memoizability: a Decision is immutable, so
    # one is shared instead of built for every call. Bounded: two per pattern.
    decisions: dict[tuple[int, str, bool], Decision] = field(init=False, repr=False, compare=False)
    # The rule that reads an action's body, if any (policy/bodies.body_reader), by action
    # name, upstream and case folding. Bounded there.
    body_needs: dict[tuple[str, str, bool], str | None] = field(
        init=False, repr=False, compare=False
    )
    # Every `args` member name a rule names, by its lower-case form: the spellings policy
    # reads. Go's encoding/json, ASP.NET and Jackson bind {"Role": ...} to a field role that
    # has(args.role) never sees, so a body key that folds to one of these but is spelled
    # otherwise is refused (protocols/http_body.check_spellings).
    arg_spellings: Mapping[str, frozenset[str]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_id: dict[str, Rule] = {}
        for rule in self.rules:
            by_id.setdefault(rule.id, rule)  # the first rule of an id, as a scan would find
        object.__setattr__(self, "_by_id", by_id)
        object.__setattr__(self, "decisions", {})
        object.__setattr__(self, "body_needs", {})
        spellings: dict[str, set[str]] = {}
        for rule in self.rules:
            for name in rule.arg_names:
                spellings.setdefault(name.lower(), set()).add(name)
        object.__setattr__(self, "arg_spellings", {k: frozenset(v) for k, v in spellings.items()})

    def rule(self, rule_id: str) -> Rule:
        """Raises KeyError for an id no rule has."""
        return self._by_id[rule_id]


def compile_policy(files: Iterable[PolicyFile], builtin: Sequence[RuleSpec] = ()) -> PolicySet:
    """Raises ConfigError listing every rule that does not compile.

    `builtin` rules (e.g. the MCP baseline) come after the files' rules; the files' deny
    rules override them like any other allow.
    """
    files = tuple(files)
    issues: list[Issue] = []
    rules: list[Rule] = []
    specs = [spec for policy in files for spec in policy.rules] + list(builtin)
    for spec in specs:
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
    for spec in builtin:
        digest.update(repr((spec.id, spec.actions, spec.effect.value)).encode())
    return PolicySet(
        version=digest.hexdigest()[:12],
        rules=tuple(rules),
        index=index,
        reads_task=any(r.reads_task for r in rules),
        shapes=any(r.redact_fields or r.keep_items for r in rules),
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
    limits = []
    for spec_limit in spec.limits:
        key_expr = None
        if spec_limit.key not in ("agent", "user", "task"):
            where = spec_limit.position
            try:
                key_expr = CEL_ENV.compile(spec_limit.key)
            except RuntimeError as exc:
                issues.append(
                    Issue(
                        where.file,
                        where.line,
                        where.column,
                        f"rule {spec.id}.limits",
                        f"limit {spec_limit.name!r} key is not agent, user, task or "
                        f"CEL that compiles: {_cel_message(exc)}",
                    )
                )
                ok = False
        limits.append(
            Limit(
                spec_limit.name,
                spec_limit.window,
                spec_limit.key,
                key_expr,
                spec_limit.calls,
                spec_limit.spend,
                spec_limit.currency,
                spec_limit.calendar,
            )
        )
    cost_expr = None
    if spec.cost is not None and spec.cost.expr is not None:
        try:
            cost_expr = CEL_ENV.compile(spec.cost.expr)
        except RuntimeError as exc:
            issues.append(
                Issue(
                    pos.file,
                    pos.line,
                    pos.column,
                    f"rule {spec.id}.cost.expr",
                    f"CEL does not compile: {_cel_message(exc)}",
                )
            )
            ok = False
    redact_fields, keep_items = _shaping(spec, issues)
    if redact_fields is None or keep_items is None:
        ok = False
    principals = None
    try:
        principals = _principal_matcher(spec.agents, spec.users)
    except ValueError as exc:
        issues.append(Issue(pos.file, pos.line, pos.column, f"rule {spec.id}.agents", str(exc)))
    if not ok or principals is None:
        return None
    reads = _reads(spec.when) | set().union(
        *(_reads(lim.key) for lim in spec.limits if lim.key not in ("agent", "user", "task"))
    )
    return Rule(
        id=spec.id,
        effect=spec.effect,
        mode=spec.mode,
        reason=spec.reason,
        patterns=tuple(patterns),
        principals=principals,
        when=spec.when,
        condition=condition,
        position=pos,
        limits=tuple(limits),
        cost=spec.cost,
        label_task=spec.label_task,
        memoizable=not reads & {"args", "now", "task", "request", "llm"},
        reads_task="task" in reads,
        reads_args="args" in reads | _reads(spec.cost.expr if spec.cost else None),
        arg_names=_arg_names(
            spec.when,
            spec.cost.expr if spec.cost else None,
            *(lim.key for lim in spec.limits),
        ),
        builtin=spec.builtin,
        approval=spec.approval,
        upstreams=frozenset(spec.upstreams),
        scopes=frozenset(spec.scopes),
        cost_expr=cost_expr,
        redact_fields=redact_fields or (),
        keep_items=keep_items or (),
        variables=mentioned_variables(spec.when),
        principal_fields=principal_fields(spec.when),
        claims_fields=claims_fields(spec.when),
    )


def _shaping(
    spec: RuleSpec, issues: list[Issue]
) -> tuple[tuple[FieldPath, ...] | None, tuple[KeepItems, ...] | None]:
    """The rule's answer obligations, compiled; None where one does not compile."""
    if not spec.redact_fields and not spec.keep_items:
        return (), ()
    pos = spec.obligations_position or spec.position
    where = f"rule {spec.id}.obligations"
    ok = True
    not_http = [a for a in spec.actions if not a.startswith("http:")]
    if not_http:
        issues.append(
            Issue(
                pos.file,
                pos.line,
                pos.column,
                where,
                "redact_fields and keep_items shape the JSON answers of plain HTTP calls: "
                f"every action must start with http: (not {not_http[0]!r})",
            )
        )
        ok = False
    fields: list[FieldPath] = []
    for text in spec.redact_fields:
        try:
            fields.append(parse_path(text))
        except ValueError as exc:
            issues.append(Issue(pos.file, pos.line, pos.column, f"{where}.redact_fields", str(exc)))
            ok = False
    keeps: list[KeepItems] = []
    for keep in spec.keep_items:
        kpos = keep.position
        try:
            path = parse_path(keep.path, names_list=True)
        except ValueError as exc:
            issues.append(Issue(kpos.file, kpos.line, kpos.column, f"{where}.keep_items", str(exc)))
            ok = False
            continue
        try:
            condition = ITEM_ENV.compile(keep.when)
        except RuntimeError as exc:
            issues.append(
                Issue(
                    kpos.file,
                    kpos.line,
                    kpos.column,
                    f"{where}.keep_items.when",
                    f"CEL does not compile: {_cel_message(exc)}",
                )
            )
            ok = False
            continue
        keeps.append(
            KeepItems(
                path,
                keep.when,
                condition,
                mentioned_variables(keep.when),
                principal_fields(keep.when),
                claims_fields(keep.when),
            )
        )
    if not ok:
        return None, None
    return tuple(fields), tuple(keeps)


_STRING_LITERAL = re.compile(r"'(?:[^'\\]|\\.)*'" + r'|"(?:[^"\\]|\\.)*"')
_IDENTIFIER = re.compile(r"(?<![.\w])([A-Za-z_]\w*)")


def without_strings(source: str) -> str:
    """`source` with every CEL string literal emptied: what it reads, not what it quotes."""
    return _STRING_LITERAL.sub("''", source)


def _reads(source: str | None) -> set[str]:
    """The top-level variables a CEL source may read (string literals removed first)."""
    if not source:
        return set()
    return set(_IDENTIFIER.findall(without_strings(source))) & set(CEL_VARIABLES)


_ARGS_CHAIN = re.compile(r"(?<![.\w])args((?:\s*\.\s*[A-Za-z_]\w*)+)")
_ARGS_INDEX = re.compile(r"""(?<![.\w])args\s*\[\s*(?:'([^'\\]*)'|"([^"\\]*)")\s*\]""")
_IN_ARGS = re.compile(r"""(?:'([^'\\]*)'|"([^"\\]*)")\s+in\s+args\b""")


def _arg_names(*sources: str | None) -> frozenset[str]:
    """The member names of `args` that CEL sources name: each step of `args.a.b`, an index
    `args["a"]` and `"a" in args` (a superset: a name in a string literal counts too)."""
    names: set[str] = set()
    for source in sources:
        if not source:
            continue
        text = _STRING_LITERAL.sub("''", source)
        for match in _ARGS_CHAIN.finditer(text):
            steps = [step.strip() for step in match.group(1).split(".") if step.strip()]
            if text[match.end() :].lstrip().startswith("("):
                steps.pop()  # a method called on the value: args.to.startsWith(...)
            names.update(steps)
        for pattern in (_ARGS_INDEX, _IN_ARGS):
            names.update(a or b for a, b in pattern.findall(source) if a or b)
    return frozenset(names)


_VARIABLE_WORDS = {name: re.compile(rf"\b{name}\b") for name in CEL_VARIABLES}


def mentioned_variables(source: str | None) -> frozenset[str]:
    """Every CEL variable whose name appears anywhere in `source`, even inside a string or
    after a dot: a superset of what it reads, so handing a condition only these can never
    leave out a variable it uses (`.principal`, a root-scoped name, included)."""
    if not source:
        return frozenset()
    return frozenset(name for name, word in _VARIABLE_WORDS.items() if word.search(source))


_PRINCIPAL = re.compile(r"\bprincipal\b")
_CLAIMS = re.compile(r"\bprincipal\s*\.\s*claims\b")
# A member selected by name: not a method or macro called on the map (`.exists(`), which
# needs all of it.
_MEMBER = re.compile(r"\s*\.\s*([A-Za-z_]\w*)\b(?!\s*\()")


def principal_fields(source: str | None) -> frozenset[str] | None:
    """The members of `principal` a condition may read: `principal.claims.dept` reads
    `claims`. None when it uses `principal` any other way (whole, indexed, a macro over it,
    `.?` optional selection, a quoted field): it is handed all of it then. Like
    `mentioned_variables`, a superset: every occurrence counts, inside strings and after a
    dot too."""
    return _members(source, _PRINCIPAL)


def claims_fields(source: str | None) -> frozenset[str] | None:
    """The same for `principal.claims`: `has(principal.claims.email)` reads `email`, and
    `"x" in principal.claims` or `principal.claims.exists(...)` all of them (None)."""
    return _members(source, _CLAIMS)


def _members(source: str | None, of: re.Pattern[str]) -> frozenset[str] | None:
    text = source or ""
    fields: set[str] = set()
    for found in of.finditer(text):
        member = _MEMBER.match(text, found.end())
        if member is None:
            return None
        fields.add(member.group(1))
    return frozenset(fields)


def _principal_matcher(agents: tuple[str, ...], users: tuple[str, ...]) -> PrincipalMatcher:
    """Raises ValueError for an entry `PrincipalRef.parse` refuses."""
    refs = [PrincipalRef.parse(a) for a in agents]
    unbound = [r for r in refs if r.issuer is None]
    user_globs = [u for u in users if _is_glob(u)]
    return PrincipalMatcher(
        any_agent=any(r.kind == "any" for r in unbound),
        agents=frozenset(r.value for r in unbound if r.kind == "id"),
        roles=frozenset(r.value for r in unbound if r.kind == "role"),
        agent_globs=_glob_regex([r.value for r in unbound if r.kind == "glob"]),
        bound=tuple(r for r in refs if r.issuer is not None),
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
