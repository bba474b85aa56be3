"""The deny list of agents and tokens, mirrored from the store into each proxy.

Asking the store on every call would put a network round trip on the hot path; instead each
proxy keeps a copy, refreshed as soon as the store pushes a revocation written on any replica
(milliseconds) and at least every `REFRESH_EVERY` seconds (the safety net for a push lost
with a connection), and checks calls against the copy. If the copy has
not been refreshed for `STALE_AFTER` seconds the store is treated as unavailable: a
revocation made meanwhile could be missed, so calls then follow `store.on_error`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from agentproxy.clock import SYSTEM, Clock
from agentproxy.core import Principal
from agentproxy.store import Revocation, Store, StoreError

log = logging.getLogger("agentproxy.revocations")

REFRESH_EVERY = 0.5
STALE_AFTER = 2.0


class RevocationList:
    def __init__(
        self,
        store: Store,
        *,
        shared: bool = True,
        on_error: Callable[[str], None] | None = None,
        clock: Clock = SYSTEM,
    ) -> None:
        """`shared`: the store is another process (Redis). An in-process store is written
        and read by this proxy alone, so its copy here cannot go stale."""
        self._store = store
        self._shared = shared
        self._agents: dict[str, Revocation] = {}
        self._tokens: dict[str, Revocation] = {}
        self._users: dict[str, Revocation] = {}
        self._fresh_at = -float("inf")  # monotonic time of the last successful refresh
        self._on_error = on_error
        self._clock = clock

    async def refresh(self) -> None:
        """Raises StoreError (the previous copy is kept)."""
        revocations = await self._store.revocations(self._clock.now())
        self._agents = {r.subject: r for r in revocations if r.kind == "agent"}
        self._tokens = {r.subject: r for r in revocations if r.kind == "token"}
        self._users = {r.subject: r for r in revocations if r.kind == "user"}
        self._fresh_at = self._clock.monotonic()

    def fresh(self) -> bool:
        return not self._shared or self._clock.monotonic() - self._fresh_at < STALE_AFTER

    def check(self, principal: Principal, now: float) -> Revocation | None:
        """The revocation that applies to this principal at `now`, if any: of the agent,
        of an earlier actor in its chain (a revoked agent's delegations die with it), of
        the user it acts for, or of the token."""
        for agent in (principal.agent, *principal.chain):
            revoked = self._agents.get(agent)
            if revoked is not None and revoked.active(now):
                return revoked
        if principal.acting_for is not None and self._users:
            revoked = self._users.get(principal.acting_for)
            if revoked is not None and revoked.active(now):
                return revoked
        if principal.token_id is not None:
            revoked = self._tokens.get(principal.token_id)
            if revoked is not None and revoked.active(now):
                return revoked
        return None

    def check_user(self, user: str, now: float) -> Revocation | None:
        """The revocation of `user` (every token acting for them) at `now`, if any."""
        revoked = self._users.get(user)
        return revoked if revoked is not None and revoked.active(now) else None

    async def run(self) -> None:
        """Refreshes until cancelled; store failures are counted and logged, never raised."""
        while True:
            try:
                await self.refresh()
            except StoreError as exc:
                if self._on_error is not None:
                    self._on_error("revocations")
                log.warning("cannot refresh revocations: %s", exc)
            # A revocation written on any replica is pushed (Redis pub/sub) and refreshes
            # the copy at once; the poll stays as the safety net for a lost notification.
            await self._store.wait_revocations(REFRESH_EVERY)
