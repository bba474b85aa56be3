"""`make run`: the demo upstream and the proxy in front of it, on the embedded default.

Creates a demo token issuer key (examples/demo/.keys/, never committed), starts the HR API
on :8000 and `agentproxy run` on :8080 (admin :9901), and prints what to try.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
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
    # `kill` of this script stops the demo too (finally, below), not only Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    upstream = subprocess.Popen([sys.executable, str(HERE / "upstream.py")], cwd=HERE)
    proxy = subprocess.Popen(
        [str(BIN / "agentproxy"), "run", "--config", str(HERE / "agentproxy.yaml")]
    )
    time.sleep(1.0)
    ap = f"{BIN / 'agentproxy'}"
    key = keys / "issuer.pem"
    print(
        f"""
agentproxy demo is running (Ctrl-C stops it)
  data plane  http://127.0.0.1:8080   -> demo HR API on http://127.0.0.1:8000
  admin       http://127.0.0.1:9901/metrics  /healthz  /readyz  /.well-known/jwks.json

Mint a demo token for the agent "hr-bot" with role "hr":
  TOKEN=$({ap} token --key {key} --issuer {ISSUER} --audience agentproxy --agent hr-bot --role hr)

Then try:
  curl -s -H "Authorization: Bearer $TOKEN" http://127.0.0.1:8080/v1/employees/42          # allowed
  curl -s -H "Authorization: Bearer $TOKEN" http://127.0.0.1:8080/v1/employees/42/salary   # denied (403)
  curl -s -H "Authorization: Bearer $TOKEN" http://127.0.0.1:8080/v1/employees/1           # denied by a CEL condition
  curl -s http://127.0.0.1:8080/v1/employees/42                                            # no token (401)

Why was that denied? The serving code's own answer, with the values its conditions read:
  {ap} explain --config {HERE / "agentproxy.yaml"} --token "$TOKEN" --request "GET /v1/employees/1"

Deleting a record needs an HR lead's approval (the call is held 20s, then answered "pending"):
  curl -s -X DELETE -H "Authorization: Bearer $TOKEN" http://127.0.0.1:8080/v1/employees/42 &
  LEAD=$({ap} token --key {key} --issuer {ISSUER} --audience agentproxy --agent lead --role hr-lead)
  {ap} approvals list --admin http://127.0.0.1:9901 --token "$LEAD"
  # or open http://127.0.0.1:9901/ui/approvals#token=$LEAD and click Approve

An assistant acting for alice (RFC 8693 delegation):
  TOKEN=$({ap} token --key {key} --issuer {ISSUER} --audience agentproxy --agent assistant --for-user alice)
  curl -s -H "Authorization: Bearer $TOKEN" http://127.0.0.1:8080/v1/employees/alice       # allowed: its own user
  curl -s -H "Authorization: Bearer $TOKEN" http://127.0.0.1:8080/v1/employees             # alice's direct reports, no salaries

The onboarding workflow changes a title and a phone, nothing else (the body is policy's args):
  TOKEN=$({ap} token --key {key} --issuer {ISSUER} --audience agentproxy --agent hr-bot --role hr)
  curl -s -X PATCH -H "Authorization: Bearer $TOKEN" -H "Content-Type: application/json" \
       -d '{{"title": "Staff Engineer"}}' http://127.0.0.1:8080/v1/employees/42              # allowed
  curl -s -X PATCH -H "Authorization: Bearer $TOKEN" -H "Content-Type: application/json" \
       -d '{{"salary": 1000000}}' http://127.0.0.1:8080/v1/employees/42                     # denied (403)
""",
        flush=True,
    )
    try:
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


if __name__ == "__main__":
    sys.exit(main())
