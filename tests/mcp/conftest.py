"""A real MCP server (the official SDK's MCPServer over Streamable HTTP, served by uvicorn on a
free port) and an agentproxy in front of it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tests.conftest import Proxy, ProxyFactory
from tests.harness.processes import free_port

POLICY = """
default: deny
rules:
  - id: read-tools
    agents: [mcp-agent]
    actions: ["mcp:tools/call/lookup", "mcp:tools/call/slow"]
    effect: allow
  - id: small-transfers
    agents: [mcp-agent]
    actions: ["mcp:tools/call/transfer"]
    when: "args.amount <= 100"
    effect: allow
    reason: transfers above 100 need a human
  - id: no-admin-tools
    agents: ["*"]
    actions: ["mcp:tools/call/admin_*"]
    effect: deny
    reason: admin tools are not for agents
  - id: admin-for-ops
    agents: ["role:ops"]
    actions: ["mcp:tools/call/admin_*"]
    effect: allow
"""


@dataclass
class McpUpstream:
    url: str
    calls: list[str] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    description: list[str] = field(default_factory=lambda: ["Look a record up by id."])


def build_server(state: McpUpstream) -> MCPServer:
    server = MCPServer("hr-tools")

    @server.tool(description="Look a record up by id.")
    def lookup(id: str) -> str:
        state.calls.append("lookup")
        return f"record {id}"

    @server.tool()
    def transfer(amount: float, to: str) -> str:
        state.calls.append("transfer")
        return f"sent {amount} to {to}"

    @server.tool()
    def admin_reset() -> str:
        state.calls.append("admin_reset")
        return "reset"

    @server.resource("file:///tmp/{name}")
    def tmp_file(name: str) -> str:
        state.calls.append(f"read /tmp/{name}")
        return f"contents of /tmp/{name}"

    @server.tool()
    def unlisted_secret() -> str:
        state.calls.append("unlisted_secret")
        return "secret"

    # Routes beside the MCP endpoint, as servers add them (health, exports, admin hooks).
    async def export(request: Request) -> Response:
        state.calls.append("GET /admin/export")
        return JSONResponse({"exported": "everything"})

    async def reset(request: Request) -> Response:
        state.calls.append("POST /admin/reset")
        return JSONResponse({"reset": True})

    async def delete_user(request: Request) -> Response:
        state.calls.append(f"DELETE /mcp/users/{request.path_params['id']}")
        return JSONResponse({"deleted": request.path_params["id"]})

    server.custom_route("/admin/export", methods=["GET"])(export)
    server.custom_route("/admin/reset", methods=["POST"])(reset)
    server.custom_route("/mcp/users/{id}", methods=["DELETE"])(delete_user)

    @server.tool()
    async def slow(ctx: Context) -> str:
        state.calls.append("slow")
        await ctx.report_progress(1, 2, "half way")
        await state.release.wait()
        return "done"

    return server


@asynccontextmanager
async def serving(app: Any, port: int) -> AsyncIterator[None]:
    """An ASGI app (an SDK server's Streamable HTTP app) served by uvicorn on `port`."""
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    task = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 - uvicorn offers no event for this
        await asyncio.sleep(0.02)
    try:
        yield
    finally:
        server.should_exit = True
        await task


@pytest.fixture
async def mcp_upstream() -> AsyncIterator[McpUpstream]:
    port = free_port()
    state = McpUpstream(url=f"http://127.0.0.1:{port}")
    async with serving(build_server(state).streamable_http_app(), port):
        try:
            yield state
        finally:
            state.release.set()  # a tool still waiting must not hold the server open


@pytest.fixture
async def mcp_proxy(make_proxy: ProxyFactory, mcp_upstream: McpUpstream) -> Proxy:
    return await make_proxy(
        policy=POLICY, upstream_url=mcp_upstream.url, upstream_extra="    protocol: mcp"
    )
