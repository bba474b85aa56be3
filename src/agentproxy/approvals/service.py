"""The approval service: opening, holding, deciding and expiring approvals, and telling
everyone who listens.

The gate stage opens approvals and holds calls on them; the admin APIs (HTTP and gRPC) list
and decide them; a background task reports the ones this replica opened when they expire.
Every event (`requested`, `approved`, `denied`, `expired`) goes to each listener wired in
`proxy/assemble.py` (metrics, decision log, audit trail, webhooks, Watch streams), so what one
replica saw happen is reported once, by it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from agentproxy.approvals.authorize import check_approver
from agentproxy.approvals.lifecycle import Approval, Event, IllegalTransition, State
from agentproxy.clock import Clock
from agentproxy.config.model import ApprovalsSettings
from agentproxy.core import Principal
from agentproxy.errors import BadRequest, Conflict, NotFound
from agentproxy.store import ApprovalGrant, ApprovalPage, Store, StoreError

log = logging.getLogger("agentproxy.approvals")

Listener = Callable[[str, Approval], None]
# What a Watch stream may lag behind before it catches up by reading the store.
WATCH_QUEUE = 1000
# How often the pending gauge is set and overdue approvals are looked for.
WATCH_EVERY = 1.0
# Approved approvals kept for the `used` events of the calls their grants release.
APPROVED_KEPT = 1024


class ApprovalService:
    def __init__(
        self,
        store: Store,
        clock: Clock,
        *,
        stopping: asyncio.Event,
        on_store_error: Callable[[], None] = lambda: None,
        on_pending: Callable[[int], None] = lambda count: None,
    ) -> None:
        """`stopping`: set at shutdown, when held calls are answered "pending" at once.
        `on_pending`: told how many approvals are pending, every WATCH_EVERY seconds."""
        self._store = store
        self._clock = clock
        self._stopping = stopping
        self._on_store_error = on_store_error
        self._on_pending = on_pending
        self._listeners: list[Listener] = []
        self._watchers: set[asyncio.Queue[tuple[str, Approval]]] = set()
        # Approvals this replica opened, by when they expire (to report their expiry once).
        self._opened: dict[str, float] = {}
        # Approved approvals by id. The lifecycle has no arrow out of `approved`, so the
        # record a `used` event carries is read from the store once, not for every call a
        # `grant: {ttl}` releases (with Redis a round trip per call); the grant itself is
        # still taken from the store on every call.
        self._approved: dict[str, Approval] = {}

    def listen(self, listener: Listener) -> None:
        """`listener(event, approval)` for every event from now on; it must not raise."""
        self._listeners.append(listener)

    def emit(self, event: str, approval: Approval) -> None:
        if event == "requested":
            self._opened[approval.id] = approval.expires
        for listener in self._listeners:
            try:
                listener(event, approval)
            except Exception:  # one broken listener must not lose the event for the others
                log.exception("approval listener failed on %s of %s", event, approval.id)
        for queue in self._watchers:
            with contextlib.suppress(asyncio.QueueFull):  # a slow watcher catches up by polling
                queue.put_nowait((event, approval))

    # --- the gate's side ---------------------------------------------------------------------

    async def use_grant(self, fingerprint: str) -> ApprovalGrant | None:
        """Uses the grant for `fingerprint` once, if there is one (then `used` is emitted with
        its approval, for the audit trail). Raises StoreError."""
        now = self._clock.now()
        grant = await self._store.use_grant(fingerprint, now)
        if grant is not None:
            approval = self._approved.get(grant.approval_id)
            if approval is None:
                approval = await self._store.get_approval(grant.approval_id, now)
                if approval is not None and approval.state is State.APPROVED:
                    self._keep_approved(approval)
            if approval is not None:
                self.emit("used", approval)
        return grant

    def _keep_approved(self, approval: Approval) -> None:
        if len(self._approved) >= APPROVED_KEPT:
            self._approved.clear()  # bounded; the next use of each reads it again
        self._approved[approval.id] = approval

    async def open(
        self, approval: Approval, caps: ApprovalsSettings
    ) -> tuple[Approval, bool] | None:
        """The approval for `approval.fingerprint`, found or created (then `requested` is
        emitted); None when the caps forbid creating it. Raises StoreError."""
        opened = await self._store.open_approval(
            approval,
            self._clock.now(),
            max_pending=caps.max_pending,
            max_pending_per_agent=caps.max_pending_per_agent,
            max_pending_per_user=caps.max_pending_per_user,
            max_pending_per_rule=caps.max_pending_per_rule,
        )
        if opened is not None and opened[1]:
            self.emit("requested", opened[0])
        return opened

    async def hold(self, approval_id: str, seconds: float) -> Approval | None:
        """Waits up to `seconds` for a decision, but not past shutdown: a held call is then
        answered "pending" (its approval stays in the store) instead of being cut off. The
        approval as it then is, or None. Raises StoreError."""
        waiting = asyncio.ensure_future(self._store.wait_approval(approval_id, seconds))
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait((waiting, stopping), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not waiting.done():
                waiting.cancel()
        if waiting.cancelled() or not waiting.done():
            return None
        return waiting.result()

    async def get(self, approval_id: str) -> Approval | None:
        """Raises StoreError."""
        return await self._store.get_approval(approval_id, self._clock.now())

    # --- the approvers' side -----------------------------------------------------------------

    async def list(self, state: str | None) -> list[Approval]:
        """Raises StoreError."""
        return await self._store.list_approvals(state, self._clock.now())

    async def page(self, state: str | None, cursor: str | None, limit: int) -> ApprovalPage:
        """Raises ValueError (a bad state, cursor or limit), StoreError."""
        return await self._store.page_approvals(
            state, self._clock.now(), cursor=cursor, limit=limit
        )

    async def decide(
        self, approval_id: str, event: Event, principal: Principal, reason: str
    ) -> Approval:
        """Checks the approver (four-eyes), applies the event everywhere, tells everyone.

        Raises NotFound, Conflict (the approval was already decided), Denied (not an approver
        of it), StoreError.
        """
        now = self._clock.now()
        approval = await self._store.get_approval(approval_id, now)
        if approval is None:
            raise NotFound("no such approval")
        check_approver(principal, approval)
        if event is Event.DENY and approval.state is State.PENDING and not reason.strip():
            # The agent is told why, and so is the audit trail.
            raise BadRequest("a denial needs a reason")
        try:
            decided = await self._store.decide_approval(
                approval_id, event, principal.agent, reason, now
            )
        except KeyError:
            raise NotFound("no such approval") from None
        except IllegalTransition as exc:
            raise Conflict(str(exc)) from None
        # An approval short of its quorum stays pending: the vote is an event of its own.
        self.emit("voted" if decided.state is State.PENDING else decided.state.value, decided)
        return decided

    def subscribe(self) -> asyncio.Queue[tuple[str, Approval]]:
        """This replica's approval events as they happen, until unsubscribed."""
        queue: asyncio.Queue[tuple[str, Approval]] = asyncio.Queue(maxsize=WATCH_QUEUE)
        self._watchers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[tuple[str, Approval]]) -> None:
        self._watchers.discard(queue)

    # --- expiry ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Until cancelled, every WATCH_EVERY seconds: the pending count (counted, not listed:
        lists stop at a limit), and `expired` for approvals this replica opened once their
        time is up (each replica reports its own, so a fleet does not count one expiry N
        times). Store failures are counted and logged, never raised."""
        while True:
            await asyncio.sleep(WATCH_EVERY)
            await self.check()

    async def check(self) -> None:
        """One round of `run`."""
        try:
            now = self._clock.now()
            self._on_pending(await self._store.count_pending(now))
            await self._report_expired(now)
        except StoreError as exc:
            self._on_store_error()
            log.warning("cannot read pending approvals: %s", exc)

    async def _report_expired(self, now: float) -> None:
        due = [aid for aid, expires in self._opened.items() if expires <= now]
        for approval_id in due:
            approval = await self._store.get_approval(approval_id, now)  # expires it if due
            if approval is not None and approval.state is State.PENDING:
                continue  # a clock between replicas; asked again next round
            del self._opened[approval_id]
            if approval is not None and approval.state is State.EXPIRED:
                self.emit("expired", approval)
