"""`make run`: the demo upstream and the proxy in front of it, on the embedded default.

Creates a demo token issuer key (examples/demo/.keys/, never committed), starts the HR API
on :8000 and `agentproxy run` on :8080 (admin :9901), and prints what to try. Other ports:
`make run HTTP_PORT=18080 ADMIN_PORT=19901 TOOL_PORT=18000` (or --http-port, …); a port
already taken is said in one line, and nothing starts.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
ISSUER = "https://idp.demo.local"


def taken(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def ready(admin: int, processes: list[subprocess.Popen[bytes]], seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in processes):
            return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=1) as r:
                if r.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    return False


def main() -> int:
    parser = argparse.ArgumentParser(description="the agentproxy demo")
    env = os.environ
    parser.add_argument("--http-port", type=int, default=int(env.get("HTTP_PORT") or 8080))
    parser.add_argument("--admin-port", type=int, default=int(env.get("ADMIN_PORT") or 9901))
    parser.add_argument("--tool-port", type=int, default=int(env.get("TOOL_PORT") or 8000))
    args = parser.parse_args()
    ports = {
        "HTTP_PORT": args.http_port,
        "ADMIN_PORT": args.admin_port,
        "TOOL_PORT": args.tool_port,
    }
    busy = [f"{port} ({name})" for name, port in ports.items() if taken(port)]
    if busy:
        free = " ".join(f"{name}={free_port()}" for name in ports)
        print(
            f"cannot start the demo: port {', '.join(busy)} is taken; free it, or run e.g. "
            f"make run {free}",
            file=sys.stderr,
        )
        return 1
    from agentproxy.identity.issue import generate_demo_keypair

    keys = HERE / ".keys"
    if not (keys / "issuer.pem").exists():
        keys.mkdir(exist_ok=True)
        generate_demo_keypair(keys / "issuer.pem", keys / "issuer.pub.pem")
    http, admin, tool = args.http_port, args.admin_port, args.tool_port
    # The demo config on these ports, beside the original (its paths are relative to it).
    config = HERE / ".run.yaml"
    config.write_text(
        (HERE / "agentproxy.yaml")
        .read_text()
        .replace("127.0.0.1:8080", f"127.0.0.1:{http}")
        .replace("127.0.0.1:9901", f"127.0.0.1:{admin}")
        .replace("127.0.0.1:8000", f"127.0.0.1:{tool}")
    )
    # `kill` of this script stops the demo too (finally, below), not only Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    upstream = subprocess.Popen(
        [
            sys.executable,
            str(HERE / "upstream.py"),
            "--port",
            str(tool),
            "--jwks-url",
            f"http://127.0.0.1:{admin}/.well-known/jwks.json",
        ],
        cwd=HERE,
    )
    proxy = subprocess.Popen([str(BIN / "agentproxy"), "run", "--config", str(config)])
    try:
        if not ready(admin, [proxy, upstream]):
            print("the demo did not start: see the lines above", file=sys.stderr)
            return 1
        print(instructions(http, admin, config), flush=True)
        while proxy.poll() is None and upstream.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for process in (proxy, upstream):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in (proxy, upstream):
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
    return proxy.returncode or 0


def instructions(http: int, admin: int, config: Path) -> str:
    ap = f"{BIN / 'agentproxy'}"
    key = HERE / ".keys" / "issuer.pem"
    mint = f"{ap} token --key {key} --issuer {ISSUER} --audience agentproxy"
    base, adm = f"http://127.0.0.1:{http}", f"http://127.0.0.1:{admin}"
    return f"""
agentproxy demo is running (Ctrl-C stops it)
  data plane  {base}   -> the demo HR API
  admin       {adm}/metrics  /healthz  /readyz  /.well-known/jwks.json  /ui/approvals

Mint a demo token for the agent "hr-bot" with role "hr" (its api_key, for an SDK):
  TOKEN=$({mint} --agent hr-bot --role hr)

Then try:
  curl -s -H "Authorization: Bearer $TOKEN" {base}/v1/employees/42          # allowed, salary removed
  curl -s -H "Authorization: Bearer $TOKEN" {base}/v1/employees/42/salary   # denied (403)
  curl -s -H "Authorization: Bearer $TOKEN" {base}/v1/employees/1           # denied by a CEL condition
  curl -s {base}/v1/employees/42                                            # no token (401)

Why was that denied? The serving code's own answer, with the values its conditions read:
  {ap} explain --config {config} --token "$TOKEN" --request "GET /v1/employees/1"

HR updates need the hr department claim:
  DEPT=$({mint} --agent hr-bot --role hr --claim dept=hr)
  curl -s -X PUT -H "Authorization: Bearer $DEPT" {base}/v1/employees/42 -H "Content-Type: application/json" -d '{{}}'

The onboarding workflow changes a title and a phone, nothing else (the body is policy's args):
  curl -s -X PATCH -H "Authorization: Bearer $TOKEN" -H "Content-Type: application/json" \
       -d '{{"title": "Staff Engineer"}}' {base}/v1/employees/42              # allowed
  curl -s -X PATCH -H "Authorization: Bearer $TOKEN" -H "Content-Type: application/json" \
       -d '{{"salary": 1000000}}' {base}/v1/employees/42                     # denied (403)

An assistant acting for alice (RFC 8693 delegation):
  ALICE=$({mint} --agent assistant --for-user alice)
  curl -s -H "Authorization: Bearer $ALICE" {base}/v1/employees/alice       # allowed: its own user
  curl -s -H "Authorization: Bearer $ALICE" {base}/v1/employees             # her direct reports, no salaries

Deleting a record needs an HR lead's approval, round trip:
  curl -s -X DELETE -H "Authorization: Bearer $TOKEN" {base}/v1/employees/43   # held 20 s, then 403 pending
  LEAD=$({mint} --agent lead --role hr-lead)
  {ap} approvals list --admin {adm} --token "$LEAD"                          # the approval's id
  {ap} approvals approve ID --admin {adm} --token "$LEAD" --reason "checked"
  curl -s -X DELETE -H "Authorization: Bearer $TOKEN" {base}/v1/employees/43   # the same call: 200, once
  # or open {adm}/ui/approvals#token=$LEAD and approve there

The kill switch: an operator revokes hr-bot, and its next call is refused everywhere:
  OPS=$({mint} --agent ops --role security)
  curl -s -X POST -H "Authorization: Bearer $OPS" {adm}/v1/revocations -d '{{"agent": "hr-bot", "reason": "demo"}}'
  curl -s -H "Authorization: Bearer $TOKEN" {base}/v1/employees/42          # 403 revoked
"""


if __name__ == "__main__":
    sys.exit(main())
