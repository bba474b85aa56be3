"""The decision store: the state decisions need, behind one protocol.

`MemoryStore` (the embedded default) and `RedisStore` (shared by a fleet of sidecars) pass the
same contract suite (`tests/store/test_contract.py`). Every operation is bounded in time by
the caller; a store that cannot answer raises `StoreError`, which the pipeline turns into a
503 or, with `store.on_error: allow_cached`, a memoized allow.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from agentproxy.approvals.lifecycle import Approval, Event
from agentproxy.core import Reservation

__all__ = [
    "ApprovalGrant",
    "ApprovalPage",
    "Counter",
    "LimitExceeded",
    "Reservation",
    "Revocation",
    "RevocationKind",
    "Store",
    "StoreError",
    "TaskHistory",
    "admits",
    "window_start",
]

RevocationKind = Literal["agent", "token", "user"]

# The most approvals one page of `page_approvals` holds, and how many records one page may
# examine to find them (a page of decided ones among many others stays bounded in time).
PAGE_LIMIT = 1000
PAGE_SCAN = 2000


def admits(
    *,
    total: int,
    mine: int,
    holders: int,
    user: int | None,
    rule: int,
    max_pending: int,
    max_pending_per_agent: int,
    max_pending_per_user: int = 0,
    max_pending_per_rule: int = 0,
) -> bool:
    """Whether one more pending approval may be opened (RedisStore's script applies the same).

    `total` pending in all, `mine` of this agent's, `holders` agents holding any (this one
    included), `user` of the user it acts for (None: it acts for no one), `rule` of its rule;
    a `max_pending_per_…` of 0 is no cap. The total is fair: past `max_pending`, only an agent
    holding less than its share (`max_pending // holders`, at least 1) may open one, up to
    twice `max_pending` in all, so a set of agents at their own caps can fill the total but
    never lock out an agent that holds little.
    """
    if mine >= max_pending_per_agent:
        return False
    if user is not None and max_pending_per_user and user >= max_pending_per_user:
        return False
    if max_pending_per_rule and rule >= max_pending_per_rule:
        return False
    if total < max_pending:
        return True
    return total < 2 * max_pending and mine < max(1, max_pending // max(1, holders))


class StoreError(Exception):
    """The store could not answer (unreachable, timed out, or refused the operation)."""


@dataclass(frozen=True, slots=True)
class ApprovalPage:
    """`next_cursor` is None when nothing follows the page."""

    approvals: list[Approval]
    next_cursor: str | None


def encode_cursor(score: str, approval_id: str) -> str:
    """An opaque page cursor: where the last page stopped (its order key and id)."""
    return base64.urlsafe_b64encode(f"{score} {approval_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str, str]:
    """(score, its text, id) of a cursor. Raises ValueError for one no store gave."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        score_text, approval_id = text.split(" ", 1)
        score = float(score_text)
    except (ValueError, UnicodeDecodeError, binascii.Error):
        raise ValueError("cursor is not one this API gave (pass next_cursor back as is)") from None
    if not approval_id or not score_text.isascii() or not math.isfinite(score):
        raise ValueError("cursor is not one this API gave (pass next_cursor back as is)")
    return score, score_text, approval_id


@dataclass(frozen=True, slots=True)
class Revocation:
    """An agent, a user (every token acting for them) or a single token (`jti`) on the
    deny list until `until` (epoch seconds;
    `math.inf` means for good)."""

    kind: RevocationKind
    subject: str
    until: float = math.inf
    reason: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("agent", "token", "user"):
            raise ValueError(f"revocation kind must be agent, token or user, not {self.kind!r}")
        if not self.subject or len(self.subject) > 512:
            raise ValueError("a revocation needs a subject of at most 512 characters")

    def active(self, now: float) -> bool:
        return now < self.until


@dataclass(frozen=True, slots=True)
class LimitExceeded:
    """Which reservation did not fit, and when its window ends."""

    name: str
    used: float
    limit: float
    retry_after: float


@dataclass(frozen=True, slots=True)
class Counter:
    """One limit counter as it stands: its key (`<limit name>:<key>`), its window's start,
    and what is used (settled spend and the reservations of calls still in flight)."""

    key: str
    start: float
    used: float


@dataclass(frozen=True, slots=True)
class TaskHistory:
    """What a task has done so far: the facts `task.*` exposes to CEL."""

    labels: frozenset[str] = frozenset()
    calls: int = 0
    spent: float = 0.0


@dataclass(frozen=True, slots=True)
class ApprovalGrant:
    """Permission, given by an approver, for calls whose fingerprint (a hash of principal,
    action and arguments) matches: `uses` calls (None: any number) until `expires`."""

    fingerprint: str
    approval_id: str
    expires: float
    uses: int | None = 1
    approver: str = ""

    def __post_init__(self) -> None:
        if not self.fingerprint or not self.approval_id:
            raise ValueError("a grant needs a fingerprint and an approval id")
        if self.uses is not None and self.uses < 1:
            raise ValueError("a grant allows at least one call")


def window_start(now: float, window: float) -> float:
    return math.floor(now / window) * window


