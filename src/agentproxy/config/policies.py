"""Policy files: `default` and `rules`, read into rule specs with every problem at its line.

The policy compiler (`policy/`) turns these specs into the indexed rule table; here they are
only read and checked: keys, types, effects, limits, cost, obligations and approvals.
"""

from __future__ import annotations

import glob
import hashlib
import re
from pathlib import Path
from typing import Any

from agentproxy.config.model import (
    SCOPE_TOKEN,
    ApprovalSpec,
    CostSpec,
    KeepItemsSpec,
    LimitSpec,
    PolicyFile,
    PrincipalRef,
    RuleSpec,
)
from agentproxy.config.yamldoc import Document, Issue
from agentproxy.core import Effect, Mode

_RULE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
CURRENCY = re.compile(r"[A-Z]{3}")
CALENDAR_WINDOWS = {"day": 86400.0, "week": 7 * 86400.0, "month": 31 * 86400.0}


def load_policies(
    patterns: tuple[str, ...],
    base: Path,
    config_doc: Document,
    issues: list[Issue],
    *,
    exclude: Path | None = None,
) -> tuple[PolicyFile, ...]:
    """Expands `policy_files` globs (relative to the config) and reads each policy file.

    Files named `*_test.yaml` are policy tests, not policies, and are skipped.
    """
    files: list[Path] = []
    for i, pattern in enumerate(patterns):
        full = str(base / pattern)
        matched = sorted(Path(p).absolute() for p in glob.glob(full, recursive=True))
        matched = [
            p
            for p in matched
            if p.is_file()
            and (exclude is None or p.resolve() != exclude.resolve())
            and not p.name.endswith("_test.yaml")
        ]
        if not matched:
            config_doc.error(f"$.policy_files[{i}]", f"{pattern!r} matches no policy file")
        files.extend(p for p in matched if p not in files)
    out = [read_policy_file(path, issues) for path in files]
    ids: dict[str, RuleSpec] = {}
    for policy in out:
        for rule in policy.rules:
            if rule.id in ids:
                first = ids[rule.id].position
                pos = rule.position
                issues.append(
                    Issue(
                        pos.file,
                        pos.line,
                        pos.column,
                        "$.rules",
                        f"rule id {rule.id!r} is already used at {first}",
                    )
                )
            ids.setdefault(rule.id, rule)
    return tuple(out)


RULE_KEYS = (
    "approval",
    "id",
    "description",
    "agents",
    "users",
    "upstreams",
    "scopes",
    "actions",
    "when",
    "effect",
    "reason",
    "mode",
    "limits",
    "cost",
    "obligations",
)
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
CURRENCY = re.compile(r"[A-Z]{3}")
CALENDAR_WINDOWS = {"day": 86400.0, "week": 7 * 86400.0, "month": 31 * 86400.0}


def read_policy_file(path: Path, issues: list[Issue]) -> PolicyFile:
    """Reads one policy file into rule specs; problems go to `issues`."""
    doc = Document(str(path), issues)
    try:
        data = path.read_bytes()
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        issues.append(Issue(str(path), 1, 1, "", f"cannot read policy file: {exc}"))
        return PolicyFile(str(path), (), "")
    raw = doc.mapping(doc.parse(text), "$", ("default", "rules"))
    doc.check(
        raw.get("default", "deny") == "deny",
        "$.default",
        'only "deny" is supported: a call no rule allows is refused',
    )
    rules = tuple(doc.each(raw.get("rules"), "$.rules", lambda v, p: _rule(doc, v, p)))
    return PolicyFile(str(path), rules, hashlib.sha256(data).hexdigest())


