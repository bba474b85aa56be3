"""`decide()` on its own: no ports, no clock, values in and values out."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from agentproxy.config.policies import read_policy_file
from agentproxy.config.yamldoc import Issue
from agentproxy.core import Action, Effect, Facts, Principal
from agentproxy.policy import PolicySet, TraceStep, compile_policy, decide
from agentproxy.policy.compiler import claims_fields, mentioned_variables, principal_fields
from agentproxy.policy.patterns import PatternIndex, compile_pattern, is_linear_on_re

POLICY = """
default: deny
rules:
  - id: read
    agents: [hr-bot, "role:hr"]
    actions: ["http:GET /v1/employees/{id}"]
    when: 'resource.id != "13"'
    effect: allow
  - id: no-salary
    agents: ["*"]
    actions: ["http:* /v1/employees/{id}/salary"]
    effect: deny
  - id: ops
    agents: ["role:ops"]
    actions: ["http:* /**"]
    effect: allow
  - id: broken-deny
    agents: [hr-bot]
    actions: ["http:GET /v1/reports/{name}"]
    when: 'resource.nope == "x"'
    effect: deny
  - id: reports
    agents: [hr-bot]
    actions: ["http:GET /v1/reports/{name}"]
    effect: allow
  - id: bots
    agents: ["bot-*"]
    users: [alice, "team-*"]
    actions: ["http:GET /v1/me", "http:GET /v1/files/{path...}"]
    when: 'principal.user != null && resource.query.limit == "10"'
    effect: allow
  - id: shadow-no-put
    agents: ["*"]
    actions: ["http:PUT /**"]
    effect: deny
    mode: shadow
  - id: task-scoped
    agents: [hr-bot]
    actions: ["http:POST /v1/tasks/{id}/done"]
    when: 'task.id == resource.id && now > timestamp("2020-01-01T00:00:00Z")'
    effect: allow
