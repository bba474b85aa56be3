"""Large and compressed MCP bodies through the proxy to the official SDK server: read off the
loop and decided on what they hold, the default 1 MiB cap, colliding keys refused."""

from __future__ import annotations

import gzip
import io

import aiohttp
import orjson
import pytest
from mcp.shared.exceptions import MCPError

from agentproxy.proxy.offload import INLINE_BYTES
from tests.conftest import Keys, Proxy
from tests.mcp.conftest import McpUpstream
from tests.mcp.test_mcp_sdk import client, error_of
from tests.mcp.test_mcp_wire import HEADERS, call, post


async def test_large_calls_are_decided_on_their_arguments(
    mcp_proxy: Proxy, mcp_upstream: McpUpstream, keys: Keys
) -> None:
    big = "x" * (8 * INLINE_BYTES)
    async with client(mcp_proxy, keys.token("mcp-agent"), "legacy") as c:
        result = await c.call_tool("lookup", {"id": big})
        assert not result.is_error and error_of(result) == f"record {big}"
        with pytest.raises(MCPError) as denied:
            await c.call_tool("transfer", {"amount": 5000, "to": big})
        assert denied.value.code == -32003
        assert not (await c.call_tool("transfer", {"amount": 50, "to": big})).is_error
    assert mcp_upstream.calls == ["lookup", "transfer"]


async def test_gzip_calls_are_read_and_forwarded_decoded(
    mcp_proxy: Proxy, mcp_upstream: McpUpstream, keys: Keys
) -> None:
    token = keys.token("mcp-agent")
    message = call(3, "lookup", id="7")
    message["params"]["_meta"] = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
    }
    packed = gzip.compress(orjson.dumps(message))
    # 2026-07-28: stateless, so one POST is a whole call (no session to set up first).
    headers = {
        "Content-Encoding": "gzip",
        "MCP-Protocol-Version": "2026-07-28",
        "Mcp-Method": "tools/call",
        "Mcp-Name": "lookup",
    }
    status, answer, _ = await post(mcp_proxy, token, packed, **headers)
    assert status == 200 and "record 7" in str(answer), answer
    assert mcp_upstream.calls == ["lookup"]


async def test_the_default_cap_is_one_mebibyte(
    mcp_proxy: Proxy, mcp_upstream: McpUpstream, keys: Keys
) -> None:
    token = keys.token("mcp-agent")
    over = orjson.dumps(call(1, "lookup", id="x" * (1 << 20)))
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            mcp_proxy.base + "/mcp",
            data=io.BytesIO(over),  # aiohttp warns about bytes this large
            headers={**HEADERS, "Authorization": f"Bearer {token}"},
        ) as r,
    ):
        assert r.status == 413
        answer = orjson.loads(await r.read())
    assert "max_body_bytes of upstream tool" in answer["error"]["message"]
    # A bomb: 1 MiB inflated is where it stops, far below the 60 MB it would become.
    bomb = gzip.compress(orjson.dumps(call(1, "lookup", id="0" * 60_000_000)), compresslevel=9)
    status, answer, _ = await post(mcp_proxy, token, bomb, **{"Content-Encoding": "gzip"})
    assert status == 413
    assert mcp_upstream.calls == []


async def test_keys_one_case_apart_are_refused_before_the_server(
    mcp_proxy: Proxy, mcp_upstream: McpUpstream, keys: Keys
) -> None:
    body = (
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call",'
        b'"params":{"name":"transfer","arguments":{"amount":50,"to":"bob","AMOUNT":5000}}}'
    )
    status, answer, _ = await post(mcp_proxy, keys.token("mcp-agent"), body)
    assert status == 400 and answer["error"]["code"] == -32700
    assert mcp_upstream.calls == []
