"""The embedded default store: one process, nothing to install.

Every method runs without awaiting in between, so on one event loop each is atomic, which is
what makes `reserve` exact under concurrency (200 concurrent calls against a limit of 100 let
exactly 100 through). State lives as long as the process.

Approvals: a pending approval leaves `pending` only through `lifecycle.advance`; one past its
`expires` is expired (decided_at = expires) by the first operation that meets it, since the
store reads no clock. A decided approval is forgotten `2 * (expires - created)` after its
decision, as Redis's key TTLs do. Waiters share one `asyncio.Event` per approval, set by the
transition that takes it out of `pending`: no polling, no thread.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from collections.abc import Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field, replace

from agentproxy.approvals.lifecycle import Approval, Event, State, advance
from agentproxy.store.base import (
    PAGE_LIMIT,
    PAGE_SCAN,
    ApprovalGrant,
    ApprovalPage,
    Counter,
    LimitExceeded,
    Reservation,
    Revocation,
    TaskHistory,
    admits,
    decode_cursor,
    encode_cursor,
)

# Bounds, so that a caller minting keys (task ids, limit keys) cannot grow memory forever.
MAX_COUNTERS = 100_000
MAX_TASKS = 100_000
# At most this many approvals per `list_approvals` (the same bound as RedisStore).
LIST_LIMIT = 1000


@dataclass(slots=True)
class _Task:
    labels: set[str]
    calls: int
    spent: float
    expires: float


@dataclass(slots=True)
class _Watch:
    """The waiters on one pending approval: one event, set when it leaves `pending`."""

    event: asyncio.Event = field(default_factory=asyncio.Event)
    waiters: int = 0


class MemoryStore:
    def __init__(self) -> None:
        self._revocations: dict[tuple[str, str], Revocation] = {}
        self._revoked = asyncio.Event()  # a revocation was written since the last wait
        self._counters: dict[tuple[str, float], tuple[float, float]] = {}  # → (used, expires)
        self._tasks: dict[str, _Task] = {}
        self._grants: dict[str, ApprovalGrant] = {}
        self._approvals: dict[str, Approval] = {}
        self._by_fingerprint: dict[str, str] = {}  # → the id of its latest approval
        self._pending: dict[str, set[str]] = {}  # agent → ids of its pending approvals
        self._pending_by: dict[tuple[str, str], set[str]] = {}  # ("user"|"rule", name) → ids
        self._pending_total = 0
        self._deadlines: list[tuple[float, str]] = []  # heap of (expires, id), pending ones
        self._reclaims: list[tuple[float, str]] = []  # heap of (forget at, id), decided ones
        self._watches: dict[str, _Watch] = {}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def revoke(self, revocation: Revocation) -> None:
        self._revocations[(revocation.kind, revocation.subject)] = revocation
        self._revoked.set()

    async def wait_revocations(self, timeout: float) -> None:  # noqa: ASYNC109
        with suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._revoked.wait()
        self._revoked.clear()

    async def revocations(self, now: float) -> list[Revocation]:
        expired = [k for k, r in self._revocations.items() if not r.active(now)]
        for key in expired:
            del self._revocations[key]
        return list(self._revocations.values())

    async def reserve(
        self, reservations: Iterable[Reservation], now: float
    ) -> LimitExceeded | None:
        wanted = list(reservations)
        self._sweep(now)
        for r in wanted:
            start = r.window_at(now)
            used = self._counters.get((r.key, start), (0.0, 0.0))[0]
            if used + r.amount > r.limit:
                return LimitExceeded(r.name, used, r.limit, start + r.window - now)
        for r in wanted:
            start = r.window_at(now)
            used = self._counters.get((r.key, start), (0.0, 0.0))[0]
            self._counters[(r.key, start)] = (used + r.amount, start + r.window)
        return None

    async def release(self, reservations: Iterable[Reservation], now: float) -> None:
        for r in reservations:
            slot = (r.key, r.window_at(now))
            if slot in self._counters:
                used, expires = self._counters[slot]
                self._counters[slot] = (max(0.0, used - r.amount), expires)

    async def usage(self, reservations: Sequence[Reservation], now: float) -> list[float]:
        self._sweep(now)
        return [self._counters.get((r.key, r.window_at(now)), (0.0, 0.0))[0] for r in reservations]

    async def counters(self, prefixes: Iterable[str], now: float) -> list[Counter]:
        self._sweep(now)
        wanted = tuple(prefixes)
        return [
            Counter(key, start, used)
            for (key, start), (used, expires) in sorted(self._counters.items())
            if key.startswith(wanted) and expires > now
        ]

    async def put_grant(self, grant: ApprovalGrant, now: float) -> None:
        self._put_grant(grant, now)

    def _put_grant(self, grant: ApprovalGrant, now: float) -> None:
        if len(self._grants) >= MAX_COUNTERS:
            self._grants = {k: g for k, g in self._grants.items() if g.expires > now}
        self._grants[grant.fingerprint] = grant

    def _spent(self, approval: Approval, now: float) -> bool:
        """An approved approval whose grant is used up or lapsed: the next identical call
        asks anew (a denial or an expiry, by contrast, answers every retry in its window)."""
        if approval.state is not State.APPROVED:
            return False
        grant = self._grants.get(approval.fingerprint)
        return grant is None or grant.expires <= now

    async def use_grant(self, fingerprint: str, now: float) -> ApprovalGrant | None:
        grant = self._grants.get(fingerprint)
        if grant is None or grant.expires <= now:
            self._grants.pop(fingerprint, None)
            return None
        if grant.uses is not None:
            if grant.uses <= 1:
                del self._grants[fingerprint]
            else:
                self._grants[fingerprint] = replace(grant, uses=grant.uses - 1)
        return grant

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
        """Finds the approval for the fingerprint or creates `approval`; see `Store`.

        Raises ValueError if `approval` is not a new pending approval with expires > created.
        """
        _check_new(approval)
        self._expire_overdue(now)
        self._reclaim(now)
        found_id = self._by_fingerprint.get(approval.fingerprint)
        found = None if found_id is None else self._approvals.get(found_id)
        if found is not None and (
            found.state is State.PENDING or (_in_window(found, now) and not self._spent(found, now))
        ):
            return found, False
        agent_pending = self._pending.get(approval.agent, set())
        scopes = _scopes(approval)
        holding = {scope: len(self._pending_by.get(scope, ())) for scope in scopes}
        holders = len(self._pending) + (0 if agent_pending else 1)
        if not admits(
            total=self._pending_total,
            mine=len(agent_pending),
            holders=holders,
            user=holding.get(("user", approval.user or "")),
            rule=holding[("rule", approval.rule)],
            max_pending=max_pending,
            max_pending_per_agent=max_pending_per_agent,
            max_pending_per_user=max_pending_per_user,
            max_pending_per_rule=max_pending_per_rule,
        ):
            return None
        self._approvals[approval.id] = approval
        self._by_fingerprint[approval.fingerprint] = approval.id
        self._pending[approval.agent] = agent_pending
        agent_pending.add(approval.id)
        for scope in scopes:
            self._pending_by.setdefault(scope, set()).add(approval.id)
        self._pending_total += 1
        heapq.heappush(self._deadlines, (approval.expires, approval.id))
        return approval, True

    async def get_approval(self, approval_id: str, now: float) -> Approval | None:
        self._reclaim(now)
        return self._meet(approval_id, now)

    async def list_approvals(self, state: str | None, now: float) -> list[Approval]:
        """At most LIST_LIMIT approvals, oldest first. When more are pending, the pending list
        holds those that expire soonest (as RedisStore's does). Raises ValueError for an
        unknown state."""
        wanted = None if state is None else State(state)
        self._expire_overdue(now)
        self._reclaim(now)
        if wanted is State.PENDING:
            pending = (a for a in self._approvals.values() if a.state is State.PENDING)
            soonest = sorted(pending, key=lambda a: (a.expires, a.id))[:LIST_LIMIT]
            return sorted(soonest, key=_age)
        every = sorted(self._approvals.values(), key=_age)
        return [a for a in every if wanted is None or a.state is wanted][:LIST_LIMIT]

    async def page_approvals(
        self, state: str | None, now: float, *, cursor: str | None = None, limit: int = 100
    ) -> ApprovalPage:
        """See `Store`: the order and bounds RedisStore's pages have."""
        wanted = None if state is None else State(state)
        if not 1 <= limit <= PAGE_LIMIT:
            raise ValueError(f"limit must be between 1 and {PAGE_LIMIT}")
        after = None if cursor is None else decode_cursor(cursor)
        self._expire_overdue(now)
        self._reclaim(now)
        if wanted is State.PENDING:
            keyed = [
                (a.expires, a.id, a) for a in self._approvals.values() if a.state is State.PENDING
            ]
        else:
            keyed = [(a.created, a.id, a) for a in self._approvals.values()]
        keyed.sort(key=lambda entry: (entry[0], entry[1]))
        if after is not None:
            keyed = [e for e in keyed if (e[0], e[1]) > (after[0], after[2])]
        out: list[Approval] = []
        last: tuple[float, str] | None = None
        examined = 0
        for score, approval_id, approval in keyed:
            if len(out) >= limit or examined >= PAGE_SCAN:
                break
            examined += 1
            last = (score, approval_id)
            if wanted is None or approval.state is wanted:
                out.append(approval)
        more = examined < len(keyed)
        next_cursor = encode_cursor(repr(last[0]), last[1]) if more and last else None
        return ApprovalPage(out, next_cursor)

    async def count_pending(self, now: float) -> int:
        return sum(
            1 for a in self._approvals.values() if a.state is State.PENDING and a.expires > now
        )

    async def decide_approval(
        self, approval_id: str, event: Event, by: str, reason: str, now: float
    ) -> Approval:
        """Applies `event` (an overdue pending approval is expired first); see `Store`.

        Raises KeyError (unknown id) or IllegalTransition.
        """
        current = self._meet(approval_id, now)
        if current is None:
            raise KeyError(approval_id)
        if event is Event.APPROVE and current.state is State.PENDING and current.quorum > 1:
            current = current.add_vote(by, reason, now)
            if len(current.votes) < current.quorum:
                self._approvals[approval_id] = current
                return current
        decided = replace(current, state=advance(current.state, event))
        if current.state is State.PENDING and decided.state is not State.PENDING:
            decided = replace(decided, decided_by=by, decided_reason=reason, decided_at=now)
            self._leave_pending(decided)
        else:
            self._approvals[approval_id] = decided
        if decided.state is State.APPROVED:
            self._put_grant(_grant(decided, by, now), now)
        return decided

    # The protocol's signature: the store bounds the wait itself, as the pipeline's hold.
    async def wait_approval(self, approval_id: str, timeout: float) -> Approval | None:  # noqa: ASYNC109
        """Returns once the approval leaves `pending`, or after `timeout` seconds, as it then
        is. With no `now` it expires nothing: an approval past `expires` that no operation has
        met yet is returned pending (`get_approval` expires it)."""
        approval = self._approvals.get(approval_id)
        if approval is None or approval.state is not State.PENDING:
            return approval
        watch = self._watches.setdefault(approval_id, _Watch())
        watch.waiters += 1
        try:
            async with asyncio.timeout(timeout):
                await watch.event.wait()
        except TimeoutError:
            pass
        finally:
            watch.waiters -= 1
            if watch.waiters == 0 and self._watches.get(approval_id) is watch:
                del self._watches[approval_id]
        return self._approvals.get(approval_id)

    def _meet(self, approval_id: str, now: float) -> Approval | None:
        """The approval, expired first if it is pending and overdue at `now`."""
        approval = self._approvals.get(approval_id)
        if approval is not None and approval.state is State.PENDING and approval.expires <= now:
            approval = _expired(approval)
            self._leave_pending(approval)
        return approval

    def _expire_overdue(self, now: float) -> None:
        while self._deadlines and self._deadlines[0][0] <= now:
            _, approval_id = heapq.heappop(self._deadlines)
            self._meet(approval_id, now)

    def _leave_pending(self, decided: Approval) -> None:
        """Stores `decided`, which was pending, and wakes its waiters."""
        self._approvals[decided.id] = decided
        agent_pending = self._pending.get(decided.agent)
        if agent_pending is not None and decided.id in agent_pending:
            agent_pending.discard(decided.id)
            self._pending_total -= 1
            if not agent_pending:
                del self._pending[decided.agent]
        for scope in _scopes(decided):
            ids = self._pending_by.get(scope)
            if ids is not None:
                ids.discard(decided.id)
                if not ids:
                    del self._pending_by[scope]
        heapq.heappush(self._reclaims, (_forget_at(decided), decided.id))
        watch = self._watches.pop(decided.id, None)
        if watch is not None:
            watch.event.set()

    def _reclaim(self, now: float) -> None:
        while self._reclaims and self._reclaims[0][0] <= now:
            _, approval_id = heapq.heappop(self._reclaims)
            approval = self._approvals.get(approval_id)
            if approval is None or approval.state is State.PENDING:
                continue
            del self._approvals[approval_id]
            if self._by_fingerprint.get(approval.fingerprint) == approval_id:
                del self._by_fingerprint[approval.fingerprint]

    async def task_history(self, task: str, now: float) -> TaskHistory:
        entry = self._tasks.get(task)
        if entry is None or entry.expires <= now:
            return TaskHistory()
        return TaskHistory(frozenset(entry.labels), entry.calls, entry.spent)

    async def record_task(
        self,
        task: str,
        labels: Iterable[str],
        spent: float,
        ttl: float,
        now: float,
        calls: int = 1,
    ) -> None:
        entry = self._tasks.get(task)
        if entry is None or entry.expires <= now:
            if len(self._tasks) >= MAX_TASKS:
                self._tasks = {k: v for k, v in self._tasks.items() if v.expires > now}
            entry = _Task(set(), 0, 0.0, 0.0)
            self._tasks[task] = entry
        entry.labels.update(labels)
        entry.calls += calls
        entry.spent += spent
        entry.expires = now + ttl

    def _sweep(self, now: float) -> None:
        if len(self._counters) >= MAX_COUNTERS:
            self._counters = {k: v for k, v in self._counters.items() if v[1] > now}


def _check_new(approval: Approval) -> None:
    if approval.state is not State.PENDING or approval.decided_at is not None:
        raise ValueError(f"approval {approval.id} is not a new pending approval")
    if not (math.isfinite(approval.created) and approval.created < approval.expires < math.inf):
        raise ValueError(f"approval {approval.id} must expire after it is created")


def _age(approval: Approval) -> tuple[float, str]:
    return approval.created, approval.id


def _decided_at(decided: Approval) -> float:
    # Every decided approval this store holds has decided_at; expires is the typed fallback.
    return decided.expires if decided.decided_at is None else decided.decided_at


def _in_window(decided: Approval, now: float) -> bool:
    """Whether an identical retry still sees this decision (see `Store.open_approval`)."""
    return now < _decided_at(decided) + (decided.expires - decided.created)


def _forget_at(decided: Approval) -> float:
    return _decided_at(decided) + 2 * (decided.expires - decided.created)


def _expired(pending: Approval) -> Approval:
    """The approval expired when its time ran out, not when it was noticed."""
    return replace(pending, state=advance(pending.state, Event.EXPIRE), decided_at=pending.expires)


def _grant(approved: Approval, approver: str, now: float) -> ApprovalGrant:
    """One call until the approval would have expired, or any number for `grant_ttl`."""
    if approved.grant_ttl is None:
        return ApprovalGrant(approved.fingerprint, approved.id, approved.expires, 1, approver)
    return ApprovalGrant(
        approved.fingerprint, approved.id, now + approved.grant_ttl, None, approver
    )


def _scopes(approval: Approval) -> list[tuple[str, str]]:
    """The per-user (when the agent acts for one) and per-rule counters it counts in."""
    scopes = [("rule", approval.rule)]
    if approval.user is not None:
        scopes.append(("user", approval.user))
    return scopes