"""


def compile_text(tmp_path: Path, text: str) -> PolicySet:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    issues: list[Issue] = []
    policy = read_policy_file(path, issues)
    assert issues == []
    return compile_policy([policy])


@pytest.fixture
def policy(tmp_path: Path) -> PolicySet:
    return compile_text(tmp_path, POLICY)


def http(method: str, path: str, query: dict[str, str] | None = None) -> Action:
    return Action("http", method, path, query=query or {})


HR = Principal(agent="hr-bot")
NOW = time.time()


def test_allow_and_cel_on_path_params(policy: PolicySet) -> None:
    d = decide(policy, http("GET", "/v1/employees/42"), HR, Facts(), NOW)
    assert (d.effect, d.rule_id, d.matched_action) == (
        Effect.ALLOW,
        "read",
        "http:GET /v1/employees/{id}",
    )
    d = decide(policy, http("GET", "/v1/employees/13"), HR, Facts(), NOW)
    assert (d.effect, d.rule_id) == (Effect.DENY, None)


def test_roles_and_default_deny(policy: PolicySet) -> None:
    hr_role = Principal(agent="someone", roles=frozenset({"hr"}))
    assert (
        decide(policy, http("GET", "/v1/employees/1"), hr_role, Facts(), NOW).effect is Effect.ALLOW
    )
    stranger = Principal(agent="stranger")
    d = decide(policy, http("GET", "/v1/employees/1"), stranger, Facts(), NOW)
    assert d.effect is Effect.DENY and d.rule_id is None and "no rule allows" in d.reason


def test_deny_overrides_allow(policy: PolicySet) -> None:
    ops = Principal(agent="o", roles=frozenset({"ops"}))
    assert decide(policy, http("DELETE", "/anything"), ops, Facts(), NOW).effect is Effect.ALLOW
    d = decide(policy, http("GET", "/v1/employees/7/salary"), ops, Facts(), NOW)
    assert (d.effect, d.rule_id) == (Effect.DENY, "no-salary")


def test_a_condition_error_denies_and_names_the_rule(policy: PolicySet) -> None:
    trace: list[TraceStep] = []
    d = decide(policy, http("GET", "/v1/reports/q3"), HR, Facts(), NOW, trace)
    assert (d.effect, d.rule_id) == (Effect.DENY, "broken-deny")
    assert "could not be evaluated" in d.reason
    assert any(step.rule == "reports" and step.outcome == "matched: allow" for step in trace)


def test_users_globs_query_and_rest_templates(policy: PolicySet) -> None:
    alice = Principal(agent="bot-1", acting_for="alice")
    assert (
        decide(policy, http("GET", "/v1/me", {"limit": "10"}), alice, Facts(), NOW).effect
        is Effect.ALLOW
    )
    team = Principal(agent="bot-1", acting_for="team-x")
    action = http("GET", "/v1/files/a/b%20c.txt", {"limit": "10"})
    assert decide(policy, action, team, Facts(), NOW).effect is Effect.ALLOW
    bob = Principal(agent="bot-1", acting_for="bob")
    assert (
        decide(policy, http("GET", "/v1/me", {"limit": "10"}), bob, Facts(), NOW).effect
        is Effect.DENY
    )
    no_user = Principal(agent="bot-1")
    assert (
        decide(policy, http("GET", "/v1/me", {"limit": "10"}), no_user, Facts(), NOW).effect
        is Effect.DENY
    )
    # parameter pollution: a repeated name is a list, the string comparison errors, the rule denies
    polluted = Action("http", "GET", "/v1/me", query={"limit": ("10", "100000")})
    assert decide(policy, polluted, alice, Facts(), NOW).effect is Effect.DENY


def test_shadow_rules_report_what_they_would_change(policy: PolicySet) -> None:
    ops = Principal(agent="o", roles=frozenset({"ops"}))
    d = decide(policy, http("PUT", "/v1/x"), ops, Facts(), NOW)
    assert (d.effect, d.rule_id) == (Effect.ALLOW, "ops")
    assert (d.shadow_effect, d.shadow_rule) == (Effect.DENY, "shadow-no-put")
    d = decide(policy, http("GET", "/v1/x"), ops, Facts(), NOW)
    assert d.shadow_effect is None


def test_a_rule_deciding_as_written_answers_with_one_shared_decision(policy: PolicySet) -> None:
    first = decide(policy, http("GET", "/v1/employees/42"), HR, Facts(), NOW)
    again = decide(policy, http("GET", "/v1/employees/43"), Principal(agent="hr-bot"), Facts(), NOW)
    assert again is first and (first.effect, first.rule_id) == (Effect.ALLOW, "read")
    alice = Principal(agent="bot-1", acting_for="alice")
    me = decide(policy, http("GET", "/v1/me", {"limit": "10"}), alice, Facts(), NOW)
    files = decide(policy, http("GET", "/v1/files/a", {"limit": "10"}), alice, Facts(), NOW)
    assert (me.matched_action, files.matched_action) == (
        "http:GET /v1/me",
        "http:GET /v1/files/{path...}",
    )


def test_shared_decisions_keep_memoizability_apart_and_errors_out(policy: PolicySet) -> None:
    both = Principal(agent="hr-bot", roles=frozenset({"ops"}))
    # `ops` wins both; on the task path a condition reading `task` matched too.
    task = decide(policy, http("POST", "/v1/tasks/t-1/done"), both, Facts(task_id="t-1"), NOW)
    other = decide(policy, http("POST", "/v1/other"), both, Facts(), NOW)
    assert (task.rule_id, other.rule_id) == ("ops", "ops")
    assert (task.memoizable, other.memoizable) == (False, True)
    # A decision carrying its own error text is built each time, so agents cannot grow the
    # shared set by varying what makes a condition fail.
    kept = len(policy.decisions)
    for name in ("a", "b", "c"):
        d = decide(policy, http("GET", f"/v1/reports/{name}"), HR, Facts(), NOW)
        assert (d.effect, d.rule_id) == (Effect.DENY, "broken-deny")
    assert len(policy.decisions) == kept


def test_task_and_now_facts(policy: PolicySet) -> None:
    action = http("POST", "/v1/tasks/t-1/done")
    assert decide(policy, action, HR, Facts(task_id="t-1"), NOW).effect is Effect.ALLOW
    assert decide(policy, action, HR, Facts(task_id="t-2"), NOW).effect is Effect.DENY
    assert decide(policy, action, HR, Facts(task_id="t-1"), 0.0).effect is Effect.DENY


def test_methods_and_paths_are_case_sensitive(policy: PolicySet) -> None:
    assert decide(policy, http("get", "/v1/employees/42"), HR, Facts(), NOW).effect is Effect.DENY
    assert decide(policy, http("GET", "/V1/employees/42"), HR, Facts(), NOW).effect is Effect.DENY


def test_policy_version_follows_the_bytes(tmp_path: Path) -> None:
    a = compile_text(tmp_path, POLICY)
    b = compile_text(tmp_path, POLICY)
    c = compile_text(tmp_path, POLICY + "\n# a comment changes the file\n")
    assert a.version == b.version != c.version


@pytest.mark.parametrize(
    ("pattern", "action", "bindings"),
    [
        ("http:GET /v1/employees/{id}", "http:GET /v1/employees/42", {"id": "42"}),
        ("http:GET /v1/employees/{id}", "http:GET /v1/employees/42/salary", None),
        ("http:GET /v1/files/{path...}", "http:GET /v1/files/a/b/c", {"path": "a/b/c"}),
        ("http:GET /v1/files/{path...}", "http:GET /v1/files/", None),
        ("http:* /v1/*", "http:DELETE /v1/x", {}),
        ("http:* /v1/*", "http:DELETE /v1/x/y", None),
        ("http:GET /v1/**", "http:GET /v1/x/y", {}),
        ("mcp:tools/call/pay*", "mcp:tools/call/payments.transfer", {}),
        ("*", "grpc:/pkg.Svc/Method", {}),
        ("http:GET /a.b", "http:GET /aXb", None),
    ],
)
def test_patterns(pattern: str, action: str, bindings: dict[str, str] | None) -> None:
    assert compile_pattern(pattern).match(action) == bindings


# Patterns whose split of the input is ambiguous: they run on RE2, which must read them as
# Python's re (and the README) do, bindings included.
@pytest.mark.parametrize(
    ("pattern", "action", "bindings"),
    [
        ("mcp:tools/call/*-*-*.csv", "mcp:tools/call/a-b-c.csv", {}),
        ("mcp:tools/call/*-*-*.csv", "mcp:tools/call/a-b.csv", None),
        ("mcp:tools/call/*-*-*.csv", "mcp:tools/call/a-b-c/d.csv", None),
        ("http:GET /files/**/*.csv", "http:GET /files/a/b/c.csv", {}),
        ("http:GET /files/**/*.csv", "http:GET /files/c.csv", None),
        ("http:GET /v1/{p...}/{id}", "http:GET /v1/a/b/c", {"p": "a/b", "id": "c"}),
        ("http:GET /v1/{a}-{b}", "http:GET /v1/x-y-z", {"a": "x-y", "b": "z"}),
        ("http:GET /v1/**/x/**", "http:GET /v1/a/x/b/x/c", {}),
        ("http:GET /n/*.*", "http:GET /n/a\nb.c", {}),  # a newline, as re.DOTALL reads it
    ],
)
def test_ambiguous_patterns_match_as_documented(
    pattern: str, action: str, bindings: dict[str, str] | None
) -> None:
    compiled = compile_pattern(pattern)
    assert not is_linear_on_re(compiled)
    assert compiled.match(action) == bindings
    reference = re.fullmatch(compiled_source(pattern), action, re.DOTALL)
    assert (reference.groupdict() if reference else None) == bindings


@pytest.mark.parametrize(
    "pattern",
    [
        "mcp:tools/call/*-*-*.csv",
        "http:GET /files/**/*.csv",
        "http:GET /v1/{p...}/{id}",
        "http:GET /v1/{a}-{b}-{c}",
        "http:* /a/**-**-**/b",
        "http:* /**/x/**/y/**/z",
    ],
)
def test_no_pattern_backtracks_on_what_an_agent_sends(pattern: str) -> None:
    """The attack: a long segment that almost matches. Backtracking regexes take seconds to
    hours on these (cubic and worse); each must run on RE2 and answer."""
    compiled = compile_pattern(pattern)
    assert not is_linear_on_re(compiled)
    for filler in ("-", "/", "-/", "a"):
        action = pattern.split(" ", 1)[0].replace("*", "GET") + " /" + filler * 20_000
        if pattern.startswith("mcp:"):
            action = "mcp:tools/call/" + filler * 20_000
        assert compiled.match(action + "!") is None


@pytest.mark.parametrize(
    "pattern",
    [
        "http:* /**",
        "http:GET /v1/employees/{id}",
        "http:* /v1/*/items/{id}",
        "http:GET /v1/files/{path...}",
        "mcp:tools/call/pay*",
        "http:GET /reports/{name}.csv",
    ],
)
def test_unambiguous_patterns_stay_on_re(pattern: str) -> None:
    assert is_linear_on_re(compile_pattern(pattern))


def compiled_source(pattern: str) -> str:
    """The regex the module builds, through Python's re (the reference semantics)."""
    parts: list[str] = []
    pos = 0
    for m in re.finditer(r"\{([A-Za-z_][A-Za-z0-9_]*)(\.\.\.)?\}|\*\*|\*", pattern):
        parts.append(re.escape(pattern[pos : m.start()]))
        if m.group(1):
            inner = "[^/]+(?:/[^/]+)*" if m.group(2) else "[^/]+"
            parts.append(f"(?P<{m.group(1)}>{inner})")
        else:
            parts.append(".*" if m.group(0) == "**" else "[^/]*")
        pos = m.end()
    return "".join(parts) + re.escape(pattern[pos:])