def _rule(doc: Document, value: Any, path: str) -> RuleSpec | None:
    section = doc.mapping(value, path, RULE_KEYS)
    if not section:
        return None
    rule_id = doc.get(section, path, "id", str, required=True) or ""
    doc.check(
        not rule_id or bool(_RULE_ID.fullmatch(rule_id)),
        f"{path}.id",
        "must be letters, digits, '.', '_', ':' or '-' (at most 128)",
    )
    agents = doc.strings(section, path, "agents", required=True)
    actions = doc.strings(section, path, "actions", required=True)
    doc.check(
        "actions" not in section or bool(actions),
        f"{path}.actions",
        "must name at least one action",
    )
    doc.check(
        "agents" not in section or bool(agents),
        f"{path}.agents",
        'must name at least one agent (or "*")',
    )
    effect = doc.choice(section, path, "effect", [e.value for e in Effect], "deny")
    if "effect" not in section:
        doc.error(path, 'missing required key "effect" (allow, deny or require_approval)')
    when = doc.get(section, path, "when", str)
    cost = _cost(doc, section.get("cost"), f"{path}.cost")
    limits = tuple(
        doc.each(section.get("limits"), f"{path}.limits", lambda v, p: _limit(doc, v, p))
    )
    names = [limit.name for limit in limits]
    for dup in {n for n in names if names.count(n) > 1}:
        doc.error(f"{path}.limits", f"limit {dup!r} is listed twice")
    for i, limit in enumerate(limits):
        if limit.spend is None:
            continue
        llm_only = bool(actions) and all(a.startswith("llm:") for a in actions)
        if cost is None and not llm_only:
            # An LLM call's cost is its tokens at the price table: its rule needs no cost.
            doc.error(
                f"{path}.limits[{i}]",
                "a spend limit needs a cost on the rule (cost: {amount, currency}), unless "
                "every action is an llm: call (priced by metering.prices)",
            )
        elif cost is not None and limit.currency != cost.currency:
            doc.error(
                f"{path}.limits[{i}].currency",
                f"must match the rule's cost currency {cost.currency}",
            )
    opath = f"{path}.obligations"
    obligations = doc.mapping(
        section.get("obligations"), opath, ("label_task", "redact_fields", "keep_items")
    )
    labels = doc.strings(obligations, opath, "label_task")
    redact = doc.strings(obligations, opath, "redact_fields")
    keep_value = obligations.get("keep_items")
    if isinstance(keep_value, dict):
        keep_value = [keep_value]  # one list to filter, written without a list around it
    keep = tuple(doc.each(keep_value, f"{opath}.keep_items", lambda v, p: _keep_items(doc, v, p)))
    for label in labels:
        doc.check(
            bool(_LABEL.fullmatch(label)),
            f"{path}.obligations.label_task",
            f"label {label!r}: letters, digits, '.', '_', ':' or '-' (at most 64)",
        )
    if (limits or cost or labels or redact or keep) and effect == "deny":
        doc.error(path, "limits, cost and obligations apply to calls a rule allows, not to a deny")
    scopes = tuple(doc.strings(section, path, "scopes"))
    for i, scope in enumerate(scopes):
        doc.check(
            bool(SCOPE_TOKEN.fullmatch(scope)),
            f"{path}.scopes[{i}]",
            f"{scope!r} is not a scope token (RFC 6749 §3.3)",
        )
    if scopes and effect == "deny":
        doc.error(
            f"{path}.scopes",
            "scopes are what a call needs to be allowed; a deny applies whatever the token "
            "holds (use a when condition on principal.scopes to deny by scope)",
        )
    approval = _approval(doc, section.get("approval"), f"{path}.approval")
    if effect == "require_approval" and approval is None:
        doc.error(path, 'require_approval needs "approval: {approvers: [...]}" (who may approve)')
    if approval is not None and effect != "require_approval":
        doc.error(f"{path}.approval", "applies to effect: require_approval only")
    return RuleSpec(
        approval=approval,
        limits=limits,
        cost=cost,
        label_task=labels,
        redact_fields=redact,
        keep_items=keep,
        obligations_position=doc.position(opath) if "obligations" in section else None,
        id=rule_id,
        agents=agents,
        users=doc.strings(section, path, "users"),
        upstreams=doc.strings(section, path, "upstreams"),
        scopes=scopes,
        actions=actions,
        effect=Effect(effect),
        when=when,
        reason=doc.get(section, path, "reason", str, "") or "",
        mode=Mode(doc.choice(section, path, "mode", [m.value for m in Mode], "enforce")),
        position=doc.position(path),
        when_position=doc.position(f"{path}.when") if when is not None else None,
    )


def _keep_items(doc: Document, value: Any, path: str) -> KeepItemsSpec | None:
    section = doc.mapping(value, path, ("path", "when"))
    where = doc.get(section, path, "path", str, required=True)
    when = doc.get(section, path, "when", str, required=True)
    if where is None or when is None:
        return None
    return KeepItemsSpec(where, when, doc.position(f"{path}.when"))


def _cost(doc: Document, value: Any, path: str) -> CostSpec | None:
    if value is None:
        return None
    section = doc.mapping(value, path, ("amount", "expr", "currency"))
    currency = doc.get(section, path, "currency", str, required=True)
    expr = doc.get(section, path, "expr", str)
    amount = doc.get(section, path, "amount", float)
    if (amount is None) == (expr is None):
        doc.error(path, "set exactly one of amount (a fixed price) or expr (CEL over the call)")
        return None
    if currency is None:
        return None
    doc.check(amount is None or amount >= 0, f"{path}.amount", "must not be negative")
    doc.check(
        bool(CURRENCY.fullmatch(currency)),
        f"{path}.currency",
        "must be an ISO 4217 code such as USD",
    )
    return CostSpec(amount or 0.0, currency, expr)


