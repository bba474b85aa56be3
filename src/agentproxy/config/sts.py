"""The `sts:` section and its delegation files: who may act for whom, for which upstreams,
with which scopes and how deep a chain may go.

A delegation file is YAML with one key, `delegations`, a list of rules:

    delegations:
      - id: support-bot-for-staff
        agents: ["system:serviceaccount:agents:support-bot"]   # the actor (ids or globs)
        users: ["*"]            # whom it may act for; absent: only for itself
        audiences: [hr-tools]   # upstream names the token may be for
        scopes: [hr:read]       # the most it may carry
        max_chain: 1            # actors in the act chain, this one included
        ttl: 5m                 # at most sts.ttl
        when: 'subject.claims.email.endsWith("@example.com")'
"""

from __future__ import annotations

import glob
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from agentproxy.config.model import SCOPE_TOKEN, Delegation, StsSettings
from agentproxy.config.yamldoc import Document, Issue

STS_KEYS = ("issuer", "signing_key_file", "ttl", "delegation_files", "user_claim")
DELEGATION_KEYS = ("id", "agents", "users", "audiences", "scopes", "max_chain", "ttl", "when")
# The longest lifetime an issued token may have: these are call credentials, not sessions.
MAX_TTL = 3600.0
MAX_CHAIN = 8
_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def read_sts(
    value: Any, doc: Document, base: Path, issues: list[Issue], *, key_file: Path | None
) -> StsSettings | None:
    """The `sts:` section (None when absent), its delegation files read and checked.
    `key_file`: `signing_key_file` resolved and checked to exist by the caller."""
    if value is None:
        return None
    path = "$.sts"
    section = doc.mapping(value, path, STS_KEYS)
    issuer = doc.get(section, path, "issuer", str, required=True) or ""
    if issuer:
        parts = urlsplit(issuer)
        doc.check(
            parts.scheme in ("https", "http") and bool(parts.netloc) and not parts.query,
            f"{path}.issuer",
            "must be an http(s) URL without a query (RFC 8414 §2), e.g. https://agentproxy.example",
        )
    ttl = doc.duration(section, path, "ttl", 300.0)
    doc.check(
        0 < ttl <= MAX_TTL,
        f"{path}.ttl",
        f"must be more than 0 and at most {MAX_TTL:g}s: issued tokens are short-lived",
    )
    globs = doc.strings(section, path, "delegation_files", required=True)
    user_claim = doc.get(section, path, "user_claim", str, "sub") or "sub"
    delegations = read_delegations(globs, base, doc, issues, max_ttl=ttl)
    return StsSettings(
        issuer=issuer,
        signing_key_file=key_file,
        ttl=ttl,
        delegation_globs=globs,
        delegations=delegations,
        user_claim=user_claim,
    )


def read_delegations(
    patterns: tuple[str, ...],
    base: Path,
    config_doc: Document,
    issues: list[Issue],
    *,
    max_ttl: float,
) -> tuple[Delegation, ...]:
    """Every delegation rule of the files `patterns` (globs relative to the config) match."""
    files: list[Path] = []
    for i, pattern in enumerate(patterns):
        matched = sorted(Path(p).absolute() for p in glob.glob(str(base / pattern), recursive=True))
        matched = [p for p in matched if p.is_file()]
        if not matched:
            config_doc.error(f"$.sts.delegation_files[{i}]", f"{pattern!r} matches no file")
        files.extend(p for p in matched if p not in files)
    out: list[Delegation] = []
    seen: dict[str, Delegation] = {}
    for file in files:
        for rule in _read_file(file, issues, max_ttl):
            first = seen.get(rule.id)
            if first is not None:
                pos = rule.position
                issues.append(
                    Issue(
                        pos.file,
                        pos.line,
                        pos.column,
                        "$.delegations",
                        f"delegation id {rule.id!r} is already used at {first.position}",
                    )
                )
                continue
            seen[rule.id] = rule
            out.append(rule)
    return tuple(out)


def _read_file(file: Path, issues: list[Issue], max_ttl: float) -> list[Delegation]:
    doc = Document(str(file), issues)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        issues.append(Issue(str(file), 1, 1, "", f"cannot read delegation file: {exc}"))
        return []
    raw = doc.mapping(doc.parse(text), "$", ("delegations",))
    if raw and not raw.get("delegations"):
        doc.error("$.delegations", "a delegation file lists at least one delegation")
    return doc.each(raw.get("delegations"), "$.delegations", lambda v, p: _rule(doc, v, p, max_ttl))


def _rule(doc: Document, value: Any, path: str, max_ttl: float) -> Delegation | None:
    section = doc.mapping(value, path, DELEGATION_KEYS)
    if not section:
        return None
    rule_id = doc.get(section, path, "id", str, required=True) or ""
    doc.check(
        not rule_id or bool(_ID.fullmatch(rule_id)),
        f"{path}.id",
        "must be letters, digits, '.', '_', ':' or '-' (at most 128)",
    )
    agents = doc.strings(section, path, "agents", required=True)
    audiences = doc.strings(section, path, "audiences", required=True)
    doc.check(
        "audiences" not in section or bool(audiences),
        f"{path}.audiences",
        "name at least one upstream: an issued token is for one upstream",
    )
    users = doc.strings(section, path, "users") if "users" in section else None
    if users is not None and not users:
        doc.error(f"{path}.users", "list the users it may act for, or leave users out (itself)")
    scopes = doc.strings(section, path, "scopes")
    for scope in scopes:
        doc.check(
            bool(SCOPE_TOKEN.fullmatch(scope)),
            f"{path}.scopes",
            f"{scope!r} is not a scope (RFC 6749 §3.3: printable ASCII, no space, quote or \\)",
        )
    max_chain = doc.get(section, path, "max_chain", int, 1) or 1
    doc.check(
        1 <= max_chain <= MAX_CHAIN,
        f"{path}.max_chain",
        f"must be 1 (the agent alone) to {MAX_CHAIN}",
    )
    ttl = doc.duration(section, path, "ttl", max_ttl) if "ttl" in section else None
    doc.check(
        ttl is None or 0 < ttl <= max_ttl,
        f"{path}.ttl",
        f"must be more than 0 and at most sts.ttl ({max_ttl:g}s)",
    )
    when = doc.get(section, path, "when", str)
    if not rule_id or not agents or not audiences:
        return None
    return Delegation(
        id=rule_id,
        agents=agents,
        audiences=audiences,
        users=users,
        scopes=scopes,
        max_chain=max_chain,
        ttl=ttl,
        when=when,
        position=doc.position(path),
    )
