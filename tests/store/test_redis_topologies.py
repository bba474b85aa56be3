"""RedisStore on a Cluster and through Sentinel, beyond the contract suite: what a caller names
cannot move keys across slots, a multi-slot reservation is still all-or-nothing, approvals
wake across nodes, and a Sentinel failover is refused closed, recovered from by itself, and
grants nothing twice. Real servers on free ports (tests/harness/redis.py)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import pytest
from redis.crc import key_slot

from agentproxy.approvals.lifecycle import Event, State
from agentproxy.config.model import RedisSettings, SentinelSettings
from agentproxy.store import ApprovalGrant, Reservation, Revocation, StoreError
from agentproxy.store.redis import RedisStore
from tests.harness.redis import SENTINEL_SERVICE, ClusterSetup, MakeRedisServer, SentinelSetup
from tests.store.test_contract import CAPS, NOW, approval


def cluster_store(cluster: ClusterSetup, prefix: str) -> RedisStore:
    return RedisStore(
        RedisSettings(cluster_nodes=tuple(cluster.nodes), key_prefix=prefix, timeout=2.0)
    )


async def test_braces_in_what_a_caller_names_keep_the_approval_keys_in_one_slot(
    redis_cluster: ClusterSetup,
) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    store = cluster_store(redis_cluster, prefix)
    other = cluster_store(redis_cluster, prefix)
    await store.start()
    await other.start()
    try:
        # An agent, user and rule spelled as hash tags: were they tags, the script's keys
        # would cross slots and Redis would refuse it (CROSSSLOT / non-local key).
        opened = await store.open_approval(
            approval("{fp}", agent="{a}", user="}{u}", rule="{r}"), NOW, **CAPS
        )
        assert opened is not None and opened[1]
        waiting = asyncio.create_task(other.wait_approval(opened[0].id, timeout=10))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        decided = await store.decide_approval(opened[0].id, Event.APPROVE, "carol", "ok", NOW)
        assert decided.state is State.APPROVED
        woken = await waiting
        # Woken by the notification (published on one node, heard on another), not the poll.
        assert woken is not None and woken.state is State.APPROVED
        assert time.monotonic() - started < 0.5
        assert await other.use_grant("{fp}", NOW) is not None
        assert await store.use_grant("{fp}", NOW) is None  # one use, across clients
        await other.wait_revocations(0.3)  # subscribed
        pushed = asyncio.create_task(other.wait_revocations(10))
        await asyncio.sleep(0.1)
        await store.revoke(Revocation("agent", "{a}"))
        await asyncio.wait_for(pushed, 1)  # pushed across nodes, not polled
        assert [r.subject for r in await other.revocations(NOW)] == ["{a}"]
        slots = set()
        for server in redis_cluster.servers or []:
            with server.client() as client:
                for key in client.scan_iter(match=f"{{{prefix}}}*"):
                    slots.add(key_slot(key.encode()))
        assert slots == {key_slot(f"{{{prefix}}}".encode())}
    finally:
        await store.close()
        await other.close()


async def test_a_reservation_across_cluster_slots_is_all_or_nothing(
    redis_cluster: ClusterSetup,
) -> None:
    store = cluster_store(redis_cluster, f"t{uuid.uuid4().hex[:8]}:")
    await store.start()
    try:
        keys = [f"agent:{i}" for i in range(40)]
        slots = {key_slot(store._counter(calls(k), 999_960).encode()) for k in keys}
        assert len(slots) > 1  # the test means something only if they spread
        full = calls(keys[-1], limit=1)
        assert await store.reserve([full], NOW) is None
        refused = await store.reserve([*(calls(k) for k in keys[:-1]), full], NOW)
        assert refused is not None and refused.name == f"calls:{keys[-1]}"
        for k in keys[:-1]:  # the groups taken before the full one were given back
            probe = await store.reserve([calls(k, limit=0)], NOW)
            assert probe is not None and probe.used == 0, k
        assert await store.reserve([calls(k) for k in keys[:-1]], NOW) is None
    finally:
        await store.close()


def calls(key: str, *, limit: float = 5) -> Reservation:
    return Reservation(name=f"calls:{key}", key=key, amount=1, limit=limit, window=60)


async def test_a_cluster_that_cannot_be_reached_is_named() -> None:
    store = RedisStore(RedisSettings(cluster_nodes=("127.0.0.1:1",), timeout=0.2))
    with pytest.raises(StoreError, match=r"cluster 127\.0\.0\.1:1"):
        await store.start()
    await store.close()


async def test_a_sentinel_that_cannot_be_reached_is_named() -> None:
    settings = RedisSettings(sentinel=SentinelSettings("mymaster", ("127.0.0.1:1",)), timeout=0.2)
    store = RedisStore(settings)
    with pytest.raises(StoreError, match=r"sentinel 127\.0\.0\.1:1 \(service mymaster\)"):
        await store.start()
    await store.close()


async def test_a_sentinel_failover_is_refused_closed_then_recovered_granting_nothing_twice(
    make_sentinel: object,
) -> None:
    setup: SentinelSetup = make_sentinel()  # type: ignore[operator]
    settings = RedisSettings(
        sentinel=SentinelSettings(SENTINEL_SERVICE, (setup.node,)), timeout=0.2
    )
    store = RedisStore(settings)
    await store.start()
    try:
        await store.revoke(Revocation("agent", "revoked-before"))
        limit = Reservation(name="calls", key="agent:a", amount=1, limit=1000, window=60)
        await store.put_grant(ApprovalGrant("fp-once", "ap-1", NOW + 600, uses=1), NOW)
        # Let the replica catch up, as `WAIT 1 0` would (the README's advice for operators).
        with setup.current_master().client() as client:
            assert client.wait(1, 2000) == 1
        old = setup.master_port()
        failing = asyncio.create_task(asyncio.to_thread(setup.failover))
        taken, refused, grants = 0, 0, 0
        deadline = time.monotonic() + 30
        recovered_at = None
        while time.monotonic() < deadline:
            try:
                if await store.reserve([limit], NOW) is None:
                    taken += 1
                if await store.use_grant("fp-once", NOW) is not None:
                    grants += 1
                if failing.done() and recovered_at is None:
                    recovered_at = time.monotonic()
                if recovered_at is not None and time.monotonic() - recovered_at > 1:
                    break
            except StoreError:
                refused += 1  # refused closed: the 503 path
                recovered_at = None
            await asyncio.sleep(0.01)
        await failing
        assert setup.master_port() != old
        assert recovered_at is not None, "the store did not recover by itself"
        assert grants <= 1  # a one-use grant is used at most once across the failover
        assert [r.subject for r in await store.revocations(NOW)] == ["revoked-before"]
        probe = await store.reserve([Reservation("calls", "agent:a", 1, 0, 60)], NOW)
        # The new master counts what it was told; no call was counted twice.
        assert probe is not None and probe.used <= taken
    finally:
        await store.close()


async def test_a_burst_queues_for_the_pool_instead_of_failing(redis_url: str) -> None:
    """1,000 concurrent limited calls on the default pool (20 connections, 50 ms): they wait
    their turn (bounded by pool_timeout) rather than fail; before, a pool wait counted
    against the 200 ms round-trip bound and 4-12% were refused."""
    store = RedisStore(RedisSettings(url=redis_url, key_prefix=f"t{uuid.uuid4().hex[:8]}:"))
    await store.start()
    try:
        limit = Reservation(name="calls", key="agent:burst", amount=1, limit=10_000, window=60)
        started = time.monotonic()
        results = await asyncio.gather(
            *(store.reserve([limit], NOW) for _ in range(1000)), return_exceptions=True
        )
        elapsed = time.monotonic() - started
        assert [r for r in results if r is not None] == [], elapsed
        probe = await store.reserve([Reservation("calls", "agent:burst", 1, 0, 60)], NOW)
        assert probe is not None and probe.used == 1000
    finally:
        await store.close()


async def test_a_call_that_cannot_get_a_connection_in_time_is_refused(
    make_redis_server: MakeRedisServer,
) -> None:
    server = make_redis_server()
    settings = RedisSettings(url=server.url, pool_size=1, pool_timeout=0.05, timeout=0.25)
    store = RedisStore(settings)
    await store.start()
    try:
        limit = Reservation(name="calls", key="agent:q", amount=1, limit=10, window=60)
        server.freeze()  # the one connection is held by a call that gets no answer
        held = asyncio.create_task(store.reserve([limit], NOW))
        await asyncio.sleep(0.01)
        with pytest.raises(StoreError, match=r"no connection free within 0\.05s \(pool_size 1"):
            await store.reserve([limit], NOW)
        with pytest.raises(StoreError, match="redis reserve"):
            await held
    finally:
        server.thaw()
        await store.close()


async def test_a_cluster_master_failover_is_survived(
    make_cluster: Callable[[int], ClusterSetup],
) -> None:
    """A master of the approvals' slot dies: its replica takes over; meanwhile calls are
    refused closed, then they and the approval notifications recover by themselves."""
    cluster = await asyncio.to_thread(make_cluster, 1)
    prefix = "fo:"
    settings = RedisSettings(cluster_nodes=tuple(cluster.nodes), key_prefix=prefix, timeout=0.2)
    store, other = RedisStore(settings), RedisStore(settings)
    await store.start()
    await other.start()
    try:
        limit = Reservation(name="calls", key="agent:a", amount=1, limit=10_000, window=60)
        assert await store.reserve([limit], NOW) is None
        await other.wait_revocations(0.3)  # subscribed somewhere
        doomed = cluster.master_of(f"{{{prefix}}}approvals:pending")
        await asyncio.to_thread(doomed.stop)
        refused, deadline = 0, time.monotonic() + 30
        while True:
            try:
                opened = await store.open_approval(approval("fp-fo"), NOW, **CAPS)
                break
            except StoreError:
                refused += 1
                assert time.monotonic() < deadline, "the store did not recover by itself"
                await asyncio.sleep(0.1)
        assert refused > 0  # the failover was seen, and refused closed
        assert opened is not None
        waiting = asyncio.create_task(other.wait_approval(opened[0].id, timeout=20))
        await asyncio.sleep(0.3)
        decided_at = time.monotonic()
        await store.decide_approval(opened[0].id, Event.APPROVE, "carol", "", NOW)
        woken = await waiting
        assert woken is not None and woken.state is State.APPROVED
        # Within the poll's second at worst: the subscription moved off the dead node.
        assert time.monotonic() - decided_at < 1.5
        assert await store.reserve([limit], NOW) is None
    finally:
        await store.close()
        await other.close()


async def test_wait_replicas_refuses_what_no_replica_confirmed(
    make_sentinel: Callable[[], SentinelSetup],
) -> None:
    """With wait_replicas: 1 a grant's use, a decision and a revocation go ahead only once the
    replica holds them, so a failover cannot bring back a used one-use grant."""
    setup = await asyncio.to_thread(make_sentinel)
    settings = RedisSettings(
        sentinel=SentinelSettings(SENTINEL_SERVICE, (setup.node,)), timeout=0.25, wait_replicas=1
    )
    store = RedisStore(settings)
    await store.start()
    try:
        await store.put_grant(ApprovalGrant("fp-a", "ap-1", NOW + 600, uses=1), NOW)
        assert await store.use_grant("fp-a", NOW) is not None
        await store.revoke(Revocation("agent", "a"))
        opened = await store.open_approval(approval("fp-w"), NOW, **CAPS)
        assert opened is not None
        assert setup.replica is not None
        await asyncio.to_thread(setup.replica.stop)
        await store.put_grant(ApprovalGrant("fp-b", "ap-2", NOW + 600, uses=1), NOW)
        # Refused: WAIT answers "0 of 1", or (Redis checks WAIT's timeout 10 times a second)
        # the socket times out first.
        unconfirmed = r"confirmed by 0 of 1 replica|Timeout reading"
        with pytest.raises(StoreError, match=unconfirmed):
            await store.use_grant("fp-b", NOW)
        with pytest.raises(StoreError, match=unconfirmed):
            await store.decide_approval(opened[0].id, Event.APPROVE, "carol", "", NOW)
        with pytest.raises(StoreError, match=unconfirmed):
            await store.revoke(Revocation("agent", "b"))
        # Reads and limits are not held up by the replica.
        assert await store.reserve([calls("agent:w")], NOW) is None
    finally:
        await store.close()


async def test_after_a_sentinel_failover_the_subscription_moves_to_the_new_master(
    make_sentinel: Callable[[], SentinelSetup],
) -> None:
    """A demoted master keeps its clients: a subscription left there hears only what
    replication brings, and nothing while it resyncs. Within a poll it moves."""
    setup = await asyncio.to_thread(make_sentinel)
    store = RedisStore(
        RedisSettings(sentinel=SentinelSettings(SENTINEL_SERVICE, (setup.node,)), timeout=0.5)
    )
    await store.start()
    try:
        await store.wait_revocations(0.3)  # subscribed, on the master
        await asyncio.to_thread(setup.failover)
        new = setup.current_master()
        deadline = time.monotonic() + 5
        while True:
            with new.client() as client:
                subscribers = [c for c in client.client_list() if int(c.get("sub", 0)) == 2]
            if subscribers:
                break
            assert time.monotonic() < deadline, "the subscription stayed on the old master"
            await store.wait_revocations(0.1)
    finally:
        await store.close()
