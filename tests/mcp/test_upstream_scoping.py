"""Two MCP servers with a tool of the same name are told apart (issue 20.8): a rule can be
scoped to upstreams (`upstreams: [...]`) or read `action.upstream`, a memoized decision for one
is never served for the other, and an approval of one server's call never releases the
other's."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from agentproxy.config import ConfigError
from agentproxy.proxy.runtime import check, load_config
from tests.conftest import AUDIENCE, ISSUER, Keys, start_app
from tests.proxy.conftest import CustomProxyFactory

POLICY = """
rules:
  - id: hr-export
    agents: [mcp-agent]
    upstreams: [hr-tools]
    actions: ["mcp:tools/call/export"]
    effect: allow
  - id: finance-export
    agents: [mcp-agent]
    actions: ["mcp:tools/call/export"]
    when: 'action.upstream == "finance-tools"'
    effect: require_approval
    approval: {approvers: ["role:finance"], hold: 0s}
"""


def config(hr: str, finance: str, policy_files: str = "[policy.yaml]") -> str:
    return f"""
listen: {{http: "127.0.0.1:0", admin: "127.0.0.1:0"}}
upstreams:
  - {{name: hr-tools, url: "{hr}", protocol: mcp, match: {{path_prefix: /hr}}, endpoint: /hr/mcp}}
  - name: finance-tools
    url: "{finance}"
    protocol: mcp
    match: {{path_prefix: /finance}}
    endpoint: /finance/mcp
identity:
  issuers: [{{issuer: "{ISSUER}", audiences: [{AUDIENCE}], public_key_file: issuer.pem,
             algorithms: [RS256]}}]
policy_files: {policy_files}
decision_log: "off"
"""


@pytest.fixture
async def servers() -> AsyncIterator[dict[str, Any]]:
    """Two minimal MCP servers (JSON answers), each recording the tools it ran."""
    state: dict[str, Any] = {"calls": []}
    runners = []
    for name in ("hr", "finance"):

        async def handle(request: web.Request, name: str = name) -> web.Response:
            message = await request.json()
            state["calls"].append((name, message["params"]["name"]))
            result = {"content": [{"type": "text", "text": f"{name} exported"}]}
            return web.json_response({"jsonrpc": "2.0", "id": message["id"], "result": result})

        app = web.Application()
        app.router.add_post(f"/{name}/mcp", handle)
        runner, port = await start_app(app)
        runners.append(runner)
        state[name] = f"http://127.0.0.1:{port}"
    try:
        yield state
    finally:
        for runner in runners:
            await runner.cleanup()


async def export(s: aiohttp.ClientSession, url: str, token: str) -> dict[str, Any]:
    body = {"jsonrpc": "2.0", "id": 7, "method": "tools/call"}
    body["params"] = {"name": "export", "arguments": {}}
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    async with s.post(url, json=body, headers=headers) as r:
        assert r.status == 200
        answer: dict[str, Any] = orjson.loads(await r.read())
        return answer


async def test_rules_and_approvals_tell_two_servers_apart(
    custom_proxy: CustomProxyFactory, keys: Keys, servers: dict[str, Any]
) -> None:
    proxy = await custom_proxy(
        config(servers["hr"], servers["finance"]),
        {"issuer.pem": keys.public_pem, "policy.yaml": POLICY.encode()},
    )
    token = keys.token("mcp-agent")
    async with aiohttp.ClientSession() as s:
        for _ in range(2):  # the second is memoized: for hr-tools only
            assert "result" in await export(s, proxy.base + "/hr/mcp", token)
        pending = await export(s, proxy.base + "/finance/mcp", token)
        assert pending["error"]["code"] == -32004  # approval pending, not hr's allow
        approval_id = pending["error"]["data"]["approval_id"]
        finance = {"Authorization": f"Bearer {keys.token('carol', roles=['finance'])}"}
        async with s.get(f"{proxy.admin}/v1/approvals/{approval_id}", headers=finance) as r:
            assert (await r.json())["upstream"] == "finance-tools"
        async with s.post(
            f"{proxy.admin}/v1/approvals/{approval_id}/approve", headers=finance, json={}
        ) as r:
            assert r.status == 200
        assert "result" in await export(s, proxy.base + "/finance/mcp", token)
        # The finance approval released one finance call; hr's allow never covered it.
        assert "error" in await export(s, proxy.base + "/finance/mcp", token)
    assert servers["calls"] == [("hr", "export"), ("hr", "export"), ("finance", "export")]


def test_a_rule_scoped_to_an_unknown_upstream_is_refused_at_load(
    tmp_path: Path, keys: Keys
) -> None:
    (tmp_path / "issuer.pem").write_bytes(keys.public_pem)
    (tmp_path / "policy.yaml").write_text(POLICY.replace("[hr-tools]", "[hr-tool]"))
    (tmp_path / "agentproxy.yaml").write_text(config("http://127.0.0.1:1", "http://127.0.0.1:2"))
    with pytest.raises(ConfigError) as caught:
        check(load_config(tmp_path / "agentproxy.yaml"))
    assert "rule hr-export.upstreams: no upstream is named 'hr-tool'" in str(caught.value)
