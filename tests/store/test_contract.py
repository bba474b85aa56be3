"""The `Store` contract: one suite, run on every implementation (STYLE §10).

Times are explicit `now` values, as the pipeline passes them; only task expiry runs on the
real clock, because Redis expires keys by its own, and waits run on the real clock.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from agentproxy.approvals.lifecycle import Approval, Event, IllegalTransition, State, advance
from agentproxy.config.model import RedisSettings, SentinelSettings
from agentproxy.store import (
    ApprovalGrant,
    LimitExceeded,
    MemoryStore,
    Reservation,
    Revocation,
    Store,
    TaskHistory,
)
from agentproxy.store.redis import RedisStore
from tests.harness.redis import SENTINEL_SERVICE, ClusterSetup, RedisServer, SentinelSetup

NOW = 1_000_000.5  # inside the window [999_960, 1_000_020) of a 60 s window


@pytest.fixture(params=["memory", "redis", "valkey", "sentinel", "cluster"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    implementation: Store
    if request.param == "memory":
        implementation = MemoryStore()
    else:
        implementation = RedisStore(redis_settings(request, request.param))
    await implementation.start()
    try:
        yield implementation
    finally:
        await implementation.close()


def redis_settings(request: pytest.FixtureRequest, kind: str) -> RedisSettings:
    """A fresh key prefix on the session's server of `kind`. A generous timeout: this suite
    checks semantics; test_redis_failures checks bounds."""
    prefix = f"t{uuid.uuid4().hex}:"
    if kind == "redis":
        url: str = request.getfixturevalue("redis_url")
        return RedisSettings(url=url, key_prefix=prefix, timeout=2.0)
    if kind == "valkey":
        valkey: RedisServer = request.getfixturevalue("valkey_server_process")
        return RedisSettings(url=valkey.url, key_prefix=prefix, timeout=2.0)
    if kind == "sentinel":
        sentinel: SentinelSetup = request.getfixturevalue("redis_sentinel")
        return RedisSettings(
            sentinel=SentinelSettings(SENTINEL_SERVICE, (sentinel.node,)),
            key_prefix=prefix,
            timeout=2.0,
        )
    cluster: ClusterSetup = request.getfixturevalue("redis_cluster")
    return RedisSettings(cluster_nodes=tuple(cluster.nodes), key_prefix=prefix, timeout=2.0)


def calls(key: str = "agent:a", *, amount: float = 1, limit: float = 3) -> Reservation:
    return Reservation(name=f"calls:{key}", key=key, amount=amount, limit=limit, window=60)


async def used(store: Store, key: str, now: float = NOW) -> float:
    """The counter of `key`'s current window, read by a reservation that never fits."""
    probe = Reservation(name="probe", key=key, amount=1, limit=0, window=60)
    refused = await store.reserve([probe], now)
    assert refused is not None
    return refused.used


# Revocations


async def test_revocations_are_listed_and_replaced(store: Store) -> None:
    agent = Revocation("agent", "hr-bot", reason="compromised")
    token = Revocation("token", "jti-1", until=NOW + 60)
    await store.revoke(agent)
    await store.revoke(token)
    assert set(await store.revocations(NOW)) == {agent, token}

    replacement = Revocation("agent", "hr-bot", until=NOW + 10, reason="until review")
    await store.revoke(replacement)
    assert set(await store.revocations(NOW)) == {replacement, token}


async def test_an_agent_and_a_token_with_the_same_subject_are_distinct(store: Store) -> None:
    await store.revoke(Revocation("agent", "x"))
    await store.revoke(Revocation("token", "x"))
    assert len(await store.revocations(NOW)) == 2


async def test_expired_revocations_are_not_returned(store: Store) -> None:
    await store.revoke(Revocation("agent", "past", until=NOW - 1))
    await store.revoke(Revocation("agent", "soon", until=NOW + 5))
    assert [r.subject for r in await store.revocations(NOW)] == ["soon"]
    assert await store.revocations(NOW + 5) == []  # `until` is exclusive
    # An expired revocation is forgotten, not hidden: it does not come back for an earlier
    # `now` (a replica whose clock lags).
    assert await store.revocations(NOW) == []


async def test_a_past_until_lifts_a_revocation(store: Store) -> None:
    await store.revoke(Revocation("agent", "hr-bot"))
    await store.revoke(Revocation("agent", "hr-bot", until=NOW - 1, reason="lifted"))
    assert await store.revocations(NOW) == []