def _limit(doc: Document, value: Any, path: str) -> LimitSpec | None:
    section = doc.mapping(value, path, ("name", "calls", "spend", "currency", "window", "key"))
    name = doc.get(section, path, "name", str, required=True)
    if name is not None:
        doc.check(
            bool(_LABEL.fullmatch(name)), f"{path}.name", "letters, digits, '.', '_', ':' or '-'"
        )
    calls = doc.get(section, path, "calls", int)
    spend = doc.get(section, path, "spend", float)
    if (calls is None) == (spend is None):
        doc.error(path, "set exactly one of calls (per window) or spend (per window)")
    doc.check(calls is None or calls > 0, f"{path}.calls", "must be more than 0")
    doc.check(spend is None or spend > 0, f"{path}.spend", "must be more than 0")
    currency = doc.get(section, path, "currency", str)
    if spend is not None and currency is None:
        doc.error(path, 'a spend limit needs "currency"')
    if "window" not in section:
        doc.error(path, 'missing required key "window" (e.g. "1m", "24h", "day", "month")')
    calendar = section.get("window") if section.get("window") in CALENDAR_WINDOWS else None
    if calendar is not None:
        # Calendar windows (UTC): the day, the ISO week from Monday, the month. Nominal length
        # here; each call's window is computed from its time (policy/limits.py).
        window = CALENDAR_WINDOWS[calendar]
    else:
        window = doc.duration(section, path, "window", 60.0)
    doc.check(window >= 1, f"{path}.window", "must be at least 1s")
    key = doc.get(section, path, "key", str, "agent") or "agent"
    if name is None or (calls is None) == (spend is None):
        return None
    return LimitSpec(
        name=name,
        window=window,
        calendar=calendar,
        key=key,
        calls=calls,
        spend=spend,
        currency=currency,
        position=doc.position(path),
    )


def _approval(doc: Document, value: Any, path: str) -> ApprovalSpec | None:
    if value is None:
        return None
    section = doc.mapping(
        value, path, ("approvers", "timeout", "hold", "grant", "reason", "quorum")
    )
    approvers = doc.strings(section, path, "approvers", required=True)
    doc.check(
        "approvers" not in section or bool(approvers),
        f"{path}.approvers",
        'name at least one approver ("role:NAME" or "user:ID")',
    )
    for i, entry in enumerate(approvers):
        try:
            ref = PrincipalRef.parse(entry)
        except ValueError as exc:
            doc.error(f"{path}.approvers[{i}]", str(exc))
            continue
        doc.check(
            ref.kind in ("id", "role"),
            f"{path}.approvers[{i}]",
            "an approver is a person or a role (user:ID or role:NAME), not a pattern",
        )
    timeout = doc.duration(section, path, "timeout", 15 * 60.0)
    hold = doc.duration(section, path, "hold", 25.0)
    doc.check(1 <= timeout <= 7 * 24 * 3600, f"{path}.timeout", "must be between 1s and 7 days")
    # Below common client and load-balancer timeouts (FIELD-NOTES: never hold forever).
    doc.check(0 <= hold <= 55, f"{path}.hold", "must be between 0s and 55s")
    grant = section.get("grant", "once")
    grant_ttl: float | None = None
    if grant != "once":
        g = doc.mapping(grant, f"{path}.grant", ("ttl",)) if isinstance(grant, dict) else None
        ttl = doc.duration(g, f"{path}.grant", "ttl", 0.0) if g else 0.0
        if not ttl:
            doc.error(f"{path}.grant", 'write "once" or {ttl: 1h}')
        grant_ttl = ttl or None
    quorum = doc.get(section, path, "quorum", int, 1) or 1
    doc.check(
        1 <= quorum <= 10,
        f"{path}.quorum",
        "must be between 1 and 10: how many distinct approvers must approve",
    )
    people = [a for a in approvers if not a.startswith("role:")]
    doc.check(
        quorum == 1 or len(people) >= quorum or len(people) < len(approvers),
        f"{path}.quorum",
        f"{quorum} approvals are needed but only {len(people)} approvers are named "
        "(name more, or a role)",
    )
    return ApprovalSpec(
        approvers=approvers,
        timeout=timeout,
        hold=min(hold, timeout),
        grant_ttl=grant_ttl,
        reason=doc.get(section, path, "reason", str, "") or "",
        quorum=max(1, min(quorum, 10)),
    )
