"""The MCP example's agent: the official MCP Python SDK client, through agentproxy.

python examples/mcp/client.py TOKEN [--url http://127.0.0.1:8082/mcp]

The token goes where a client puts its credential: the Authorization header (Claude Code's
--header, VS Code's "headers", Cursor's "headers"); agentproxy verifies it, and the MCP
server behind it never sees it.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import httpx2
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from mcp import Client


async def run(url: str, token: str) -> list[str]:
    lines = []
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30)
    async with http, Client(streamable_http_client(url, http_client=http)) as client:
        tools = sorted(t.name for t in (await client.list_tools()).tools)
        lines.append(f"tools this agent may call: {', '.join(tools)}")
        found = await client.call_tool("search_employees", {"text": "gra"})
        lines.append(f"search_employees: {found.content[0].text}")  # type: ignore[union-attr]
        paid = await client.call_tool("pay_bonus", {"id": "42", "amount": 100})
        lines.append(f"pay_bonus 100: {paid.content[0].text}")  # type: ignore[union-attr]
        for name, arguments in (("pay_bonus", {"id": "42", "amount": 5000}), ("delete_all", {})):
            try:
                await client.call_tool(name, arguments)
                lines.append(f"{name}: allowed?!")
            except MCPError as exc:
                lines.append(f"{name}: refused ({exc.code}): {exc}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("token")
    parser.add_argument("--url", default="http://127.0.0.1:8082/mcp")
    args = parser.parse_args()
    for line in asyncio.run(run(args.url, args.token)):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