async def test_a_revocation_for_good_keeps_its_fields(store: Store) -> None:
    revocation = Revocation("token", "jti-" + "é" * 100, until=math.inf, reason="leaked: 'x'")
    await store.revoke(revocation)
    assert await store.revocations(NOW + 10**9) == [revocation]


async def test_a_revocation_wakes_a_waiting_mirror_at_once(store: Store) -> None:
    await store.wait_revocations(0.3)  # subscribed (Redis), and nothing pending
    waiting = asyncio.create_task(store.wait_revocations(10))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    started = time.monotonic()
    await store.revoke(Revocation("agent", "hr-bot"))
    await asyncio.wait_for(waiting, 2)
    assert time.monotonic() - started < 0.5
    # Without a revocation, the wait is the poll's safety net: it ends at its timeout.
    started = time.monotonic()
    await store.wait_revocations(0.2)
    assert 0.15 < time.monotonic() - started < 1


# Reservations


async def test_reservations_fit_up_to_the_limit(store: Store) -> None:
    for _ in range(3):
        assert await store.reserve([calls()], NOW) is None
    refused = await store.reserve([calls()], NOW)
    assert refused == LimitExceeded("calls:agent:a", used=3, limit=3, retry_after=19.5)


async def test_an_infinite_limit_always_fits(store: Store) -> None:
    unlimited = calls(amount=1e20, limit=math.inf)
    assert await store.reserve([unlimited, unlimited], NOW) is None
    assert await used(store, "agent:a") == 2e20


async def test_a_refused_reservation_takes_nothing(store: Store) -> None:
    assert await store.reserve([calls("task:t", limit=1)], NOW) is None
    refused = await store.reserve([calls("agent:a"), calls("task:t", limit=1)], NOW)
    assert refused is not None
    assert (refused.name, refused.used, refused.limit) == ("calls:task:t", 1, 1)
    assert await used(store, "agent:a") == 0
    assert await used(store, "task:t") == 1


async def test_the_first_reservation_that_does_not_fit_is_reported(store: Store) -> None:
    full = [calls("a", limit=0), calls("b", limit=0)]
    refused = await store.reserve(full, NOW)
    assert refused is not None
    assert refused.name == "calls:a"


async def test_counters_are_per_key(store: Store) -> None:
    assert await store.reserve([calls("a", amount=3)], NOW) is None
    assert await store.reserve([calls("b", amount=3)], NOW) is None
    assert await used(store, "a") == await used(store, "b") == 3


async def test_windows_roll_over(store: Store) -> None:
    assert await store.reserve([calls(amount=3)], NOW) is None
    last_moment = 1_000_019.75
    refused = await store.reserve([calls()], last_moment)
    assert refused is not None
    assert refused.retry_after == pytest.approx(0.25)
    assert await store.reserve([calls(amount=3)], 1_000_020.0) is None
    assert await used(store, "agent:a", 1_000_020.0) == 3


async def test_spend_amounts_are_floats(store: Store) -> None:
    spend = Reservation(name="spend", key="user:u", amount=0.25, limit=1.0, window=3600)
    for _ in range(4):
        assert await store.reserve([spend], NOW) is None
    refused = await store.reserve([spend], NOW)
    assert refused is not None
    assert refused.used == 1.0


async def test_ten_cents_fit_a_budget_of_one(store: Store) -> None:
    # 0.1 has no exact binary form: rounding must not refuse the tenth charge.
    cents = Reservation(name="spend", key="user:u", amount=0.1, limit=1.0, window=3600)
    results = [await store.reserve([cents], NOW) for _ in range(11)]
    assert results[:10] == [None] * 10
    assert results[10] is not None
    assert results[10].used == pytest.approx(1.0)


async def test_release_gives_back_but_never_below_zero(store: Store) -> None:
    assert await store.reserve([calls(amount=3)], NOW) is None
    await store.release([calls(amount=2)], NOW)
    assert await used(store, "agent:a") == 1
    await store.release([calls(amount=0.5), calls("never-taken", amount=5)], NOW)
    assert await used(store, "agent:a") == 0.5
    await store.release([calls(amount=100)], NOW)
    assert await used(store, "agent:a") == 0
    assert await used(store, "never-taken") == 0
    assert await store.reserve([calls(amount=3)], NOW) is None


async def test_release_touches_only_the_current_window(store: Store) -> None:
    assert await store.reserve([calls(amount=3)], NOW) is None
    await store.release([calls(amount=3)], NOW + 60)
    assert await used(store, "agent:a") == 3


