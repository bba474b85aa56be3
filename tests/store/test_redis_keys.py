"""What RedisStore leaves in Redis: every key under its prefix, and every key that may be
lost carries a TTL (revocations and the epoch marker do not, see the module docstring)."""

from __future__ import annotations

import pytest

from agentproxy.approvals.lifecycle import Event
from agentproxy.config.model import RedisSettings
from agentproxy.store import Reservation, Revocation
from agentproxy.store.redis import WINDOW_MARGIN, RedisStore
from tests.harness.redis import RedisServer
from tests.store.test_contract import CAPS, approval

NOW = 1_000_000.5


async def test_keys_live_under_the_prefix_and_expire(
    redis_server: RedisServer, redis_url: str
) -> None:
    store = RedisStore(RedisSettings(url=redis_url, key_prefix="app1:", timeout=2.0))
    await store.start()
    try:
        await store.revoke(Revocation("agent", "a"))
        budget = Reservation("spend", "user:u", amount=0.5, limit=10, window=60)
        assert await store.reserve([budget], NOW) is None
        await store.record_task("t", ["pii"], 0.5, ttl=30, now=NOW)
    finally:
        await store.close()

    with redis_server.client() as client:
        keys = set(client.keys("*"))
        takes = {k for k in keys if k.startswith("app1:take:")}
        assert keys - takes == {
            "app1:epoch",
            "app1:revocations",
            "app1:limit:user:u:999960",
            "app1:task:t",
        }
        # The reservation's marker, kept a minute to cancel the take exactly once.
        assert len(takes) == 1
        (take,) = takes
        assert client.get(take) == "taken"
        assert 59 <= client.ttl(take) <= 60
        assert client.ttl("app1:epoch") == client.ttl("app1:revocations") == -1
        # The window ends 19.5 s after NOW; the counter outlives it by the margin.
        counter_ttl = client.pttl("app1:limit:user:u:999960") / 1000
        assert counter_ttl == pytest.approx(19.5 + WINDOW_MARGIN, abs=0.5)
        assert 29 <= client.ttl("app1:task:t") <= 30
        assert client.get("app1:limit:user:u:999960") == "0.5"


async def test_approval_keys_live_under_the_prefix_and_expire(
    redis_server: RedisServer, redis_url: str
) -> None:
    store = RedisStore(RedisSettings(url=redis_url, key_prefix="app1:", timeout=2.0))
    await store.start()
    try:
        decided = approval("fp-1", created=NOW, lifetime=60)
        assert await store.open_approval(decided, NOW, **CAPS) is not None
        await store.decide_approval(decided.id, Event.APPROVE, "carol", "", NOW + 10)
        pending = approval("fp-2", created=NOW, lifetime=60)
        assert await store.open_approval(pending, NOW, **CAPS) is not None
    finally:
        await store.close()

    with redis_server.client() as client:
        ttls = {key: client.pttl(key) / 1000 for key in client.keys("*")}
    # decided: 2 * lifetime after the decision; pending: lifetime + 2 * lifetime from NOW.
    assert ttls == {
        "app1:epoch": -0.001,  # no TTL
        f"app1:approval:{decided.id}": pytest.approx(120, abs=1),
        "app1:approval-fp:fp-1": pytest.approx(120, abs=1),
        "app1:grant:fp-1": pytest.approx(50, abs=1),  # until the approval's own expiry
        f"app1:approval:{pending.id}": pytest.approx(180, abs=1),
        "app1:approval-fp:fp-2": pytest.approx(180, abs=1),
        "app1:approvals:pending": pytest.approx(180, abs=1),
        "app1:approvals:pending:agent:hr-bot": pytest.approx(180, abs=1),
        "app1:approvals:pending:agents": pytest.approx(180, abs=1),
        "app1:approvals:pending:user:alice": pytest.approx(180, abs=1),
        "app1:approvals:pending:rule:transfers-need-finance": pytest.approx(180, abs=1),
        "app1:approvals:all": pytest.approx(180, abs=1),
    }
