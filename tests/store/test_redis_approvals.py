"""Approvals across RedisStore replicas on one Redis: a decision on any replica wakes waiters on
every other within a second, through one subscription per replica and no threads; a lost
notification is caught by the slow re-check; pending approvals outlive the replica that made
them (a proxy restart)."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from agentproxy.approvals.lifecycle import Approval, Event, State
from agentproxy.config.model import RedisSettings
from agentproxy.store import redis as redis_store
from agentproxy.store.redis import POLL_INTERVAL, RedisStore
from tests.harness.redis import RedisServer
from tests.store.test_contract import CAPS, NOW, approval

Replica = Callable[[], Awaitable[RedisStore]]


@pytest.fixture
async def replica(redis_url: str) -> AsyncIterator[Replica]:
    """Makes started RedisStores sharing one Redis and one key prefix; closes them at the end."""
    prefix = f"t{uuid.uuid4().hex}:"
    made: list[RedisStore] = []

    async def factory() -> RedisStore:
        store = RedisStore(RedisSettings(url=redis_url, key_prefix=prefix, timeout=2.0))
        made.append(store)
        await store.start()
        return store

    try:
        yield factory
    finally:
        for store in made:
            await store.close()


async def open_new(store: RedisStore, wanted: Approval, **caps: int) -> Approval:
    assert await store.open_approval(wanted, NOW, **{**CAPS, **caps}) == (wanted, True)
    return wanted


async def test_a_decision_on_one_replica_wakes_a_waiter_on_another(replica: Replica) -> None:
    holder, approver = await replica(), await replica()
    pending = await open_new(holder, approval())
    waiter = asyncio.create_task(holder.wait_approval(pending.id, 10))
    await asyncio.sleep(0.2)
    assert not waiter.done()
    decided_at = time.monotonic()
    approved = await approver.decide_approval(pending.id, Event.APPROVE, "carol", "ok", NOW)
    assert await waiter == approved
    assert time.monotonic() - decided_at < 1.0
    grant = await holder.use_grant(pending.fingerprint, NOW)
    assert grant is not None and grant.approval_id == pending.id


async def test_a_thousand_held_calls_share_one_subscription_and_no_thread(
    replica: Replica, redis_server: RedisServer
) -> None:
    holder, approver = await replica(), await replica()
    n = 1000
    caps = {"max_pending": n, "max_pending_per_agent": n}
    pending = [await open_new(holder, approval(f"fp-{i}"), **caps) for i in range(n)]
    threads = threading.active_count()
    waiters = [asyncio.create_task(holder.wait_approval(a.id, 20)) for a in pending]
    channel = holder._changed_channel
    # Until the watcher has subscribed (on a loaded two-core machine that takes a while).
    deadline = time.monotonic() + 10
    while True:
        with redis_server.client() as client:
            subscribers = client.pubsub_numsub(channel)
        if subscribers != [(channel, 0)] or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert subscribers == [(channel, 1)]  # one subscription for all 1000 waiters
    assert threading.active_count() == threads
    began = time.monotonic()
    for a in pending:
        await approver.decide_approval(a.id, Event.APPROVE, "carol", "", NOW)
    released = await asyncio.gather(*waiters)
    assert all(a is not None and a.state is State.APPROVED for a in released)
    assert time.monotonic() - began < 10


async def test_a_lost_notification_is_caught_by_the_re_check(
    replica: Replica, redis_server: RedisServer
) -> None:
    holder = await replica()
    pending = await open_new(holder, approval())
    waiter = asyncio.create_task(holder.wait_approval(pending.id, 10))
    await asyncio.sleep(0.2)
    # A decision whose PUBLISH never arrived.
    with redis_server.client() as client:
        client.hset(holder._approval_key(pending.id), "state", "denied")
    began = time.monotonic()
    denied = await waiter
    assert denied is not None and denied.state is State.DENIED
    assert time.monotonic() - began < POLL_INTERVAL + 0.5


async def test_the_re_check_reads_every_waiter_in_batches(
    replica: Replica, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches of RECHECK_BATCH: a decision lost in any of them, the last one short, wakes
    exactly its waiter."""
    monkeypatch.setattr(redis_store, "RECHECK_BATCH", 2)
    holder = await replica()
    caps = {"max_pending": 5, "max_pending_per_agent": 5}
    pending = [await open_new(holder, approval(f"fp-{i}"), **caps) for i in range(5)]
    waiters = [asyncio.create_task(holder.wait_approval(a.id, 10)) for a in pending]
    await asyncio.sleep(0.2)
    with redis_server.client() as client:  # decisions whose PUBLISH never arrived
        for i in (0, 3, 4):
            client.hset(holder._approval_key(pending[i].id), "state", "denied")
    done, waiting = await asyncio.wait(waiters, timeout=POLL_INTERVAL + 0.5)
    assert {waiters.index(w) for w in done} == {0, 3, 4}
    decided = [w.result() for w in done]
    assert all(a is not None and a.state is State.DENIED for a in decided)
    for w in waiting:
        w.cancel()


async def test_a_dropped_subscription_is_re_established(
    replica: Replica, redis_server: RedisServer
) -> None:
    holder, approver = await replica(), await replica()
    pending = await open_new(holder, approval())
    waiter = asyncio.create_task(holder.wait_approval(pending.id, 10))
    await asyncio.sleep(0.2)
    with redis_server.client() as client:
        assert client.client_kill_filter(_type="pubsub") == 1
    await asyncio.sleep(0.05)
    began = time.monotonic()
    await approver.decide_approval(pending.id, Event.DENY, "carol", "", NOW)
    denied = await waiter
    assert denied is not None and denied.state is State.DENIED
    # Resubscribing after a pause, then re-checking every waiter.
    assert time.monotonic() - began < 2 * POLL_INTERVAL + 0.5
    second = await open_new(holder, approval("fp-2"))
    waiter = asyncio.create_task(holder.wait_approval(second.id, 10))
    await asyncio.sleep(POLL_INTERVAL + 0.5)  # resubscribed by now
    began = time.monotonic()
    await approver.decide_approval(second.id, Event.APPROVE, "carol", "", NOW)
    assert await waiter is not None
    assert time.monotonic() - began < 0.2


async def test_pending_approvals_survive_a_proxy_restart(replica: Replica) -> None:
    old = await replica()
    pending = await open_new(old, approval())
    await old.close()

    new = await replica()
    assert await new.get_approval(pending.id, NOW + 1) == pending
    assert await new.list_approvals("pending", NOW + 1) == [pending]
    assert await new.open_approval(approval(), NOW + 1, **CAPS) == (pending, False)
    waiter = asyncio.create_task(new.wait_approval(pending.id, 10))
    await asyncio.sleep(0.1)
    approved = await new.decide_approval(pending.id, Event.APPROVE, "carol", "", NOW + 2)
    assert await waiter == approved