async def test_concurrent_reservations_never_overspend(store: Store) -> None:
    budget = Reservation(name="budget", key="task:loop", amount=1, limit=100, window=60)
    results = await asyncio.gather(*(store.reserve([budget], NOW) for _ in range(200)))
    assert sum(r is None for r in results) == 100
    assert all(r.used == 100 for r in results if r is not None)


# Task history


async def test_an_unknown_task_has_an_empty_history(store: Store) -> None:
    assert await store.task_history("nope", NOW) == TaskHistory()


async def test_task_history_accumulates(store: Store) -> None:
    await store.record_task("t1", ["pii"], 0.5, ttl=60, now=NOW)
    await store.record_task("t1", ["email", "pii"], 0.25, ttl=60, now=NOW)
    await store.record_task("t1", [], 0, ttl=60, now=NOW)
    assert await store.task_history("t1", NOW) == TaskHistory(
        frozenset({"pii", "email"}), calls=3, spent=0.75
    )


async def test_a_batch_records_one_call_per_message(store: Store) -> None:
    await store.record_task("t1", ["pii"], 0.5, ttl=60, now=NOW, calls=40)
    await store.record_task("t1", [], 0, ttl=60, now=NOW)
    assert await store.task_history("t1", NOW) == TaskHistory(
        frozenset({"pii"}), calls=41, spent=0.5
    )


async def test_task_histories_are_per_task(store: Store) -> None:
    await store.record_task("t", ["pii"], 1.0, ttl=60, now=NOW)
    await store.record_task("t:labels", ["x"], 0, ttl=60, now=NOW)
    assert await store.task_history("t", NOW) == TaskHistory(frozenset({"pii"}), 1, 1.0)
    assert await store.task_history("t:labels", NOW) == TaskHistory(frozenset({"x"}), 1, 0)


async def test_task_history_expires_ttl_after_the_last_call(store: Store) -> None:
    # The real clock for both stores: Redis expires keys by its own clock, not by `now`.
    ttl = 0.4
    await store.record_task("t", ["pii"], 1.0, ttl, time.time())
    await asyncio.sleep(0.25)
    await store.record_task("t", [], 1.0, ttl, time.time())
    await asyncio.sleep(0.25)  # 0.5 s after the first call, 0.25 s after the last
    assert await store.task_history("t", time.time()) == TaskHistory(frozenset({"pii"}), 2, 2.0)
    await asyncio.sleep(ttl + 0.05)
    assert await store.task_history("t", time.time()) == TaskHistory()


async def test_a_one_use_grant_lets_exactly_one_of_many_through(store: Store) -> None:
    now = 1_000.0
    await store.put_grant(ApprovalGrant("fp-1", "ap-1", expires=now + 60, approver="carol"), now)
    got = await asyncio.gather(*(store.use_grant("fp-1", now) for _ in range(50)))
    used = [g for g in got if g is not None]
    assert len(used) == 1
    assert (used[0].approval_id, used[0].approver, used[0].uses) == ("ap-1", "carol", 1)
    assert await store.use_grant("fp-1", now) is None


async def test_a_ttl_grant_serves_until_it_expires(store: Store) -> None:
    now = 1_000.0
    await store.put_grant(ApprovalGrant("fp-2", "ap-2", expires=now + 60, uses=None), now)
    for _ in range(5):
        grant = await store.use_grant("fp-2", now + 30)
        assert grant is not None and grant.uses is None
    assert await store.use_grant("fp-2", now + 60) is None
    assert await store.use_grant("fp-other", now) is None


async def test_a_counted_grant_runs_out(store: Store) -> None:
    now = 1_000.0
    await store.put_grant(ApprovalGrant("fp-3", "ap-3", expires=now + 60, uses=3), now)
    left = [await store.use_grant("fp-3", now) for _ in range(4)]
    assert [g.uses if g else None for g in left] == [3, 2, 1, None]


# Approvals

LIFETIME = 60.0
CAPS = {"max_pending": 100, "max_pending_per_agent": 100}