def test_index_returns_only_candidates_in_rule_order() -> None:
    index: PatternIndex[int] = PatternIndex()
    patterns = ["http:GET /v1/a/{id}", "http:* /**", "http:GET /v1/b", "http:GET /v1/a/x", "*"]
    for i, text in enumerate(patterns):
        index.add(compile_pattern(text), i)
    assert index.candidates("http:GET /v1/a/x") == (0, 1, 3, 4)
    assert index.candidates("http:GET /v1/b") == (1, 2, 4)
    assert index.candidates("mcp:tools/call/x") == (1, 4)
    assert sorted(index) == [0, 1, 2, 3, 4]


def test_ten_thousand_rules_stay_indexed(tmp_path: Path) -> None:
    rule = '  - id: r{i}\n    agents: [a{i}]\n    actions: ["http:GET /svc{i}/items/{{id}}"]\n'
    rules = "".join(rule.format(i=i) + "    effect: allow\n" for i in range(10_000))
    policy = compile_text(tmp_path, "default: deny\nrules:\n" + rules)
    assert len(policy.index.candidates("http:GET /svc7777/items/1")) == 1
    d = decide(policy, http("GET", "/svc7777/items/1"), Principal(agent="a7777"), Facts(), NOW)
    assert d.rule_id == "r7777"


