"""`agentproxy policy test DIR`: YAML test suites kept next to the policies, run through the
same `decide()` that serves calls.

A suite is a file named `*_test.yaml`; every other `*.yaml` under DIR is a policy file:

    tests:
      - name: hr-bot reads employee 42
        principal: {agent: hr-bot, user: alice, roles: [hr], claims: {dept: hr}, chain: []}
        request: "GET /v1/employees/42?limit=10"     # or action: "mcp:tools/call/x", args: {...}
        body: {amount: 500}                          # HTTP: a body (JSON; or a string as sent,
        content_type: application/json               #   read by its content_type), as args
        task: {id: t-1, parent: t-0, labels: [pii], calls: 3, spent: 0.5}   # optional
        now: "2026-01-01T00:00:00Z"                            # optional
        expect: allow                                # allow | deny | require_approval
        rule: read-employees                         # optional; `none` for the default deny
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from agentproxy.clock import parse_rfc3339
from agentproxy.config.model import RuleSpec
from agentproxy.config.policies import read_policy_file
from agentproxy.config.yamldoc import ConfigError, Document, Issue
from agentproxy.core import Action, Effect, Facts, Principal
from agentproxy.errors import Refusal
from agentproxy.policy.compiler import PolicySet, compile_policy
from agentproxy.policy.decide import TraceStep, decide

# ("GET /path?q", body, content type) → Action, exactly as the protocol adapters describe it
# (`protocols.request_line.describe_line`, the body read by the data plane's parser); injected
# by the caller (the CLI) because policy/ does not import protocol adapters.
DescribeRequest = Callable[[str, bytes | None, str | None], Action]

CASE_KEYS = (
    "name",
    "principal",
    "request",
    "action",
    "args",
    "body",
    "content_type",
    "task",
    "now",
    "expect",
    "rule",
)
PRINCIPAL_KEYS = ("agent", "user", "roles", "claims", "chain", "issuer", "scopes")
DEFAULT_NOW = parse_rfc3339("2026-01-01T00:00:00Z")


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    where: str
    principal: Principal
    action: Action
    facts: Facts
    now: float
    expect: Effect
    rule: str | None  # None: not checked; "none": the default deny


@dataclass(slots=True)
class Result:
    case: Case
    effect: Effect
    rule: str | None
    trace: list[TraceStep]
    error: str | None = None

    @property
    def passed(self) -> bool:
        if self.error is not None or self.effect is not self.case.expect:
            return False
        expected = self.case.rule
        return expected is None or (self.rule or "none") == expected


@dataclass(slots=True)
class Report:
    results: list[Result] = field(default_factory=list)
    uncovered: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[Result]:
        return [r for r in self.results if not r.passed]


def run_dir(directory: Path, describe: DescribeRequest, builtin: Sequence[RuleSpec] = ()) -> Report:
    """Runs every suite under `directory` against the policies beside them.

    Raises ConfigError for policies or suites that do not load.
    """
    files = sorted(p for p in directory.rglob("*.yaml") if p.is_file())
    suites = [p for p in files if p.name.endswith("_test.yaml")]
    policies = [p for p in files if not p.name.endswith("_test.yaml")]
    issues: list[Issue] = []
    if not suites:
        issues.append(Issue(str(directory), 1, 1, "", "no *_test.yaml suites found"))
    policy_files = [read_policy_file(p, issues) for p in policies]
    if issues:
        raise ConfigError(issues)
    policy = compile_policy(policy_files, builtin)
    cases = [case for suite in suites for case in read_suite(suite, issues, describe)]
    if issues:
        raise ConfigError(issues)
    return run(policy, cases)


def run(policy: PolicySet, cases: Iterable[Case]) -> Report:
    report = Report()
    exercised: set[str] = set()
    for case in cases:
        trace: list[TraceStep] = []
        decision = decide(policy, case.action, case.principal, case.facts, case.now, trace)
        exercised.update(step.rule for step in trace if step.outcome.startswith("matched"))
        report.results.append(Result(case, decision.effect, decision.rule_id, trace))
    report.uncovered = [r.id for r in policy.rules if r.id not in exercised and not r.builtin]
    return report


def read_suite(path: Path, issues: list[Issue], describe: DescribeRequest) -> list[Case]:
    doc = Document(str(path), issues)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        issues.append(Issue(str(path), 1, 1, "", f"cannot read suite: {exc}"))
        return []
    raw = doc.mapping(doc.parse(text), "$", ("tests",))
    return doc.each(raw.get("tests"), "$.tests", lambda v, p: _case(doc, v, p, describe))


def _case(doc: Document, value: Any, path: str, describe: DescribeRequest) -> Case | None:
    section = doc.mapping(value, path, CASE_KEYS)
    name = doc.get(section, path, "name", str, required=True) or path
    p = doc.mapping(section.get("principal"), f"{path}.principal", PRINCIPAL_KEYS)
    agent = doc.get(p, f"{path}.principal", "agent", str, required=True)
    claims = doc.get(p, f"{path}.principal", "claims", dict, {}) or {}
    expect = doc.choice(section, path, "expect", [e.value for e in Effect], "deny")
    if "expect" not in section:
        doc.error(path, 'missing required key "expect" (allow, deny or require_approval)')
    action = _action(doc, section, path, describe)
    facts = _facts(doc, section.get("task"), f"{path}.task")
    now = DEFAULT_NOW
    if section.get("now") is not None:
        try:
            now = parse_rfc3339(str(section["now"]))
        except ValueError:
            doc.error(f"{path}.now", 'must be an RFC 3339 time, e.g. "2026-01-01T00:00:00Z"')
    if agent is None or action is None:
        return None
    try:
        principal = Principal(
            agent=agent,
            acting_for=doc.get(p, f"{path}.principal", "user", str),
            chain=doc.strings(p, f"{path}.principal", "chain"),
            roles=frozenset(doc.strings(p, f"{path}.principal", "roles")),
            claims=claims,
            issuer=doc.get(p, f"{path}.principal", "issuer", str, "") or "",
            scopes=frozenset(doc.strings(p, f"{path}.principal", "scopes")),
        )
    except ValueError as exc:
        doc.error(f"{path}.principal", str(exc))
        return None
    where = str(doc.position(path))
    return Case(
        name,
        where,
        principal,
        action,
        facts,
        now,
        Effect(expect),
        doc.get(section, path, "rule", str),
    )


def _action(
    doc: Document, section: dict[str, Any], path: str, describe: DescribeRequest
) -> Action | None:
    request = doc.get(section, path, "request", str)
    name = doc.get(section, path, "action", str)
    if (request is None) == (name is None):
        doc.error(path, 'give exactly one of "request" ("GET /path") or "action" ("mcp:…")')
        return None
    body_value = section.get("body")
    if body_value is not None and request is None:
        doc.error(f"{path}.body", 'a body goes with an HTTP "request"; give "args" otherwise')
    body = None
    if isinstance(body_value, str):
        body = body_value.encode("utf-8")
    elif body_value is not None:
        body = orjson.dumps(body_value)  # written as YAML, sent as the JSON it stands for
    content_type = doc.get(section, path, "content_type", str)
    if request is not None:
        try:
            return describe(request, body, content_type)
        except Refusal as exc:
            if body is not None and "body" in exc.detail.lower():
                doc.error(f"{path}.body", exc.detail)
            else:
                doc.error(f"{path}.request", f"{request!r}: {exc.detail}")
            return None
    if name is None:
        return None
    protocol, sep, rest = name.partition(":")
    operation, _, target = rest.rpartition("/")
    if not sep or not protocol or protocol == "http":
        doc.error(f"{path}.action", 'write "protocol:operation/target"; use "request" for HTTP')
        return None
    return Action(protocol, operation, target, args=section.get("args"), name=name)


def _facts(doc: Document, value: Any, path: str) -> Facts:
    if value is None:
        return Facts()
    t = doc.mapping(value, path, ("id", "parent", "labels", "calls", "spent"))
    return Facts(
        task_id=doc.get(t, path, "id", str),
        task_parent=doc.get(t, path, "parent", str),
        task_labels=frozenset(doc.strings(t, path, "labels")),
        task_calls=doc.get(t, path, "calls", int, 0) or 0,
        task_spent=doc.get(t, path, "spent", float, 0.0) or 0.0,
    )


def format_report(report: Report, *, verbose: bool = False) -> str:
    """A readable report: each failure as expected/got with the trace that explains it."""
    lines: list[str] = []
    for result in report.results:
        case = result.case
        if result.passed and not verbose:
            continue
        status = "PASS" if result.passed else "FAIL"
        lines.append(f"{status} {case.name}  ({case.where})")
        if not result.passed:
            want = case.expect.value + (f" by rule {case.rule}" if case.rule else "")
            got = result.effect.value + f" by rule {result.rule or 'none'}"
            lines.append(f"    expected: {want}")
            lines.append(f"    got:      {got}")
            lines.extend(explain_lines(result.trace, indent="    "))
    total, failed = len(report.results), len(report.failed)
    if report.uncovered:
        lines.append("rules no test exercised: " + ", ".join(report.uncovered))
    lines.append(f"{total - failed} passed, {failed} failed")
    return "\n".join(lines)


def explain_lines(trace: Sequence[TraceStep], *, indent: str = "") -> list[str]:
    if not trace:
        return [f"{indent}no rule's action pattern matches: default deny"]
    out = []
    for step in trace:
        out.append(f"{indent}rule {step.rule} [{step.pattern}]: {step.outcome}")
        for path, value in step.values.items():
            out.append(f"{indent}    {path} = {value!r}")
    return out