def approval(
    fingerprint: str = "fp-1",
    *,
    agent: str = "hr-bot",
    created: float = NOW,
    lifetime: float = LIFETIME,
    grant_ttl: float | None = None,
    user: str | None = "alice",
    rule: str = "transfers-need-finance",
) -> Approval:
    return Approval(
        id=uuid.uuid4().hex,
        fingerprint=fingerprint,
        state=State.PENDING,
        rule=rule,
        reason="large transfer",
        agent=agent,
        user=user,
        chain=("alice", agent),
        action="POST /transfers",
        summary={"amount": 50, "currency": "EUR", "memo": "é" * 3},
        approvers=("role:finance-approver", "user:carol"),
        created=created,
        expires=created + lifetime,
        grant_ttl=grant_ttl,
    )


async def opened(store: Store, wanted: Approval, now: float = NOW, **caps: int) -> Approval:
    """Opens `wanted` and checks that it was created as given."""
    result = await store.open_approval(wanted, now, **{**CAPS, **caps})
    assert result == (wanted, True)
    return wanted


async def test_open_creates_then_finds_by_fingerprint(store: Store) -> None:
    first = await opened(store, approval("fp-1"))
    assert await store.open_approval(approval("fp-1"), NOW + 1, **CAPS) == (first, False)
    other = await opened(store, approval("fp-2"), NOW + 2)
    assert other.id != first.id
    assert await store.get_approval(first.id, NOW + 3) == first
    assert await store.get_approval("nope", NOW) is None


async def test_caps_refuse_and_create_nothing(store: Store) -> None:
    await opened(store, approval("a1", agent="a"), max_pending=2, max_pending_per_agent=1)
    assert (
        await store.open_approval(
            approval("a2", agent="a"), NOW, max_pending=2, max_pending_per_agent=1
        )
        is None
    )
    await opened(store, approval("b1", agent="b"), max_pending=2, max_pending_per_agent=1)
    # Past the total, agents that hold nothing still get one each, up to twice the total.
    await opened(store, approval("c1", agent="c"), max_pending=2, max_pending_per_agent=1)
    await opened(store, approval("d1", agent="d"), max_pending=2, max_pending_per_agent=1)
    refused = approval("e1", agent="e")
    assert await store.open_approval(refused, NOW, max_pending=2, max_pending_per_agent=1) is None
    assert {a.fingerprint for a in await store.list_approvals(None, NOW)} == {
        "a1",
        "b1",
        "c1",
        "d1",
    }
    assert await store.get_approval(refused.id, NOW) is None
    # An existing approval is still found at the cap: finding creates nothing.
    found = await store.open_approval(
        approval("a1", agent="a"), NOW, max_pending=0, max_pending_per_agent=0
    )
    assert found is not None and found[1] is False


async def test_agents_at_their_caps_cannot_lock_out_an_agent_that_holds_little(
    store: Store,
) -> None:
    caps = {"max_pending": 4, "max_pending_per_agent": 2}
    for agent in ("a", "b"):
        for i in range(2):
            await opened(store, approval(f"{agent}{i}", agent=agent), **caps)
    # The total is full; a and b hold their caps. c holds nothing: under its share (4 // 3).
    await opened(store, approval("c0", agent="c"), **caps)
    assert await store.open_approval(approval("c1", agent="c"), NOW, **caps) is None
    assert await store.open_approval(approval("a9", agent="a"), NOW, **caps) is None
    for agent in ("d", "e", "f"):
        await opened(store, approval(f"{agent}0", agent=agent), **caps)
    # Never past twice the total, whoever asks.
    assert await store.open_approval(approval("g0", agent="g"), NOW, **caps) is None
    assert await store.count_pending(NOW) == 8


async def test_caps_per_user_and_per_rule(store: Store) -> None:
    caps = {**CAPS, "max_pending_per_user": 2, "max_pending_per_rule": 3}
    await opened(store, approval("u1", agent="a", user="alice"), **caps)
    await opened(store, approval("u2", agent="b", user="alice"), **caps)
    refused = approval("u3", agent="c", user="alice")
    assert await store.open_approval(refused, NOW, **caps) is None  # alice's cap, any agent
    await opened(store, approval("u4", agent="c", user="bob"), **caps)
    # The rule holds 3: a fourth is refused whoever asks, another rule's is not.
    assert await store.open_approval(approval("r1", user=None), NOW, **caps) is None
    await opened(store, approval("r2", user=None, rule="other-rule"), **caps)
    # A decision frees a place in every count it held.
    first = await store.list_approvals("pending", NOW)
    alices = [a for a in first if a.user == "alice"]
    await store.decide_approval(alices[0].id, Event.DENY, "carol", "", NOW + 1)
    await opened(store, approval("u5", agent="c", user="alice"), NOW + 1, **caps)


