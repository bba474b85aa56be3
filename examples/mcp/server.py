"""The MCP example's server: HR tools on the official MCP Python SDK, Streamable HTTP on
127.0.0.1:8100/mcp (only the proxy in front of it should be reachable in a real deployment).

python examples/mcp/server.py [--port 8100]
"""

from __future__ import annotations

import argparse
import sys

import uvicorn
from mcp.server.mcpserver import MCPServer

EMPLOYEES = {
    "42": {"id": "42", "name": "Grace", "title": "Engineer"},
    "43": {"id": "43", "name": "Linus", "title": "Engineer"},
}


def build() -> MCPServer:
    server = MCPServer("hr-tools")

    @server.tool(description="Find employees whose name contains the text.")
    def search_employees(text: str) -> list[dict[str, str]]:
        return [e for e in EMPLOYEES.values() if text.lower() in e["name"].lower()]

    @server.tool(description="One employee's record by id.")
    def get_employee(id: str) -> dict[str, str]:
        return EMPLOYEES.get(id, {"error": "no such employee"})

    @server.tool(description="Pay a bonus to an employee.")
    def pay_bonus(id: str, amount: float) -> str:
        return f"paid {amount:g} to employee {id}"

    @server.tool(description="Delete every record (never for agents).")
    def delete_all() -> str:
        EMPLOYEES.clear()
        return "deleted"

    return server


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args()
    app = build().streamable_http_app()
    print(f"hr MCP server on http://127.0.0.1:{args.port}/mcp", flush=True)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
