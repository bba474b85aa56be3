"""RedisStore against a real redis-server that is stopped, frozen, restarted empty, or that
wants a password: every call is bounded, fails as StoreError without the password, recovers
by itself, and no revocation vanishes while a replica remembers it.

Servers stop and restart in a thread: the event loop keeps running meanwhile, as it does in a
proxy, so pooled connections see the server close them and are replaced on their next use.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, suppress
from typing import Any

import pytest

from agentproxy.approvals.lifecycle import Approval, Event, State
from agentproxy.config.model import RedisSettings
from agentproxy.store import Reservation, Revocation, StoreError
from agentproxy.store.redis import RedisStore
from tests.harness.redis import MakeRedisServer, RedisServer

NOW = 1_000_000.5
TIMEOUT = 0.05  # the default store timeout
BUDGET = Reservation(name="calls", key="agent:a", amount=1, limit=10, window=60)

PENDING = Approval(
    id="ap-1",
    fingerprint="fp-1",
    state=State.PENDING,
    rule="r",
    reason="",
    agent="a",
    user=None,
    chain=(),
    action="POST /x",
    summary={},
    approvers=("user:carol",),
    created=NOW,
    expires=NOW + 60,
)


async def decide_unknown(store: RedisStore) -> None:
    # An unknown id is a KeyError when Redis answers; a StoreError when it does not.
    with suppress(KeyError):
        await store.decide_approval("nope", Event.APPROVE, "carol", "", NOW)


Operation = Callable[[RedisStore], Awaitable[Any]]
OPERATIONS: dict[str, Operation] = {
    "revoke": lambda s: s.revoke(Revocation("agent", "a")),
    "revocations": lambda s: s.revocations(NOW),
    "reserve": lambda s: s.reserve([BUDGET], NOW),
    "release": lambda s: s.release([BUDGET], NOW),
    "task_history": lambda s: s.task_history("t", NOW),
    "record_task": lambda s: s.record_task("t", ["pii"], 1.0, 60, NOW),
    "open_approval": lambda s: s.open_approval(
        PENDING, NOW, max_pending=10, max_pending_per_agent=10
    ),
    "get_approval": lambda s: s.get_approval("ap-1", NOW),
    "list_approvals": lambda s: s.list_approvals(None, NOW),
    "decide_approval": decide_unknown,
    "wait_approval": lambda s: s.wait_approval("ap-1", 0.1),
}

Connect = Callable[..., Awaitable[RedisStore]]


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    """Makes started RedisStores (replicas), closed when the test ends."""
    async with AsyncExitStack() as stack:

        async def factory(url: str, prefix: str = "replicas:", start: bool = True) -> RedisStore:
            store = RedisStore(RedisSettings(url=url, key_prefix=prefix, timeout=TIMEOUT))
            stack.push_async_callback(store.close)
            if start:
                await store.start()
            return store

        yield factory


async def fails_fast(call: Awaitable[Any]) -> StoreError:
    began = time.monotonic()
    with pytest.raises(StoreError) as caught:
        await call
    assert time.monotonic() - began < 1.0
    return caught.value


@pytest.mark.parametrize("operation", OPERATIONS)
async def test_a_stopped_redis_fails_every_operation_fast(
    operation: str, make_redis_server: MakeRedisServer, connect: Connect
) -> None:
    server = make_redis_server()
    store = await connect(server.url)
    await asyncio.to_thread(server.stop)
    error = await fails_fast(OPERATIONS[operation](store))
    assert operation in str(error)
    assert f"127.0.0.1:{server.port}" in str(error)


@pytest.mark.parametrize("operation", OPERATIONS)
async def test_a_frozen_redis_fails_every_operation_fast(
    operation: str, make_redis_server: MakeRedisServer, connect: Connect
) -> None:
    server = make_redis_server()
    store = await connect(server.url)
    await store.revocations(NOW)  # a pooled connection, then a server that stops answering
    server.freeze()
    try:
        error = await fails_fast(OPERATIONS[operation](store))
    finally:
        server.thaw()
    assert operation in str(error)


async def test_start_fails_fast_when_redis_is_unreachable(
    make_redis_server: MakeRedisServer, connect: Connect
) -> None:
    server = make_redis_server()
    await asyncio.to_thread(server.stop)
    store = await connect(server.url, start=False)
    error = await fails_fast(store.start())
    assert "start" in str(error)


async def test_the_same_store_recovers_when_redis_returns(
    make_redis_server: MakeRedisServer, connect: Connect
) -> None:
    server = make_redis_server()
    store = await connect(server.url)
    assert await store.reserve([BUDGET], NOW) is None
    await asyncio.to_thread(server.stop)
    await fails_fast(store.reserve([BUDGET], NOW))
    await asyncio.to_thread(server.start)
    # Empty after the restart: the counter starts again (documented), the scripts are
    # reloaded, and the pooled connections to the old process are replaced.
    for operation in OPERATIONS.values():
        await operation(store)
    probe = Reservation("probe", "agent:a", amount=1, limit=0, window=60)
    refused = await store.reserve([probe], NOW)
    assert refused is not None
    assert refused.used == 0  # 1 before the restart; since then one reserve, one release


async def test_a_revocation_survives_a_redis_restart_while_a_replica_lives(
    make_redis_server: MakeRedisServer, connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    server = make_redis_server()
    first = await connect(server.url)
    second = await connect(server.url)
    agent = Revocation("agent", "hr-bot", reason="compromised")
    token = Revocation("token", "jti-9", until=NOW + 3600)
    await first.revoke(agent)
    await second.revoke(token)
    assert set(await second.revocations(NOW)) == {agent, token}

    await asyncio.to_thread(server.restart)  # empty: no persistence
    with server.client() as client:
        assert client.dbsize() == 0
    late = await connect(server.url)  # a replica started after the restart
    with caplog.at_level(logging.WARNING, logger="agentproxy.store"):
        assert set(await second.revocations(NOW)) == {agent, token}
    assert "re-applied 2 revocation(s)" in caplog.text
    assert set(await late.revocations(NOW)) == {agent, token}
    assert set(await first.revocations(NOW)) == {agent, token}


async def test_a_revocation_made_after_the_restart_wins_over_a_mirror(
    make_redis_server: MakeRedisServer, connect: Connect
) -> None:
    server = make_redis_server()
    first = await connect(server.url)
    second = await connect(server.url)
    await first.revoke(Revocation("agent", "hr-bot", reason="old"))
    await asyncio.to_thread(server.restart)
    newer = Revocation("agent", "hr-bot", until=NOW + 60, reason="newer")
    await second.revoke(newer)
    assert await first.revocations(NOW) == [newer]
    assert await second.revocations(NOW) == [newer]


async def test_replicas_without_the_revocation_do_not_erase_it(
    make_redis_server: MakeRedisServer, connect: Connect
) -> None:
    server = make_redis_server()
    keeper = await connect(server.url)
    forgetful = await connect(server.url)
    await asyncio.to_thread(server.restart)
    # `forgetful` re-applies its empty mirror first; `keeper` re-applies after it.
    await forgetful.revocations(NOW)
    await keeper.revoke(Revocation("agent", "late", reason="x"))
    await asyncio.to_thread(server.restart)
    assert await forgetful.revocations(NOW) == []  # it never saw the revocation
    assert [r.subject for r in await keeper.revocations(NOW)] == ["late"]
    assert [r.subject for r in await forgetful.revocations(NOW)] == ["late"]


async def test_a_malformed_revocation_fails_closed(
    redis_server: RedisServer, redis_url: str, connect: Connect
) -> None:
    store = await connect(redis_url, prefix="bad:")
    await store.revoke(Revocation("agent", "a"))
    with redis_server.client() as client:
        client.hset("bad:revocations", "agent:b", "{not json")
    error = await fails_fast(store.revocations(NOW))
    assert "agent:b" in str(error)


@pytest.mark.parametrize("password", ["secretpw", "wrongsecretpw"])
async def test_errors_never_carry_the_password(
    password: str,
    make_redis_server: MakeRedisServer,
    connect: Connect,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="agentproxy.store")
    server = make_redis_server(password="secretpw")
    url = f"redis://:{password}@127.0.0.1:{server.port}/0"
    store = await connect(url, start=False)
    errors: list[StoreError] = []
    if password == "secretpw":
        await store.start()
        await asyncio.to_thread(server.stop)
    else:
        errors.append(await fails_fast(store.start()))
    for operation in OPERATIONS.values():
        errors.append(await fails_fast(operation(store)))
    for error in errors:
        told = "".join(traceback.format_exception(error))
        assert password not in told
        assert f"redis://***@127.0.0.1:{server.port}/0" in str(error)
    await asyncio.sleep(0.3)  # the approval subscription (started by wait_approval) fails too
    assert "revocation notifications from redis at redis://***@" in caplog.text
    assert password not in caplog.text


async def test_a_password_in_the_query_is_scrubbed_too(
    make_redis_server: MakeRedisServer, connect: Connect
) -> None:
    server = make_redis_server(password="secretpw")
    store = await connect(f"redis://127.0.0.1:{server.port}/0?password=secretpw", start=False)
    await asyncio.to_thread(server.stop)
    error = await fails_fast(store.start())
    assert "secretpw" not in "".join(traceback.format_exception(error))


async def test_an_invalid_url_is_a_store_error() -> None:
    with pytest.raises(StoreError, match="invalid redis url"):
        RedisStore(RedisSettings(url="http://:secretpw@127.0.0.1:1/0"))


async def test_a_malformed_approval_fails_closed(
    redis_server: RedisServer, redis_url: str, connect: Connect
) -> None:
    store = await connect(redis_url, prefix="bad:")
    with redis_server.client() as client:
        client.hset("bad:approval:ap-9", mapping={"state": "approved", "json": "{not json"})
    error = await fails_fast(store.get_approval("ap-9", NOW))
    assert "malformed approval" in str(error)


async def test_a_call_refused_during_a_freeze_is_not_charged_when_redis_thaws(
    make_redis_server: MakeRedisServer, connect: Connect
) -> None:
    """The reserve scripts sent to a frozen Redis run when it thaws, though every caller was
    refused (before: a counter read 539 against 535 forwarded calls). Each refused take is
    cancelled exactly once, whichever runs first at the thaw."""
    server = make_redis_server()
    store = await connect(server.url)
    budget = Reservation(name="calls", key="agent:frozen", amount=1, limit=1000, window=60)
    assert await store.reserve([budget], NOW) is None  # one forwarded call
    server.freeze()
    try:
        results = await asyncio.gather(
            *(store.reserve([budget], NOW) for _ in range(20)), return_exceptions=True
        )
        assert all(isinstance(r, StoreError) for r in results)
        await asyncio.sleep(0.6)  # the cancels retry against the frozen server meanwhile
    finally:
        server.thaw()
    probe = Reservation(name="calls", key="agent:frozen", amount=1, limit=0, window=60)
    deadline = time.monotonic() + 5
    while True:
        refused = await store.reserve([probe], NOW)
        assert refused is not None
        if refused.used == 1:
            break
        assert time.monotonic() < deadline, f"counter {refused.used}, 1 call was forwarded"
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)  # nothing runs later to charge them after all
    refused = await store.reserve([probe], NOW)
    assert refused is not None and refused.used == 1