async def test_pages_cover_every_approval_once_in_order(store: Store) -> None:
    caps = {"max_pending": 1000, "max_pending_per_agent": 1000}
    made = [
        await opened(store, approval(f"p{i}", created=NOW + i % 3, user=None), NOW + 2, **caps)
        for i in range(250)
    ]
    seen: list[Approval] = []
    cursor = None
    pages = 0
    while True:
        page = await store.page_approvals("pending", NOW + 2, cursor=cursor, limit=100)
        pages += 1
        seen += page.approvals
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
        if pages == 1:  # a decision between pages moves nothing past the cursor
            await store.decide_approval(seen[0].id, Event.DENY, "carol", "", NOW + 2)
    assert pages == 3 and [len(p) for p in (seen[:100], seen[100:200], seen[200:])] == [
        100,
        100,
        50,
    ]
    assert sorted(a.id for a in seen) == sorted(a.id for a in made)
    assert [(a.expires, a.id) for a in seen] == sorted((a.expires, a.id) for a in seen)
    everything = await store.page_approvals(None, NOW + 2, limit=1000)
    assert len(everything.approvals) == 250 and everything.next_cursor is None
    assert [(a.created, a.id) for a in everything.approvals] == sorted(
        (a.created, a.id) for a in made
    )
    denied = await store.page_approvals("denied", NOW + 2, limit=10)
    assert [a.id for a in denied.approvals] == [seen[0].id]


async def test_a_page_of_rare_states_examines_a_bounded_number_of_records(store: Store) -> None:
    caps = {"max_pending": 5000, "max_pending_per_agent": 5000}
    for i in range(2500):
        await opened(store, approval(f"q{i}", user=None), **caps)
    late = await opened(store, approval("late", created=NOW + 1, user=None), NOW + 1, **caps)
    await store.decide_approval(late.id, Event.DENY, "carol", "", NOW + 1)
    first = await store.page_approvals("denied", NOW + 1, limit=10)
    assert first.approvals == [] and first.next_cursor is not None  # scanned 2000, go on
    second = await store.page_approvals("denied", NOW + 1, cursor=first.next_cursor, limit=10)
    assert [a.id for a in second.approvals] == [late.id] and second.next_cursor is None


async def test_a_cursor_no_store_gave_is_refused(store: Store) -> None:
    for cursor in ("", "bm9wZQ", "!!", "MS41IA", "aW5mIHg", "MTIzIH"):
        with pytest.raises(ValueError):
            await store.page_approvals(None, NOW, cursor=cursor)
    with pytest.raises(ValueError):
        await store.page_approvals(None, NOW, limit=0)
    with pytest.raises(ValueError):
        await store.page_approvals("maybe", NOW)


async def test_caps_count_only_approvals_still_pending(store: Store) -> None:
    first = await opened(store, approval("a1", lifetime=10), max_pending=1)
    await store.decide_approval(first.id, Event.DENY, "carol", "no", NOW + 1)
    await opened(store, approval("a2", created=NOW + 1, lifetime=10), NOW + 1, max_pending=1)
    # a2 is overdue at NOW + 11: it no longer holds the cap.
    await opened(store, approval("a3", created=NOW + 11), NOW + 11, max_pending=1)


async def test_approve_stores_a_one_use_grant(store: Store) -> None:
    pending = await opened(store, approval())
    approved = await store.decide_approval(pending.id, Event.APPROVE, "carol", "ok", NOW + 5)
    assert approved.state is State.APPROVED
    assert (approved.decided_by, approved.decided_reason, approved.decided_at) == (
        "carol",
        "ok",
        NOW + 5,
    )
    assert await store.get_approval(pending.id, NOW + 6) == approved
    grant = await store.use_grant(pending.fingerprint, NOW + 6)
    assert grant is not None
    assert (grant.approval_id, grant.approver, grant.uses) == (pending.id, "carol", 1)
    assert grant.expires == pending.expires  # when the approval itself would have expired
    assert await store.use_grant(pending.fingerprint, NOW + 6) is None
    # The grant is spent: an identical request is a new approval, not the used one.
    again = approval(pending.fingerprint, created=NOW + 7)
    assert await store.open_approval(again, NOW + 7, **CAPS) == (again, True)


