"""The LLM example: a stand-in provider on :8200 and agentproxy in front of it on :8083.

python examples/llm/run.py      # Ctrl-C stops both
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
    provider = subprocess.Popen([sys.executable, str(HERE / "provider.py")], cwd=HERE)
    proxy = subprocess.Popen(
        [str(BIN / "agentproxy"), "run", "--config", str(HERE / "agentproxy.yaml")]
    )
    try:
        for _ in range(300):
            if proxy.poll() is not None or provider.poll() is not None:
                print("the LLM example did not start: see the lines above", file=sys.stderr)
                return 1
            try:
                with urllib.request.urlopen("http://127.0.0.1:9915/readyz", timeout=1):
                    break
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        ap, key = BIN / "agentproxy", keys / "issuer.pem"
        mint = f"{ap} token --key {key} --issuer {ISSUER} --audience agentproxy"
        print(
            f"""
agentproxy LLM example is running (Ctrl-C stops it)
  LLM API  http://127.0.0.1:8083  -> the stand-in provider on http://127.0.0.1:8200

The agent's token is the SDKs' api_key:
  TOKEN=$({mint} --agent writer)
  {sys.executable} {HERE / "client.py"} "$TOKEN"

In your own code:
  openai.OpenAI(base_url="http://127.0.0.1:8083/v1", api_key=TOKEN)
  anthropic.Anthropic(base_url="http://127.0.0.1:8083", api_key="unused",
                      default_headers={{"Authorization": "Bearer " + TOKEN}})

Spend so far (Prometheus): curl -s http://127.0.0.1:9915/metrics | grep agentproxy_cost_total
""",
            flush=True,
        )
        while proxy.poll() is None and provider.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for process in (proxy, provider):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in (proxy, provider):
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
    return proxy.returncode or 0


if __name__ == "__main__":
    sys.exit(main())
