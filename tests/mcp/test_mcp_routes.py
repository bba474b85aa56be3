"""Through an MCP upstream, only its MCP endpoint is reached as MCP (issue 20.1).

The MCP action names the JSON-RPC method, so a request to any other path of the server (the
SDK's `custom_route`s: exports, admin hooks, DELETE on a sub-path) must not ride on the MCP
baseline rule: it is an ordinary `http:` action, decided as such (default deny), and a
JSON-RPC `ping` in its body changes nothing.
"""

from __future__ import annotations

import aiohttp
import orjson

from tests.conftest import Keys, Proxy, ProxyFactory
from tests.mcp.conftest import POLICY, McpUpstream

PING = orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping"})
JSON = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_other_routes_of_an_mcp_server_are_decided_as_http(
    mcp_proxy: Proxy, mcp_upstream: McpUpstream, keys: Keys
) -> None:
    token = keys.token("mcp-agent")
    attempts = [
        ("GET", "/admin/export", b""),
        ("POST", "/admin/reset", PING),  # a ping body does not make it MCP
        ("DELETE", "/mcp/users/42", b""),
        ("POST", "/mcp/users/42", PING),
        ("GET", "/admin/export?format=csv", b""),
    ]
    async with aiohttp.ClientSession() as s:
        for method, path, body in attempts:
            async with s.request(
                method, mcp_proxy.base + path, data=body, headers=bearer(token) | JSON
            ) as r:
                assert r.status == 403, (method, path, await r.text())
                problem = await r.json(content_type=None)
                assert r.content_type == "application/problem+json"
                assert "rule" not in problem  # the default deny: no rule allows it
    assert mcp_upstream.calls == []


async def test_a_query_on_the_mcp_endpoint_is_refused(
    mcp_proxy: Proxy, mcp_upstream: McpUpstream, keys: Keys
) -> None:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            mcp_proxy.base + "/mcp?session=other",
            data=PING,
            headers=bearer(keys.token("mcp-agent")) | JSON,
        ) as r,
    ):
        assert r.status == 400
    assert mcp_upstream.calls == []


async def test_an_http_rule_can_open_one_route_of_an_mcp_server(
    make_proxy: ProxyFactory, mcp_upstream: McpUpstream, keys: Keys
) -> None:
    policy = (
        POLICY
        + """
  - id: ops-export
    agents: ["role:ops"]
    actions: ["http:GET /admin/export"]
    effect: allow
"""
    )
    proxy = await make_proxy(
        policy=policy, upstream_url=mcp_upstream.url, upstream_extra="    protocol: mcp"
    )
    async with aiohttp.ClientSession() as s:
        ops = bearer(keys.token("ops-1", roles=["ops"]))
        async with s.get(proxy.base + "/admin/export", headers=ops) as r:
            assert r.status == 200 and (await r.json())["exported"] == "everything"
        async with s.post(proxy.base + "/admin/reset", data=PING, headers=ops | JSON) as r:
            assert r.status == 403
    assert mcp_upstream.calls == ["GET /admin/export"]
