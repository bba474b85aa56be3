"""The embedded default store: one process, nothing to install.

Every method runs without awaiting in between, so on one event loop each is atomic, which is
what makes `reserve` exact under concurrency (200 concurrent calls against a limit of 100 let
exactly 100 through). State lives as long as the process.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from agentproxy.store.base import (
    ApprovalGrant,
    LimitExceeded,
    Reservation,
    Revocation,
    TaskHistory,
    window_start,
)

# Bounds, so that a caller minting keys (task ids, limit keys) cannot grow memory forever.
MAX_COUNTERS = 100_000
MAX_TASKS = 100_000


@dataclass(slots=True)
class _Task:
    labels: set[str]
    calls: int
    spent: float
    expires: float


class MemoryStore:
    def __init__(self) -> None:
        self._revocations: dict[tuple[str, str], Revocation] = {}
        self._counters: dict[tuple[str, float], tuple[float, float]] = {}  # → (used, expires)
        self._tasks: dict[str, _Task] = {}
        self._grants: dict[str, ApprovalGrant] = {}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def revoke(self, revocation: Revocation) -> None:
        self._revocations[(revocation.kind, revocation.subject)] = revocation

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
            start = window_start(now, r.window)
            used = self._counters.get((r.key, start), (0.0, 0.0))[0]
            if used + r.amount > r.limit:
                return LimitExceeded(r.name, used, r.limit, start + r.window - now)
        for r in wanted:
            start = window_start(now, r.window)
            used = self._counters.get((r.key, start), (0.0, 0.0))[0]
            self._counters[(r.key, start)] = (used + r.amount, start + r.window)
        return None

    async def release(self, reservations: Iterable[Reservation], now: float) -> None:
        for r in reservations:
            slot = (r.key, window_start(now, r.window))
            if slot in self._counters:
                used, expires = self._counters[slot]
                self._counters[slot] = (max(0.0, used - r.amount), expires)

    async def put_grant(self, grant: ApprovalGrant, now: float) -> None:
        if len(self._grants) >= MAX_COUNTERS:
            self._grants = {k: g for k, g in self._grants.items() if g.expires > now}
        self._grants[grant.fingerprint] = grant

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

    async def task_history(self, task: str, now: float) -> TaskHistory:
        entry = self._tasks.get(task)
        if entry is None or entry.expires <= now:
            return TaskHistory()
        return TaskHistory(frozenset(entry.labels), entry.calls, entry.spent)

    async def record_task(
        self, task: str, labels: Iterable[str], spent: float, ttl: float, now: float
    ) -> None:
        entry = self._tasks.get(task)
        if entry is None or entry.expires <= now:
            if len(self._tasks) >= MAX_TASKS:
                self._tasks = {k: v for k, v in self._tasks.items() if v.expires > now}
            entry = _Task(set(), 0, 0.0, 0.0)
            self._tasks[task] = entry
        entry.labels.update(labels)
        entry.calls += 1
        entry.spent += spent
        entry.expires = now + ttl

    def _sweep(self, now: float) -> None:
        if len(self._counters) >= MAX_COUNTERS:
            self._counters = {k: v for k, v in self._counters.items() if v[1] > now}