async def test_a_quorum_needs_that_many_distinct_approvers(store: Store) -> None:
    pending = await opened(store, replace(approval(), quorum=3))
    first = await store.decide_approval(pending.id, Event.APPROVE, "carol", "looks right", NOW + 1)
    assert first.state is State.PENDING and [v.by for v in first.votes] == ["carol"]
    assert await store.use_grant(pending.fingerprint, NOW + 1) is None  # nothing released
    # No approver counts twice.
    with pytest.raises(IllegalTransition, match="carol already approved"):
        await store.decide_approval(pending.id, Event.APPROVE, "carol", "again", NOW + 2)
    second = await store.decide_approval(pending.id, Event.APPROVE, "dave", "", NOW + 2)
    assert second.state is State.PENDING and len(second.votes) == 2
    assert await store.get_approval(pending.id, NOW + 2) == second
    third = await store.decide_approval(pending.id, Event.APPROVE, "erin", "ok", NOW + 3)
    assert third.state is State.APPROVED and third.decided_by == "erin"
    assert [(v.by, v.reason, v.at) for v in third.votes] == [
        ("carol", "looks right", NOW + 1),
        ("dave", "", NOW + 2),
        ("erin", "ok", NOW + 3),
    ]
    grant = await store.use_grant(pending.fingerprint, NOW + 4)
    assert grant is not None and grant.approver == "erin"


async def test_one_denial_refuses_a_quorum(store: Store) -> None:
    pending = await opened(store, replace(approval(), quorum=2))
    await store.decide_approval(pending.id, Event.APPROVE, "carol", "", NOW + 1)
    denied = await store.decide_approval(pending.id, Event.DENY, "dave", "no", NOW + 2)
    assert denied.state is State.DENIED and denied.decided_by == "dave"
    with pytest.raises(IllegalTransition):
        await store.decide_approval(pending.id, Event.APPROVE, "erin", "", NOW + 3)
    assert await store.use_grant(pending.fingerprint, NOW + 3) is None


async def test_approve_with_a_ttl_stores_a_grant_for_many_calls(store: Store) -> None:
    pending = await opened(store, approval(grant_ttl=3600.25))
    await store.decide_approval(pending.id, Event.APPROVE, "carol", "", NOW + 5)
    for _ in range(3):
        grant = await store.use_grant(pending.fingerprint, NOW + 3600)
        assert grant is not None
        assert (grant.uses, grant.expires) == (None, NOW + 5 + 3600.25)
    assert await store.use_grant(pending.fingerprint, NOW + 5 + 3600.25) is None


async def test_deny_stores_no_grant(store: Store) -> None:
    pending = await opened(store, approval())
    denied = await store.decide_approval(pending.id, Event.DENY, "carol", "too much", NOW)
    assert (denied.state, denied.decided_reason) == (State.DENIED, "too much")
    assert await store.use_grant(pending.fingerprint, NOW) is None
    assert (await store.list_approvals("denied", NOW)) == [denied]
    assert (await store.list_approvals("pending", NOW)) == []


async def test_every_transition_follows_the_lifecycle_table(store: Store) -> None:
    """Each (state, event) pair, on both stores, does what `advance` says: Redis applies the
    table in Lua."""
    reach = {State.APPROVED: Event.APPROVE, State.DENIED: Event.DENY, State.EXPIRED: Event.EXPIRE}
    for state in State:
        for event in Event:
            subject = await opened(store, approval(f"fp-{state.value}-{event.value}"))
            if state is not State.PENDING:
                await store.decide_approval(subject.id, reach[state], "setup", "", NOW)
            try:
                expected: State | None = advance(state, event)
            except IllegalTransition:
                expected = None
            if expected is None:
                with pytest.raises(IllegalTransition):
                    await store.decide_approval(subject.id, event, "carol", "r", NOW + 1)
                after = await store.get_approval(subject.id, NOW + 1)
                assert after is not None and after.state is state
            else:
                decided = await store.decide_approval(subject.id, event, "carol", "r", NOW + 1)
                assert decided.state is expected
                assert decided == await store.get_approval(subject.id, NOW + 1)


async def test_deciding_an_unknown_approval_is_a_key_error(store: Store) -> None:
    with pytest.raises(KeyError):
        await store.decide_approval("nope", Event.APPROVE, "carol", "", NOW)


async def test_approving_twice_is_illegal(store: Store) -> None:
    pending = await opened(store, approval())
    await store.decide_approval(pending.id, Event.APPROVE, "carol", "", NOW)
    assert await store.use_grant(pending.fingerprint, NOW) is not None
    with pytest.raises(IllegalTransition, match="cannot approve an approval that is approved"):
        await store.decide_approval(pending.id, Event.APPROVE, "dave", "", NOW)
    assert await store.use_grant(pending.fingerprint, NOW) is None  # no second grant


