"""End to end through a real proxy: allow, deny, default deny, deny-overrides, CEL, delegation."""

from __future__ import annotations

import aiohttp
import orjson

from tests.conftest import UPSTREAM_SECRET, Keys, Proxy, Upstream


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_allowed_call_reaches_upstream_with_context(
    proxy: Proxy, upstream: Upstream, keys: Keys
) -> None:
    async with (
        aiohttp.ClientSession() as s,
        s.get(proxy.base + "/v1/employees/42", headers=bearer(keys.token())) as r,
    ):
        assert r.status == 200
        assert (await r.json())["path"] == "/v1/employees/42"
    seen = upstream.seen[-1]
    h = {k.lower(): v for k, v in seen.headers.items()}
    assert h["x-agentproxy-agent"] == "hr-bot"
    assert h["x-api-key"] == UPSTREAM_SECRET
    assert "authorization" not in h
    assert "x-agentproxy-context" in h
    assert len(h["x-agentproxy-decision"]) == 24


async def test_cel_condition_on_path_param_denies(
    proxy: Proxy, upstream: Upstream, keys: Keys
) -> None:
    async with (
        aiohttp.ClientSession() as s,
        s.get(proxy.base + "/v1/employees/13", headers=bearer(keys.token())) as r,
    ):
        assert r.status == 403
        assert r.content_type == "application/problem+json"
        body = orjson.loads(await r.read())
    assert body["type"].endswith("/denied")
    assert body["decision_id"]
    assert upstream.seen == []