def test_rules_are_found_by_id_first_of_an_id_first(tmp_path: Path) -> None:
    policy = compile_text(tmp_path, POLICY)
    assert policy.rule("reports").id == "reports"
    assert policy.rule("shadow-no-put").effect is Effect.DENY
    with pytest.raises(KeyError):
        policy.rule("nope")


@pytest.mark.parametrize(
    ("source", "variables"),
    [
        (None, set()),
        ('resource.id != "13"', {"resource"}),
        ("principal.user != null && resource.query.limit == '10'", {"principal", "resource"}),
        # A root-scoped name (leading dot) and names inside strings or after a dot all count:
        # handing a condition more variables than it reads is harmless, fewer would deny.
        ('.principal.agent == "a"', {"principal"}),
        ('args.request == "now"', {"args", "request", "now"}),
        (
            "task.id == resource.id && now > timestamp('2020-01-01T00:00:00Z')",
            {"task", "resource", "now"},
        ),
        ("size(args.ids) < 3 && action.name.startsWith('http:')", {"args", "action"}),
    ],
)
def test_a_condition_is_handed_every_variable_it_mentions(
    source: str | None, variables: set[str]
) -> None:
    assert mentioned_variables(source) == variables


@pytest.mark.parametrize(
    ("source", "fields"),
    [
        (None, set()),
        ('resource.id != "13"', set()),
        ('principal.claims.dept == "hr"', {"claims"}),
        ("principal.roles.exists(r, r == 'a') && .principal . agent == 'b'", {"roles", "agent"}),
        ("has(principal.user)", {"user"}),
        ('args.principal.name == "principal.x"', {"name", "x"}),  # strings count: a superset
        # Any other use hands the condition all of `principal`.
        ('principal["claims"]["dept"] == "hr"', None),
        ('"claims" in principal', None),
        ("principal.?claims.orValue({}) == {}", None),
        ('principal.claims.dept == "hr" && size(principal) == 7', None),
        ('principal.exists(k, k == "claims")', None),  # a macro over the map, not a member
    ],
)
def test_a_condition_is_handed_the_principal_members_it_mentions(
    source: str | None, fields: set[str] | None
) -> None:
    assert principal_fields(source) == (None if fields is None else frozenset(fields))


