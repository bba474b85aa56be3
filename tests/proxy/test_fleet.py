"""Proxies sharing a real Redis: what one replica learns, every replica enforces; and what
happens while Redis is down."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.conftest import (
    Keys,
    ProxyFactory,
    Upstream,
    write_config,
)
from tests.harness.clock import FakeClock
from tests.harness.processes import pin_ports, spawn_proxy, wait_ready
from tests.harness.redis import SENTINEL_SERVICE, ClusterSetup, MakeRedisServer, SentinelSetup
from tests.proxy.test_state import POLICY


def store(url: str, on_error: str = "deny") -> str:
    return (
        f"store: {{redis: {{url: '{url}', timeout: 50ms}}, on_error: {on_error}}}\n"
        'admin: {operators: ["role:security"]}'
    )


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def status(s: aiohttp.ClientSession, method: str, url: str, token: str) -> int:
    async with s.request(method, url, headers=auth(token)) as r:
        await r.read()
        return r.status


async def test_revocation_and_counters_are_shared_by_the_fleet(
    make_proxy: ProxyFactory, keys: Keys, redis_url: str, tmp_path: Path, upstream: Upstream
) -> None:
    """Replica a runs in this process, replica b is a separate `agentproxy run` process."""
    a = await make_proxy(policy=POLICY, extra=store(redis_url))
    config = write_config(tmp_path, keys, upstream.url, policy=POLICY, extra=store(redis_url))
    http_port, admin_port = pin_ports(config)
    log = tmp_path / "b.log"
    b = await spawn_proxy(config, log)
    b_base = f"http://127.0.0.1:{http_port}"
    reader = keys.token("reader")
    try:
        async with aiohttp.ClientSession() as s:
            await wait_ready(s, admin_port, b, log)
            # read-rate allows 3 calls an hour per agent, across both replicas
            got = [
                await status(s, "GET", a.base + "/v1/employees/1", reader),
                await status(s, "GET", b_base + "/v1/employees/1", reader),
                await status(s, "GET", a.base + "/v1/employees/1", reader),
                await status(s, "GET", b_base + "/v1/employees/1", reader),
            ]
            assert got == [200, 200, 200, 429]

            hr = keys.token("hr-bot")
            assert await status(s, "GET", b_base + "/v1/employees/2", hr) == 200
            operator = keys.token("sec", roles=["security"])
            async with s.post(
                a.admin + "/v1/revocations", headers=auth(operator), json={"agent": "hr-bot"}
            ) as r:
                assert r.status == 201
            revoked_at = time.monotonic()
            while await status(s, "GET", b_base + "/v1/employees/2", hr) != 403:
                assert time.monotonic() - revoked_at < 1.5, "replica b did not see the revocation"
                await asyncio.sleep(0.05)
    finally:
        b.terminate()
        await asyncio.wait_for(b.wait(), 10)


async def test_cli_revoke_reaches_a_running_proxy(
    make_proxy: ProxyFactory, keys: Keys, redis_url: str
) -> None:
    proxy = await make_proxy(policy=POLICY, extra=store(redis_url))
    token = keys.token("hr-bot", jti="tok-cli")
    async with aiohttp.ClientSession() as s:
        assert await status(s, "GET", proxy.base + "/v1/employees/2", token) == 200
        out = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                "-m",
                "agentproxy",
                "revoke",
                "--config",
                str(proxy.config_path),
                "--token-id",
                "tok-cli",
                "--until",
                "1h",
                "--reason",
                "leaked",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        assert "revoked token tok-cli" in out.stdout
        await asyncio.sleep(1.0)
        assert await status(s, "GET", proxy.base + "/v1/employees/2", token) == 401


async def test_store_down_fails_closed_and_recovers(
    make_proxy: ProxyFactory, keys: Keys, make_redis_server: MakeRedisServer, upstream: Upstream
) -> None:
    redis = make_redis_server()
    # Minted before the clock starts: a token issued in a later second than the fake clock's
    # now would be "not yet valid" (iat in its future).
    reader, mailer = keys.token("reader"), keys.token("mailer")
    clock = FakeClock()
    proxy = await make_proxy(policy=POLICY, extra=store(redis.url), clock=clock)
    async with aiohttp.ClientSession() as s:
        assert await status(s, "GET", proxy.base + "/v1/employees/1", reader) == 200
        await asyncio.to_thread(redis.stop)
        seen = len(upstream.seen)
        async with s.get(proxy.base + "/v1/employees/1", headers=auth(reader)) as r:
            assert r.status == 503
            raw = await r.read()
            body = orjson.loads(raw)
        assert body["type"].endswith("/store-unavailable")
        # The store's address and error text go to the operator's log, never to the agent.
        text = raw.decode()
        for secret in (str(redis.port), "127.0.0.1", "redis", "refused", "Error", "onnect"):
            assert secret not in text, secret
        # a rule without limits still needs the revocation list: refused once it is stale
        clock.advance(2.2)
        assert await status(s, "POST", proxy.base + "/v1/mail", mailer) == 503
        assert len(upstream.seen) == seen
        async with s.get(proxy.admin + "/metrics") as r:
            assert 'agentproxy_store_errors_total{op="reserve"}' in await r.text()

        await asyncio.to_thread(redis.restart)
        deadline = time.monotonic() + 3
        while await status(s, "POST", proxy.base + "/v1/mail", mailer) != 200:
            assert time.monotonic() < deadline, "the proxy did not recover by itself"
            await asyncio.sleep(0.1)


async def test_allow_cached_lets_memoized_allows_through(
    make_proxy: ProxyFactory, keys: Keys, make_redis_server: MakeRedisServer
) -> None:
    redis = make_redis_server()
    clock = FakeClock()
    proxy = await make_proxy(extra=store(redis.url, on_error="allow_cached"), clock=clock)
    known = keys.token("hr-bot")
    async with aiohttp.ClientSession() as s:
        assert await status(s, "GET", proxy.base + "/v1/employees/42", known) == 200
        await asyncio.to_thread(redis.stop)
        clock.advance(2.2)  # the revocation mirror is now stale
        assert await status(s, "GET", proxy.base + "/v1/employees/42", known) == 200
        # not memoized: a new credential, or a different action
        fresh = keys.token("hr-bot", jti="another-credential")
        assert await status(s, "GET", proxy.base + "/v1/employees/42", fresh) == 503
        assert await status(s, "GET", proxy.base + "/v1/employees/43", known) == 503
        # a memoized deny stays a deny
        assert await status(s, "GET", proxy.base + "/v1/employees/7/salary", known) == 403


async def test_a_proxy_started_before_its_redis_is_not_ready_until_redis_answers(
    keys: Keys, make_redis_server: MakeRedisServer, tmp_path: Path, upstream: Upstream
) -> None:
    """Kubernetes starts pods in any order: no crash loop, no traceback, not ready until the
    store answers, then ready by itself."""
    redis = make_redis_server()
    await asyncio.to_thread(redis.stop)
    config = write_config(tmp_path, keys, upstream.url, policy=POLICY, extra=store(redis.url))
    http_port, admin_port = pin_ports(config)
    log = tmp_path / "proxy.log"
    process = await spawn_proxy(config, log)
    reader = keys.token("reader")
    try:
        async with aiohttp.ClientSession() as s:
            deadline = time.monotonic() + 20
            while True:
                assert process.returncode is None, log.read_text()[-2000:]
                try:
                    async with s.get(f"http://127.0.0.1:{admin_port}/readyz") as r:
                        assert r.status == 503
                        break
                except aiohttp.ClientError:
                    assert time.monotonic() < deadline, "the admin listener never opened"
                    await asyncio.sleep(0.1)
            base = f"http://127.0.0.1:{http_port}"
            assert await status(s, "GET", base + "/v1/employees/1", reader) == 503
            await asyncio.sleep(1.5)
            assert process.returncode is None
            await asyncio.to_thread(redis.start)
            await wait_ready(s, admin_port, process, log, within=10)
            assert await status(s, "GET", base + "/v1/employees/1", reader) == 200
        text = log.read_text()
        assert "Traceback" not in text
        assert (
            f"store unreachable at start (redis start failed (redis://127.0.0.1:{redis.port}"
            in text
        )
        assert "store reached: ready" in text
    finally:
        process.terminate()
        await process.wait()


async def test_an_unreachable_cluster_at_start_is_one_clear_line(
    keys: Keys, tmp_path: Path, upstream: Upstream
) -> None:
    extra = "store: {redis: {cluster_nodes: ['127.0.0.1:1', '127.0.0.1:2'], timeout: 50ms}}"
    config = write_config(tmp_path, keys, upstream.url, policy=POLICY, extra=extra)
    _, admin_port = pin_ports(config)
    log = tmp_path / "proxy.log"
    process = await spawn_proxy(config, log)
    try:
        async with aiohttp.ClientSession() as s:
            deadline = time.monotonic() + 20
            while True:
                assert process.returncode is None, log.read_text()[-2000:]
                try:
                    async with s.get(f"http://127.0.0.1:{admin_port}/readyz") as r:
                        assert r.status == 503
                        break
                except aiohttp.ClientError:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.1)
        text = log.read_text()
        assert "Traceback" not in text
        assert "store unreachable at start" in text
        assert "cluster 127.0.0.1:1,127.0.0.1:2" in text
    finally:
        process.terminate()
        await process.wait()


@pytest.mark.parametrize("topology", ["sentinel", "cluster"])
async def test_a_fleet_on_sentinel_or_cluster_shares_limits_and_revocations(
    topology: str, request: pytest.FixtureRequest, make_proxy: ProxyFactory, keys: Keys
) -> None:
    if topology == "sentinel":
        sentinel: SentinelSetup = request.getfixturevalue("redis_sentinel")
        where = f"sentinel: {{service: {SENTINEL_SERVICE}, nodes: ['{sentinel.node}']}}"
    else:
        cluster: ClusterSetup = request.getfixturevalue("redis_cluster")
        where = f"cluster_nodes: {list(cluster.nodes)}"
    extra = (
        f"store: {{redis: {{{where}, key_prefix: 'fleet-{uuid.uuid4().hex[:8]}:'}}}}\n"
        'admin: {operators: ["role:security"]}'
    )
    a = await make_proxy(policy=POLICY, extra=extra)
    b = await make_proxy(policy=POLICY, extra=extra)
    reader = keys.token("reader")
    async with aiohttp.ClientSession() as s:
        got = [
            await status(s, "GET", proxy.base + "/v1/employees/1", reader) for proxy in (a, b, a, b)
        ]
        assert got == [200, 200, 200, 429]  # read-rate: 3 an hour per agent, fleet-wide
        hr = keys.token("hr-bot")
        assert await status(s, "GET", b.base + "/v1/employees/2", hr) == 200
        operator = keys.token("sec", roles=["security"])
        async with s.post(
            a.admin + "/v1/revocations", headers=auth(operator), json={"agent": "hr-bot"}
        ) as r:
            assert r.status == 201
        revoked_at = time.monotonic()
        while await status(s, "GET", b.base + "/v1/employees/2", hr) != 403:
            assert time.monotonic() - revoked_at < 1.5, "replica b did not see the revocation"
            await asyncio.sleep(0.02)
