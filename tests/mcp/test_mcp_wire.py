"""Hand-written JSON-RPC through the proxy to the real SDK server: batches, broken bodies,
gzip, oversized arguments, header/body disagreement, tool pinning."""

from __future__ import annotations

import gzip
from typing import Any

import aiohttp
import orjson
import pytest
from mcp.shared.exceptions import MCPError

from tests.conftest import Keys, Proxy, ProxyFactory
from tests.mcp.conftest import POLICY, McpUpstream
from tests.mcp.test_mcp_sdk import client

HEADERS = {
    "Accept": "application/json, text/event-stream",
    "Content-Type": "application/json",
    "MCP-Protocol-Version": "2025-03-26",
}


def call(i: int, tool: str, **arguments: Any) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": i,
        "method": "tools/call",
        "params": {"name": tool, "arguments": arguments},
    }


async def post(
    proxy: Proxy, token: str, body: bytes, **headers: str
) -> tuple[int, Any, dict[str, str]]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            proxy.base + "/mcp",
            data=body,
            headers={**HEADERS, "Authorization": f"Bearer {token}", **headers},
        ) as r,
    ):
        raw = await r.read()
        try:
            parsed: Any = orjson.loads(raw)
        except orjson.JSONDecodeError:
            parsed = raw.decode()
        return r.status, parsed, dict(r.headers)


async def test_a_batch_cannot_smuggle_a_denied_call(
    mcp_proxy: Proxy, mcp_upstream: McpUpstream, keys: Keys
) -> None:
    body = orjson.dumps([call(1, "lookup", id="1"), call(2, "admin_reset")])
    status, answer, _ = await post(mcp_proxy, keys.token("mcp-agent"), body)
    assert status == 200
    assert isinstance(answer, list) and [a["id"] for a in answer] == [1, 2]
    assert answer[1]["error"]["code"] == -32003
    assert answer[1]["error"]["data"]["rule"] == "no-admin-tools"
    assert "error" in answer[0]  # not forwarded either
    assert mcp_upstream.calls == []


async def test_unreadable_bodies_are_refused_never_forwarded(
    mcp_proxy: Proxy, mcp_upstream: McpUpstream, keys: Keys
) -> None:
    token = keys.token("mcp-agent")
    for body, headers in [
        (b"{not json", {}),
        (
            b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"lookup","name":"admin_reset"}}',
            {},
        ),
        (orjson.dumps(call(1, "lookup", id="1")), {"Content-Encoding": "br"}),
        (orjson.dumps(call(1, "lookup", id="1")), {"Content-Type": "text/plain"}),
        (
            orjson.dumps(call(1, "lookup", id="1")),
            {"Mcp-Method": "tools/call", "Mcp-Name": "admin_reset"},
        ),
    ]:
        status, _, _ = await post(mcp_proxy, token, body, **headers)
        assert status == 400, (body, headers)
    assert mcp_upstream.calls == []


async def test_gzip_bodies_are_authorized_on_their_content(
    mcp_proxy: Proxy, mcp_upstream: McpUpstream, keys: Keys
) -> None:
    token = keys.token("mcp-agent")
    status, answer, _ = await post(
        mcp_proxy,
        token,
        gzip.compress(orjson.dumps(call(1, "admin_reset"))),
        **{"Content-Encoding": "gzip"},
    )
    assert status == 200 and answer["error"]["code"] == -32003
    assert mcp_upstream.calls == []


async def test_oversized_arguments_are_413(
    make_proxy: ProxyFactory, mcp_upstream: McpUpstream, keys: Keys
) -> None:
    proxy = await make_proxy(
        policy=POLICY,
        upstream_url=mcp_upstream.url,
        upstream_extra="    protocol: mcp\n    max_body_bytes: 65536",
    )
    status, _, _ = await post(
        proxy, keys.token("mcp-agent"), orjson.dumps(call(1, "lookup", id="x" * 100_000))
    )
    assert status == 413
    assert mcp_upstream.calls == []


async def test_a_denied_tool_can_answer_as_a_tool_result(
    make_proxy: ProxyFactory, mcp_upstream: McpUpstream, keys: Keys
) -> None:
    proxy = await make_proxy(
        policy=POLICY,
        upstream_url=mcp_upstream.url,
        upstream_extra="    protocol: mcp\n    tool_errors: result",
    )
    status, answer, _ = await post(
        proxy, keys.token("mcp-agent"), orjson.dumps(call(9, "transfer", amount=500, to="x"))
    )
    assert status == 200
    assert answer["id"] == 9 and answer["result"]["isError"] is True
    assert "no rule allows mcp:tools/call/transfer" in answer["result"]["content"][0]["text"]


RESOURCE_POLICY = """
default: deny
rules:
  - id: tmp-files
    agents: [mcp-agent]
    actions: ["mcp:resources/read/file:///tmp/**"]
    effect: allow
  - id: no-etc
    agents: ["*"]
    actions: ["mcp:resources/read/file:///etc/**"]
    effect: deny
"""


def read(i: int, uri: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": i, "method": "resources/read", "params": {"uri": uri}}


async def test_resource_uris_are_matched_as_the_server_reads_them(
    make_proxy: ProxyFactory, mcp_upstream: McpUpstream, keys: Keys
) -> None:
    proxy = await make_proxy(
        policy=RESOURCE_POLICY, upstream_url=mcp_upstream.url, upstream_extra="    protocol: mcp"
    )
    token = keys.token("mcp-agent")
    for uri in (
        "file:///tmp/../etc/passwd",
        "file:///tmp/%2e%2e/etc/passwd",
        "file:///tmp/.%2E/etc/passwd",
        "file:///tmp/%2fetc/passwd",
        "file:///tmp/%252e%252e/etc/passwd",
        "FILE:///tmp/../etc/passwd",
    ):
        status, answer, _ = await post(proxy, token, orjson.dumps(read(1, uri)))
        assert status == 400 and answer["error"]["code"] == -32600, (uri, answer)
    assert mcp_upstream.calls == []
    # Through the official SDK client: the canonical spelling of a /tmp file is read, of an
    # /etc one denied by its rule.
    async with client(proxy, token, "legacy") as c:
        result = await c.read_resource("file:///tmp/notes")
        assert result.contents[0].text == "contents of /tmp/notes"  # type: ignore[union-attr]
        with pytest.raises(MCPError) as denied:
            await c.read_resource("file:///etc/passwd")
        assert denied.value.code == -32003
    assert mcp_upstream.calls == ["read /tmp/notes"]