async def test_an_overdue_approval_is_expired_when_met(store: Store) -> None:
    pending = await opened(store, approval())
    expires = pending.expires
    assert (await store.get_approval(pending.id, expires - 0.5)) == pending
    expired = await store.get_approval(pending.id, expires)  # `expires` is exclusive
    assert expired is not None
    assert (expired.state, expired.decided_at, expired.decided_by) == (
        State.EXPIRED,
        expires,
        None,
    )
    assert await store.list_approvals("pending", expires) == []
    assert await store.list_approvals("expired", expires + 1) == [expired]


async def test_list_expires_overdue_approvals(store: Store) -> None:
    pending = await opened(store, approval())
    listed = await store.list_approvals(None, pending.expires + 1)
    assert [(a.id, a.state) for a in listed] == [(pending.id, State.EXPIRED)]


async def test_approving_after_expiry_is_illegal(store: Store) -> None:
    pending = await opened(store, approval())
    with pytest.raises(IllegalTransition, match="expired"):
        await store.decide_approval(pending.id, Event.APPROVE, "carol", "", pending.expires)
    after = await store.get_approval(pending.id, pending.expires)
    assert after is not None and after.state is State.EXPIRED
    assert await store.use_grant(pending.fingerprint, pending.expires - 1) is None


async def test_open_finds_an_expired_approval_until_its_window_ends(store: Store) -> None:
    pending = await opened(store, approval(lifetime=10))
    found = await store.open_approval(approval(), pending.expires + 9, **CAPS)
    assert found is not None
    assert (found[0].id, found[0].state, found[1]) == (pending.id, State.EXPIRED, False)
    # The window: decided_at (= expires) + lifetime.
    fresh = approval(created=pending.expires + 10)
    assert await store.open_approval(fresh, pending.expires + 10, **CAPS) == (fresh, True)


async def test_open_finds_a_decision_until_its_window_ends(store: Store) -> None:
    pending = await opened(store, approval(lifetime=10))
    denied = await store.decide_approval(pending.id, Event.DENY, "carol", "no", NOW + 2)
    retry = approval(created=NOW + 11.5)
    assert await store.open_approval(retry, NOW + 11.5, **CAPS) == (denied, False)
    assert await store.open_approval(retry, NOW + 12, **CAPS) == (retry, True)
    assert [a.id for a in await store.list_approvals(None, NOW + 12)] == [pending.id, retry.id]


async def test_list_is_oldest_first_and_filters_by_state(store: Store) -> None:
    late = await opened(store, approval("late", created=NOW + 2))
    early = await opened(store, approval("early", created=NOW), NOW + 2)
    middle = await opened(store, approval("middle", created=NOW + 1, lifetime=5), NOW + 2)
    approved = await store.decide_approval(middle.id, Event.APPROVE, "carol", "", NOW + 3)
    assert await store.list_approvals(None, NOW + 3) == [early, approved, late]
    assert await store.list_approvals("pending", NOW + 3) == [early, late]
    assert await store.list_approvals("approved", NOW + 3) == [approved]
    assert await store.list_approvals("expired", NOW + 3) == []
    with pytest.raises(ValueError):
        await store.list_approvals("maybe", NOW)


async def test_wait_returns_at_once_when_not_pending(store: Store) -> None:
    pending = await opened(store, approval())
    denied = await store.decide_approval(pending.id, Event.DENY, "carol", "", NOW)
    began = time.monotonic()
    assert await store.wait_approval(pending.id, 5) == denied
    assert await store.wait_approval("nope", 5) is None
    assert time.monotonic() - began < 0.5


async def test_a_waiter_is_woken_by_the_decision(store: Store) -> None:
    pending = await opened(store, approval())
    waiter = asyncio.create_task(store.wait_approval(pending.id, 10))
    await asyncio.sleep(0.2)  # the waiter is waiting (and, on Redis, subscribed)
    assert not waiter.done()
    decided_at = time.monotonic()
    approved = await store.decide_approval(pending.id, Event.APPROVE, "carol", "", NOW)
    assert await waiter == approved
    assert time.monotonic() - decided_at < 0.1


