"""The MCP example: the HR MCP server on :8100 and agentproxy in front of it on :8082.

python examples/mcp/run.py      # Ctrl-C stops both
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
ISSUER = "https://idp.demo.local"


def main() -> int:
    from agentproxy.identity.issue import generate_demo_keypair

    keys = HERE / ".keys"
    if not (keys / "issuer.pem").exists():
        keys.mkdir(exist_ok=True)
        generate_demo_keypair(keys / "issuer.pem", keys / "issuer.pub.pem")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server = subprocess.Popen([sys.executable, str(HERE / "server.py")], cwd=HERE)
    proxy = subprocess.Popen(
        [str(BIN / "agentproxy"), "run", "--config", str(HERE / "agentproxy.yaml")]
    )
    try:
        for _ in range(300):
            if proxy.poll() is not None or server.poll() is not None:
                print("the MCP example did not start: see the lines above", file=sys.stderr)
                return 1
            try:
                with urllib.request.urlopen("http://127.0.0.1:9914/readyz", timeout=1):
                    break
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        ap, key = BIN / "agentproxy", keys / "issuer.pem"
        mint = f"{ap} token --key {key} --issuer {ISSUER} --audience agentproxy"
        print(
            f"""
agentproxy MCP example is running (Ctrl-C stops it)
  MCP endpoint  http://127.0.0.1:8082/mcp  -> the HR MCP server on http://127.0.0.1:8100/mcp

An agent's token (what a client sends as its credential):
  TOKEN=$({mint} --agent hr-bot --role hr)

The official SDK client, through the proxy (tools/list filtered, calls decided):
  {sys.executable} {HERE / "client.py"} "$TOKEN"

Claude Code:
  claude mcp add --transport http hr http://127.0.0.1:8082/mcp --header "Authorization: Bearer $TOKEN"
VS Code (.vscode/mcp.json) and Cursor (~/.cursor/mcp.json):
  {{"servers": {{"hr": {{"type": "http", "url": "http://127.0.0.1:8082/mcp",
                      "headers": {{"Authorization": "Bearer <TOKEN>"}}}}}}}}
  (Cursor names the map "mcpServers")
MCP Inspector:
  npx @modelcontextprotocol/inspector   # Streamable HTTP, http://127.0.0.1:8082/mcp, header Authorization

A bonus above 500 waits for an HR lead:
  LEAD=$({mint} --agent lead --role hr-lead)
  {ap} approvals list --admin http://127.0.0.1:9914 --token "$LEAD"
""",
            flush=True,
        )
        while proxy.poll() is None and server.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for process in (proxy, server):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in (proxy, server):
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
    return proxy.returncode or 0


if __name__ == "__main__":
    sys.exit(main())
