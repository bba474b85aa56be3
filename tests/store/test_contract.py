"""The `Store` contract: one suite, run on every implementation (STYLE §10).

Times are explicit `now` values, as the pipeline passes them; only task expiry runs on the
real clock, because Redis expires keys by its own.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from agentproxy.config.model import RedisSettings
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

NOW = 1_000_000.5  # inside the window [999_960, 1_000_020) of a 60 s window


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    implementation: Store
    if request.param == "memory":
        implementation = MemoryStore()
    else:
        url: str = request.getfixturevalue("redis_url")
        # A generous timeout: this suite checks semantics; test_redis_failures checks bounds.
        settings = RedisSettings(url=url, key_prefix=f"t{uuid.uuid4().hex}:", timeout=2.0)
        implementation = RedisStore(settings)
    await implementation.start()
    try:
        yield implementation
    finally:
        await implementation.close()


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