class Store(Protocol):
    """What decisions may read and write. Implementations apply the same semantics."""

    async def start(self) -> None:
        """Connects (Redis) and checks the store is usable. Raises StoreError."""

    async def close(self) -> None: ...

    async def revoke(self, revocation: Revocation) -> None:
        """Adds or replaces the revocation of `(kind, subject)`. Raises StoreError."""

    async def revocations(self, now: float) -> list[Revocation]:
        """Every revocation still active at `now`. Raises StoreError."""

    # The protocol's signature: the store bounds the wait itself.
    async def wait_revocations(self, timeout: float) -> None:  # noqa: ASYNC109
        """Returns once a revocation was written (on any replica, for a shared store) since
        the last return, or after `timeout` seconds: a mirror refreshes at once on a push
        and still every `timeout` without one. Raises nothing."""

    async def reserve(
        self, reservations: Iterable[Reservation], now: float
    ) -> LimitExceeded | None:
        """Atomically takes every reservation, or none of them.

        Returns the first that does not fit (nothing is taken then), or None when all were
        taken. Raises StoreError.
        """

    async def release(self, reservations: Iterable[Reservation], now: float) -> None:
        """Gives back reservations taken in the window that contains `now` (a call that was
        refused after its reservation, or settled for less). Raises StoreError."""

    async def usage(self, reservations: Sequence[Reservation], now: float) -> list[float]:
        """What each reservation's counter holds now, in its window (0 for none): what a
        caller is told remains. Raises StoreError."""

    async def counters(self, prefixes: Iterable[str], now: float) -> list[Counter]:
        """Every live counter whose key starts with one of `prefixes` (limit names followed by
        ":"), for budget listings; a scan, never on a call's path. Raises StoreError."""

    async def put_grant(self, grant: ApprovalGrant, now: float) -> None:
        """Stores (or replaces) the grant for its fingerprint. Raises StoreError."""

    async def use_grant(self, fingerprint: str, now: float) -> ApprovalGrant | None:
        """Atomically uses the grant for `fingerprint` once: the grant as it was, or None if
        there is none, it expired, or its uses are spent (so of N concurrent callers of a
        one-use grant exactly one gets it). Raises StoreError."""

    async def open_approval(
        self,
        approval: Approval,
        now: float,
        *,
        max_pending: int,
        max_pending_per_agent: int,
        max_pending_per_user: int = 0,
        max_pending_per_rule: int = 0,
    ) -> tuple[Approval, bool] | None:
        """Finds the approval for `approval.fingerprint` or creates this one, atomically.

        An approval is found while it is pending, and after it was decided (approved, denied
        or expired) until `decided_at + (expires - created)`, so an identical retry sees the
        decision. Returns (approval, created), or None when the caps forbid creating it
        (`admits`; nothing is created then). A pending approval past `expires` is expired
        first. Raises StoreError.
        """

    async def get_approval(self, approval_id: str, now: float) -> Approval | None:
        """The approval (expired first if pending past `expires`), or None. Raises StoreError."""

    async def list_approvals(self, state: str | None, now: float) -> list[Approval]:
        """Approvals in `state` (all when None), oldest first, expiring overdue pending ones
        first. Raises StoreError."""

    async def page_approvals(
        self, state: str | None, now: float, *, cursor: str | None = None, limit: int = 100
    ) -> ApprovalPage:
        """One page of approvals in `state` (all when None): pending ones soonest to expire
        first, others oldest first, after `cursor` (a previous page's `next_cursor`), at most
        `limit` (1..PAGE_LIMIT) of them, examining at most PAGE_SCAN records. Raises
        ValueError for an unknown state or a cursor no store gave, StoreError."""

    async def count_pending(self, now: float) -> int:
        """How many approvals are pending and not yet overdue at `now`, however many (lists
        stop at a limit). Raises StoreError."""

    async def decide_approval(
        self, approval_id: str, event: Event, by: str, reason: str, now: float
    ) -> Approval:
        """Applies `event` (lifecycle.advance) atomically and returns the new approval. On
        approve, also stores its `ApprovalGrant` (uses 1 when `grant_ttl` is None, else
        unlimited until now + grant_ttl) in the same atomic step. Wakes every waiter on any
        replica. Raises KeyError (unknown id), IllegalTransition, StoreError."""

    async def wait_approval(self, approval_id: str, timeout: float) -> Approval | None:  # noqa: ASYNC109 - the bound is the contract
        """Waits up to `timeout` seconds for the approval to leave `pending` (on any replica),
        and returns it as it then is (None if unknown). Costs no thread; many waiters share
        one subscription. Raises StoreError."""

    async def task_history(self, task: str, now: float) -> TaskHistory:
        """The history kept under `task` (a `core.task_history_key`: per agent and task) at
        `now` (empty if unknown or expired). Raises StoreError."""

    async def record_task(
        self,
        task: str,
        labels: Iterable[str],
        spent: float,
        ttl: float,
        now: float,
        calls: int = 1,
    ) -> None:
        """Counts `calls` calls of `task` (the messages of a batch count one each), adds
        their labels and spend; the history expires `ttl` seconds after its last call.
        Raises StoreError."""
