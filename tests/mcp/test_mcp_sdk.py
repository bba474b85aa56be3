"""The official MCP SDK client talking to the official SDK server through agentproxy, in both
protocol generations: the legacy handshake and the 2026-07-28 stateless mode."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx2
import pytest
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from mcp import Client
from tests.conftest import Keys, Proxy
from tests.mcp.conftest import McpUpstream

MODES = ["legacy", "auto"]


@asynccontextmanager
async def client(proxy: Proxy, token: str, mode: str) -> AsyncIterator[Client]:
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=10)
    transport = streamable_http_client(proxy.base + "/mcp", http_client=http)
    async with http, Client(transport, mode=mode) as c:
        yield c


def error_of(result: Any) -> str:
    return " ".join(getattr(part, "text", "") for part in result.content)


@pytest.mark.parametrize("mode", MODES)
async def test_listing_shows_only_usable_tools_and_calls_are_authorized(
    mcp_proxy: Proxy, mcp_upstream: McpUpstream, keys: Keys, mode: str
) -> None:
    async with client(mcp_proxy, keys.token("mcp-agent"), mode) as c:
        names = sorted(t.name for t in (await c.list_tools()).tools)
        # admin_reset is denied outright, unlisted_secret has no rule: both hidden
        assert names == ["lookup", "slow", "transfer"]
        result = await c.call_tool("lookup", {"id": "7"})
        assert not result.is_error and error_of(result) == "record 7"

        small = await c.call_tool("transfer", {"amount": 50, "to": "bob"})
        assert not small.is_error
        with pytest.raises(MCPError) as denied:
            await c.call_tool("transfer", {"amount": 5000, "to": "mallory"})
        assert denied.value.code == -32003
        assert "no rule allows mcp:tools/call/transfer" in str(denied.value)
        with pytest.raises(MCPError) as admin:
            await c.call_tool("admin_reset", {})
        assert admin.value.code == -32003
        assert "admin tools are not for agents" in str(admin.value)
    assert mcp_upstream.calls == ["lookup", "transfer"]


@pytest.mark.parametrize("mode", MODES)
async def test_ops_sees_and_uses_admin_tools(
    mcp_proxy: Proxy, mcp_upstream: McpUpstream, keys: Keys, mode: str
) -> None:
    async with client(mcp_proxy, keys.token("ops-bot", roles=["ops"]), mode) as c:
        names = {t.name for t in (await c.list_tools()).tools}
        # deny-overrides: no-admin-tools denies everyone unconditionally, ops included
        assert "admin_reset" not in names
        with pytest.raises(MCPError):
            await c.call_tool("admin_reset", {})
    assert mcp_upstream.calls == []


async def test_progress_notifications_stream_through(
    mcp_proxy: Proxy, mcp_upstream: McpUpstream, keys: Keys
) -> None:
    seen = asyncio.Event()

    async def progress(progress: float, total: float | None, message: str | None) -> None:
        seen.set()

    async with client(mcp_proxy, keys.token("mcp-agent"), "legacy") as c:
        call = asyncio.ensure_future(c.call_tool("slow", {}, progress_callback=progress))
        # the progress event reaches the client while the tool is still running
        await asyncio.wait_for(seen.wait(), 5)
        assert not call.done()
        mcp_upstream.release.set()
        result = await asyncio.wait_for(call, 5)
        assert error_of(result) == "done"


async def test_no_token_is_401_before_any_json_rpc(
    mcp_proxy: Proxy, mcp_upstream: McpUpstream
) -> None:
    async with httpx2.AsyncClient() as http:
        r = await http.post(
            mcp_proxy.base + "/mcp",
            content=b"not even json",
            headers={"Content-Type": "application/json"},
        )
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert mcp_upstream.calls == []