async def test_a_waiter_is_woken_when_its_approval_is_expired(store: Store) -> None:
    pending = await opened(store, approval())
    waiter = asyncio.create_task(store.wait_approval(pending.id, 10))
    await asyncio.sleep(0.2)
    expired = await store.get_approval(pending.id, pending.expires)
    assert expired is not None and expired.state is State.EXPIRED
    assert await asyncio.wait_for(waiter, 0.5) == expired


async def test_a_waiter_times_out_with_the_pending_approval(store: Store) -> None:
    pending = await opened(store, approval())
    began = time.monotonic()
    assert await store.wait_approval(pending.id, 0.3) == pending
    assert 0.3 <= time.monotonic() - began < 1.0


async def test_a_thousand_waiters_are_each_released_by_their_decision(store: Store) -> None:
    n = 1000
    began = time.monotonic()
    pending = [
        await opened(store, approval(f"fp-{i}", agent=f"agent-{i % 10}"), max_pending=n)
        for i in range(n)
    ]
    waiters = [asyncio.create_task(store.wait_approval(a.id, 20)) for a in pending]
    await asyncio.sleep(0.2)
    assert not any(w.done() for w in waiters)
    for a in pending:
        await store.decide_approval(a.id, Event.APPROVE, "carol", "", NOW)
    released = await asyncio.gather(*waiters)
    assert [a.state for a in released if a is not None] == [State.APPROVED] * n
    assert time.monotonic() - began < 10


async def test_count_pending_counts_past_the_list_limit(store: Store) -> None:
    many = 1005  # more than a list returns
    for i in range(many):
        await opened(
            store,
            approval(f"fp-{i}", agent=f"a{i % 7}"),
            max_pending=many,
            max_pending_per_agent=many,
        )
    assert len(await store.list_approvals("pending", NOW)) < many
    assert await store.count_pending(NOW) == many
    first = (await store.list_approvals("pending", NOW))[0]
    await store.decide_approval(first.id, Event.DENY, "carol", "", NOW + 1)
    assert await store.count_pending(NOW + 1) == many - 1
    assert await store.count_pending(NOW + LIFETIME) == 0  # overdue ones are not pending


async def test_a_calendar_window_counts_from_its_own_start(store: Store) -> None:
    from agentproxy.policy.limits import calendar_window

    # 2026-01-31 23:59:50 UTC: the month's last seconds, then February.
    late = 1_769_903_990.0
    start, length = calendar_window("month", late)
    assert (start, length) == (1_767_225_600.0, 31 * 86400.0)
    budget = Reservation("spend", "spend:agent=a", 4.0, 10.0, length, start)
    assert await store.reserve([budget], late) is None
    assert await store.reserve([budget], late + 5) is None
    over = await store.reserve([budget], late + 9)
    assert over is not None and over.used == 8.0 and 0 < over.retry_after <= 1
    # A take made at the end of January and settled in February gives back to January.
    await store.release([replace(budget, amount=4.0)], late + 20)
    assert await store.reserve([budget], late + 9.5) is None
    february = calendar_window("month", late + 20)
    assert february == (1_769_904_000.0, 28 * 86400.0)
    fresh = Reservation("spend", "spend:agent=a", 10.0, 10.0, february[1], february[0])
    assert await store.reserve([fresh], late + 20) is None


async def test_counters_are_read_for_what_remains_and_listed(store: Store) -> None:
    spend = Reservation("budget", "budget:agent=a", 2.5, 10.0, 60.0)
    other = Reservation("budget", "budget:agent={b}*", 1.0, 10.0, 60.0)
    calls = Reservation("calls", "calls:agent=a", 1.0, 3.0, 60.0)
    assert await store.usage([spend, calls], NOW) == [0.0, 0.0]
    assert await store.reserve([spend, calls], NOW) is None
    assert await store.reserve([spend, other], NOW) is None
    assert await store.usage([spend, calls, other], NOW) == [5.0, 1.0, 1.0]
    listed = await store.counters(["budget:"], NOW)
    start = math.floor(NOW / 60) * 60
    assert [(c.key, c.start, c.used) for c in listed] == [
        ("budget:agent=a", start, 5.0),
        ("budget:agent={b}*", start, 1.0),
    ]
    # A glob character in a limit name is matched as itself.
    assert await store.counters(["budget*:"], NOW) == []
    assert [c.key for c in await store.counters(["calls:", "budget:agent=a"], NOW)] == [
        "budget:agent=a",
        "calls:agent=a",
    ]
