"""The gRPC example: the HR gRPC service on :50061 and agentproxy in front of it on :50051.

python examples/grpc/run.py      # Ctrl-C stops both
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
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    upstream = subprocess.Popen([sys.executable, str(HERE / "upstream.py")], cwd=HERE)
    proxy = subprocess.Popen(
        [str(BIN / "agentproxy"), "run", "--config", str(HERE / "agentproxy.yaml")]
    )
    time.sleep(1.5)
    ap, py, key = BIN / "agentproxy", sys.executable, keys / "issuer.pem"
    client = HERE / "client.py"
    print(
        f"""
agentproxy gRPC example is running (Ctrl-C stops it)
  gRPC data plane  127.0.0.1:50051  -> hr.v1.Employees on 127.0.0.1:50061
  agentproxy.v1    127.0.0.1:9912   (Authorizer, Approvals)   admin HTTP 127.0.0.1:9911

  TOKEN=$({ap} token --key {key} --issuer {ISSUER} --audience agentproxy --agent hr-bot --role hr)
  {py} {client} --token "$TOKEN" get 42                    # allowed
  {py} {client} --token "$TOKEN" get 1                     # PERMISSION_DENIED (args.id)
  {py} {client} --token "$TOKEN" raise 42 3 "annual review"  # allowed
  {py} {client} --token "$TOKEN" raise 42 20 "promotion"     # FAILED_PRECONDITION: approval pending
  {py} {client} get 42                                     # UNAUTHENTICATED
"""
    )
    try:
        while upstream.poll() is None and proxy.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for process in (proxy, upstream):
            process.terminate()
        for process in (proxy, upstream):
            process.wait(timeout=15)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
