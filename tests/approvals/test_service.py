"""ApprovalService on the memory store, no port: what a grant's uses cost the store."""

from __future__ import annotations

import asyncio

from agentproxy.approvals.lifecycle import Approval, Event, State
from agentproxy.approvals.service import ApprovalService
from agentproxy.config.model import ApprovalsSettings
from agentproxy.core import Principal
from agentproxy.store import MemoryStore
from tests.harness.clock import FakeClock


class CountingStore(MemoryStore):
    """The memory store, counting the approval reads."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    async def get_approval(self, approval_id: str, now: float) -> Approval | None:
        self.reads += 1
        return await super().get_approval(approval_id, now)


async def test_a_ttl_grant_reads_its_approval_once_and_reports_every_use() -> None:
    """An approved approval never changes again, so the `used` event of each call its grant
    releases carries the record read at the first use; the grant is taken every time."""
    clock = FakeClock()
    store = CountingStore()
    service = ApprovalService(store, clock, stopping=asyncio.Event())
    events: list[tuple[str, str]] = []
    service.listen(lambda event, approval: events.append((event, approval.state.value)))
    now = clock.now()
    asked = Approval(
        id="a-1",
        fingerprint="fp-1",
        state=State.PENDING,
        rule="transfers",
        reason="large transfer",
        agent="pay-bot",
        user=None,
        chain=(),
        action="http:POST /v1/transfers",
        summary={},
        approvers=("carol",),
        created=now,
        expires=now + 600,
        grant_ttl=3600.0,
    )
    assert await service.open(asked, ApprovalsSettings()) is not None
    await service.decide("a-1", Event.APPROVE, Principal(agent="carol"), "")
    reads = store.reads
    for _ in range(5):
        grant = await service.use_grant("fp-1")
        assert grant is not None and grant.approval_id == "a-1"
    assert store.reads == reads + 1
    assert events[-5:] == [("used", "approved")] * 5
    assert await service.use_grant("fp-other") is None  # no grant: nothing read, no event
    assert store.reads == reads + 1 and len(events) == 7
