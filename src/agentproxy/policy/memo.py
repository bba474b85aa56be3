"""Memoized decisions: a bounded LRU per compiled policy.

Only decisions whose rules read nothing per-call (no `args`, `now`, `task`, `request`) are
kept, keyed by everything those rules can read: the exact credential (which fixes the whole
principal: agent, user, chain, roles, claims), the action name (which holds the path), the
upstream and the query. A reload compiles a new policy and so starts a new memo: no
decision outlives the policy that made it (the stale-cache trap of ORY Oathkeeper
CVE-2021-32701 and cerbos#2602).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

from agentproxy.core import Action, Decision

MemoKey = tuple[Hashable, ...]


def memo_key(credential: str, action: Action) -> MemoKey:
    query = tuple(sorted(action.query.items())) if action.query else ()
    return (credential, action.name, action.upstream, query)


class DecisionMemo:
    def __init__(self, size: int = 10_000) -> None:
        self._size = size
        self._entries: OrderedDict[MemoKey, Decision] = OrderedDict()

    def get(self, key: MemoKey) -> Decision | None:
        decision = self._entries.get(key)
        if decision is not None:
            self._entries.move_to_end(key)
        return decision

    def put(self, key: MemoKey, decision: Decision) -> None:
        if not decision.memoizable:
            raise ValueError("this decision read per-call facts and cannot be memoized")
        self._entries[key] = decision
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)