@pytest.mark.parametrize(
    ("source", "fields"),
    [
        ("principal.agent == 'a'", set()),
        ('principal.claims.dept == "hr" && has(principal . claims . email)', {"dept", "email"}),
        ('principal.claims.groups.exists(g, g == "hr")', {"groups"}),
        ('principal.claims.exists(k, k == "x")', None),
        ('"x" in principal.claims', None),
        ('principal.claims["x"] == 1', None),
        ("principal.claims.size() > 0", None),
        ('principal.claims.dept == "hr" && size(principal.claims) == 3', None),
    ],
)
def test_a_condition_is_handed_the_claims_it_mentions(source: str, fields: set[str] | None) -> None:
    assert claims_fields(source) == (None if fields is None else frozenset(fields))


def test_conditions_decide_the_same_on_the_claims_they_are_handed(tmp_path: Path) -> None:
    text = """
default: deny
rules:
  - id: named
    agents: [hr-bot]
    actions: ["http:GET /v1/named"]
    when: 'principal.claims.dept == "hr" && !has(principal.claims.nope)'
    effect: allow
  - id: macro
    agents: [hr-bot]
    actions: ["http:GET /v1/macro"]
    when: 'principal.claims.dept == "hr" && principal.claims.exists(k, k == "email")'
    effect: allow
  - id: counted
    agents: [hr-bot]
    actions: ["http:GET /v1/counted"]
    when: 'principal.claims.dept == "hr" && size(principal.claims) == 3'
    effect: allow
  - id: indexed
    agents: [hr-bot]
    actions: ["http:GET /v1/indexed"]
    when: 'principal.claims.dept == "hr" && principal["claims"]["email"] == "a@b"'
    effect: allow
"""
    policy = compile_text(tmp_path, text)
    hr = Principal(agent="hr-bot", claims={"dept": "hr", "email": "a@b", "groups": ["g"]})
    for path in ("named", "macro", "counted", "indexed"):
        d = decide(policy, http("GET", f"/v1/{path}"), hr, Facts(), NOW)
        assert (d.effect, d.rule_id) == (Effect.ALLOW, path)
    assert hr.claims == {"dept": "hr", "email": "a@b", "groups": ["g"]}  # nothing trimmed


def test_a_condition_reading_principal_whole_sees_all_of_it(tmp_path: Path) -> None:
    text = """
default: deny
rules:
  - id: whole
    agents: [hr-bot]
    actions: ["http:GET /v1/whole"]
    when: '"claims" in principal && principal["agent"] == "hr-bot" && size(principal) == 7'
    effect: allow
  - id: members
    agents: [hr-bot]
    actions: ["http:GET /v1/members"]
    when: 'principal.claims.dept == "hr" && principal.roles == ["r"] && principal.user == null'
    effect: allow
"""
    policy = compile_text(tmp_path, text)
    hr = Principal(agent="hr-bot", claims={"dept": "hr", "email": "a@b"}, roles=frozenset({"r"}))
    assert decide(policy, http("GET", "/v1/whole"), hr, Facts(), NOW).effect is Effect.ALLOW
    trace: list[TraceStep] = []
    d = decide(policy, http("GET", "/v1/members"), hr, Facts(), NOW, trace)
    assert d.effect is Effect.ALLOW
    assert trace[0].values["principal.claims.dept"] == "hr"


