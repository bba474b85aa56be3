"""The approval lifecycle as a transition table (h11 keeps its state machine the same way).

    pending --approve--> approved
    pending --deny-----> denied
    pending --expire---> expired

Every store applies this same table; an illegal transition raises.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from agentproxy.core import jsonable


class State(enum.Enum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    EXPIRED = "expired"


class Event(enum.Enum):
    APPROVE = "approve"
    DENY = "deny"
    EXPIRE = "expire"


TRANSITIONS: Mapping[tuple[State, Event], State] = {
    (State.PENDING, Event.APPROVE): State.APPROVED,
    (State.PENDING, Event.DENY): State.DENIED,
    (State.PENDING, Event.EXPIRE): State.EXPIRED,
}


class IllegalTransition(ValueError):
    """An approval was asked to move where the table has no arrow (e.g. approve a denial)."""


def advance(state: State, event: Event) -> State:
    """Raises IllegalTransition when `event` is not allowed in `state`."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(f"cannot {event.value} an approval that is {state.value}") from None


@dataclass(frozen=True, slots=True)
class Approval:
    """One request for approval. `fingerprint` binds it to the exact principal, action and
    arguments: approving a 50 € transfer never releases a 5,000 € one."""

    id: str
    fingerprint: str
    state: State
    rule: str
    reason: str
    agent: str
    user: str | None
    chain: tuple[str, ...]
    action: str
    summary: Mapping[str, Any]
    approvers: tuple[str, ...]
    created: float
    expires: float
    grant_ttl: float | None = None  # None: the grant lets exactly one call through
    decided_by: str | None = None
    decided_reason: str | None = None
    decided_at: float | None = None
    upstream: str = ""  # the upstream the call goes to
    # What the approver must see to know what is released (all bound by the fingerprint): the
    # task, the query, and the arguments whole (None when larger than MAX_SHOWN_ARGUMENTS: then
    # their size and SHA-256 say exactly which, never a silent cut).
    task: str | None = None
    query: Mapping[str, Any] = field(default_factory=dict)
    arguments: Any = None
    arguments_bytes: int = 0
    arguments_sha256: str = ""
    # N of M: how many distinct approvers must approve, and the approvals given so far (the
    # last one releases the call; `decided_by` names it).
    quorum: int = 1
    votes: tuple[Vote, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "fingerprint": self.fingerprint,
            "state": self.state.value,
            "rule": self.rule,
            "reason": self.reason,
            "agent": self.agent,
            "user": self.user,
            "chain": list(self.chain),
            "action": self.action,
            "summary": dict(self.summary),
            "approvers": list(self.approvers),
            "created": self.created,
            "expires": self.expires,
            "grant_ttl": self.grant_ttl,
            "decided_by": self.decided_by,
            "decided_reason": self.decided_reason,
            "decided_at": self.decided_at,
            "upstream": self.upstream,
            "task": self.task,
            "query": dict(self.query),
            "arguments": self.arguments,
            "arguments_bytes": self.arguments_bytes,
            "arguments_sha256": self.arguments_sha256,
            "quorum": self.quorum,
            "votes": [vote.to_json() for vote in self.votes],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Approval:
        """Raises KeyError, ValueError or TypeError for a record that is not an approval."""
        return cls(
            id=str(data["id"]),
            fingerprint=str(data["fingerprint"]),
            state=State(data["state"]),
            rule=str(data["rule"]),
            reason=str(data["reason"]),
            agent=str(data["agent"]),
            user=None if data["user"] is None else str(data["user"]),
            chain=tuple(str(a) for a in data["chain"]),
            action=str(data["action"]),
            summary=dict(data["summary"]),
            approvers=tuple(str(a) for a in data["approvers"]),
            created=float(data["created"]),
            expires=float(data["expires"]),
            grant_ttl=None if data.get("grant_ttl") is None else float(data["grant_ttl"]),
            decided_by=data.get("decided_by"),
            decided_reason=data.get("decided_reason"),
            decided_at=None if data.get("decided_at") is None else float(data["decided_at"]),
            upstream=str(data.get("upstream", "")),
            task=None if data.get("task") is None else str(data["task"]),
            query=dict(data.get("query") or {}),
            arguments=data.get("arguments"),
            arguments_bytes=int(data.get("arguments_bytes") or 0),
            arguments_sha256=str(data.get("arguments_sha256") or ""),
            quorum=int(data.get("quorum") or 1),
            votes=tuple(Vote.from_json(v) for v in data.get("votes") or ()),
        )

    def add_vote(self, by: str, reason: str, now: float) -> Approval:
        """This pending approval with one more approver's vote. Raises IllegalTransition
        when `by` already approved it (no approver counts twice)."""
        if any(vote.by == by for vote in self.votes):
            raise IllegalTransition(
                f"{by} already approved {self.id}; it needs "
                f"{self.quorum - len(self.votes)} more approver(s)"
            )
        return replace(self, votes=(*self.votes, Vote(by, reason, now)))


@dataclass(frozen=True, slots=True)
class Vote:
    """One approver's approval of an approval that needs several."""

    by: str
    reason: str
    at: float

    def to_json(self) -> dict[str, Any]:
        return {"by": self.by, "reason": self.reason, "at": self.at}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Vote:
        return cls(str(data["by"]), str(data.get("reason") or ""), float(data["at"]))


def fingerprint(
    agent: str,
    user: str | None,
    chain: tuple[str, ...],
    action: str,
    args: Any,
    query: Any,
    upstream: str = "",
) -> str:
    """SHA-256 over the canonical JSON of who asks for exactly what, of which upstream (an
    approval of one server's `export` never releases another server's). Canonical: keys
    sorted, and a number is one number however it was written (`200`, `2e2`, `200.0`), so an
    approval binds what the call does, not its spelling."""
    canonical = orjson.dumps(
        {
            "agent": agent,
            "user": user,
            "chain": list(chain),
            "action": action,
            "upstream": upstream,
            "args": canonical_numbers(args),
            "query": query,
        },
        option=orjson.OPT_SORT_KEYS,
        default=str,
    )
    return hashlib.sha256(canonical).hexdigest()


def canonical_numbers(value: Any) -> Any:
    """`value` with every float that is a whole number within 64 bits written as an integer
    (JSON has one number type: 2e2, 200.0 and 200 are the same to an upstream's parser)."""
    if isinstance(value, float):
        if value.is_integer() and -(2.0**63) <= value < 2.0**63:
            return int(value)
        return value
    if isinstance(value, dict):
        return {key: canonical_numbers(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [canonical_numbers(item) for item in value]
    return value


# Arguments up to this size (canonical JSON) are kept whole on the approval; larger ones are
# named by size and digest (an approval is stored, listed and sent to webhooks).
MAX_SHOWN_ARGUMENTS = 256 * 1024


def shown_arguments(args: Any) -> tuple[Any, int, str]:
    """(the arguments whole, or None past MAX_SHOWN_ARGUMENTS; their canonical JSON's size;
    its SHA-256): what the approver is shown of what the fingerprint binds."""
    shown = jsonable(args)
    canonical = orjson.dumps(shown, option=orjson.OPT_SORT_KEYS, default=str)
    digest = hashlib.sha256(canonical).hexdigest()
    return (shown if len(canonical) <= MAX_SHOWN_ARGUMENTS else None), len(canonical), digest


def summarize(args: Any, *, max_items: int = 20, max_text: int = 200) -> dict[str, Any]:
    """A safe view of the arguments for approvers: top-level names with short scalar values;
    nested values and long strings are described, not copied."""
    if not isinstance(args, Mapping):
        return {}
    out: dict[str, Any] = {}
    for i, (key, value) in enumerate(args.items()):
        if i >= max_items:
            out["…"] = f"{len(args) - max_items} more"
            break
        if isinstance(value, bool | int | float) or value is None:
            out[str(key)] = value
        elif isinstance(value, str):
            out[str(key)] = value if len(value) <= max_text else value[:max_text] + "…"
        elif isinstance(value, Mapping):
            out[str(key)] = f"{{object with {len(value)} keys}}"
        elif isinstance(value, list | tuple):
            out[str(key)] = f"[list of {len(value)}]"
        else:
            out[str(key)] = str(type(value).__name__)
    return out
