"""Reload builds a whole new snapshot or keeps the old one; calls in flight keep theirs."""

from __future__ import annotations

import asyncio

import aiohttp

from tests.conftest import DEFAULT_POLICY, Keys, Proxy, ProxyFactory, Upstream


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not found")


async def test_valid_reload_takes_effect_and_broken_one_is_rejected(
    proxy: Proxy, keys: Keys
) -> None:
    headers = {"Authorization": f"Bearer {keys.token()}"}
    policy_file = proxy.dir / "policies" / "main.yaml"
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.base + "/v1/employees/42", headers=headers) as r:
            assert r.status == 200
        old_version = proxy.server.pipeline.runtime.policy.version

        policy_file.write_text(DEFAULT_POLICY.replace('resource.id != "13"', 'resource.id != "42"'))
        assert await proxy.server.reload()
        assert proxy.server.pipeline.runtime.policy.version != old_version
        async with s.get(proxy.base + "/v1/employees/42", headers=headers) as r:
            assert r.status == 403

        policy_file.write_text(
            DEFAULT_POLICY + "  - id: broken\n    agents: [x]\n    actions: [nope]\n"
        )
        assert not await proxy.server.reload()
        async with s.get(proxy.base + "/v1/employees/42", headers=headers) as r:
            assert r.status == 403  # the last good policy still answers
        async with s.get(proxy.admin + "/metrics") as r:
            text = await r.text()
    assert metric(text, 'agentproxy_policy_reloads_total{result="success"}') == 2.0
    assert metric(text, 'agentproxy_policy_reloads_total{result="failure"}') == 1.0


async def test_call_in_flight_keeps_the_snapshot_it_started_with(
    proxy: Proxy, keys: Keys, upstream: Upstream
) -> None:
    headers = {"Authorization": f"Bearer {keys.token()}"}
    async with aiohttp.ClientSession() as s:
        slow = asyncio.ensure_future(s.get(proxy.base + "/slow?s=0.5", headers=headers))
        while not upstream.seen:  # noqa: ASYNC110 - the upstream fixture records, it does not signal
            await asyncio.sleep(0.01)
        (proxy.dir / "policies" / "main.yaml").write_text("default: deny\nrules: []\n")
        assert await proxy.server.reload()
        response = await slow
        assert response.status == 200
        response.release()
        async with s.get(proxy.base + "/slow?s=0", headers=headers) as r:
            assert r.status == 403


async def test_operators_reload_through_the_admin_api(make_proxy: ProxyFactory, keys: Keys) -> None:
    proxy = await make_proxy(extra='admin: {operators: ["role:ops"]}')
    operator = {"Authorization": f"Bearer {keys.token('op', roles=['ops'])}"}
    before = proxy.server.pipeline.runtime.policy.version
    (proxy.dir / "policies" / "main.yaml").write_text(DEFAULT_POLICY + "# changed\n")
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.admin + "/v1/reload") as r:
            assert r.status == 401
        async with s.post(
            proxy.admin + "/v1/reload", headers={"Authorization": f"Bearer {keys.token()}"}
        ) as r:
            assert r.status == 403
        async with s.post(proxy.admin + "/v1/reload", headers=operator) as r:
            assert r.status == 200
            body = await r.json()
        assert body["reloaded"] is True and body["policy_version"] != before
        (proxy.dir / "policies" / "main.yaml").write_text("rules: [{id: x}]\n")
        async with s.post(proxy.admin + "/v1/reload", headers=operator) as r:
            assert r.status == 422
            assert (await r.json())["policy_version"] == body["policy_version"]