def test_conditions_see_the_same_values_with_only_their_variables(tmp_path: Path) -> None:
    text = """
default: deny
rules:
  - id: every-variable
    agents: [hr-bot]
    actions: ["http:GET /v1/all/{id}"]
    when: >-
      .principal.agent == "hr-bot" && principal.claims.dept == "hr" && action.protocol == "http"
      && resource.id == "7" && resource.query.q == "x" && request.method == "GET"
      && task.id == "t1" && args == {} && now > timestamp("2020-01-01T00:00:00Z")
    effect: allow
  - id: claims-only
    agents: [hr-bot]
    actions: ["http:GET /v1/claims/{id}"]
    when: 'principal.claims.dept == "hr" && has(resource.id)'
    effect: allow
"""
    policy = compile_text(tmp_path, text)
    hr = Principal(agent="hr-bot", claims={"dept": "hr"})
    every = decide(policy, http("GET", "/v1/all/7", {"q": "x"}), hr, Facts(task_id="t1"), NOW)
    assert (every.effect, every.rule_id) == (Effect.ALLOW, "every-variable")
    claims = decide(policy, http("GET", "/v1/claims/1"), hr, Facts(), NOW)
    assert (claims.effect, claims.rule_id) == (Effect.ALLOW, "claims-only")
    other = Principal(agent="hr-bot", claims={"dept": "sales"})
    assert decide(policy, http("GET", "/v1/claims/1"), other, Facts(), NOW).effect is Effect.DENY
    trace: list[TraceStep] = []
    decide(policy, http("GET", "/v1/all/7", {"q": "y"}), hr, Facts(task_id="t1"), NOW, trace)
    assert trace[0].outcome.startswith("condition false")
    assert trace[0].values["resource.query.q"] == "y"


def test_each_principal_is_decided_on_its_own_claims(tmp_path: Path) -> None:
    # The CEL view of a principal is remembered by identity; principals made and dropped one
    # after the other (whose ids CPython reuses) must still be read afresh.
    text = """
default: deny
rules:
  - id: hr-only
    agents: ["*"]
    actions: ["http:GET /v1/x"]
    when: 'principal.claims.dept == "hr"'
    effect: allow
"""
    policy = compile_text(tmp_path, text)
    for i in range(10_000):
        dept = "hr" if i % 3 == 0 else "sales"
        decision = decide(
            policy, http("GET", "/v1/x"), Principal(agent="a", claims={"dept": dept}), Facts(), NOW
        )
        assert (decision.effect is Effect.ALLOW) == (dept == "hr")


def test_index_lookups_see_entries_added_after_them() -> None:
    index: PatternIndex[int] = PatternIndex()
    index.add(compile_pattern("http:GET /v1/{x}"), 0)
    assert index.candidates("http:GET /v1/a") == (0,)
    index.add(compile_pattern("*"), 1)
    index.add(compile_pattern("http:GET /v1/a"), 2)
    assert index.candidates("http:GET /v1/a") == (0, 1, 2)
    # Shared by every lookup, so no caller can change what the next one sees.
    assert isinstance(index.candidates("http:GET /v1/a"), tuple)


@pytest.mark.parametrize(
    ("pattern", "action", "bindings"),
    [
        ("http:* /admin/**", "http:GET /ADMIN/export", {}),
        ("http:GET /v1/users/{id}", "http:GET /V1/Users/Root", {"id": "Root"}),
        ("http:GET /files/*-*-*.csv", "http:GET /FILES/a-b-c.CSV", {}),  # on RE2
        ("http:GET /v1/users/{id}", "http:GET /v2/users/x", None),
    ],
)
def test_case_folded_matching_keeps_the_bindings_as_sent(
    pattern: str, action: str, bindings: dict[str, str] | None
) -> None:
    compiled = compile_pattern(pattern)
    assert compiled.match(action, fold_case=True) == bindings
    assert compiled.match(action) is None  # as sent, the case differs: no match


def test_the_index_finds_rules_whatever_the_case_when_asked() -> None:
    index: PatternIndex[int] = PatternIndex()
    for i, text in enumerate(["http:GET /admin/**", "http:GET /v1/a", "http:GET /V1/b", "*"]):
        index.add(compile_pattern(text), i)
    assert index.candidates("http:GET /ADMIN/x") == (3,)
    assert index.candidates("http:GET /ADMIN/x", fold_case=True) == (0, 3)
    assert index.candidates("http:GET /v1/A", fold_case=True) == (1, 3)
    assert index.candidates("http:GET /v1/B", fold_case=True) == (2, 3)
