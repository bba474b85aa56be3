"""What the HTTP enforcement path costs, as ratios to a direct call measured in the same run.

Starts a small upstream and `agentproxy run` (JWT, CEL policy, context headers, metrics,
decision log to /dev/null) as separate processes, loads each with `wrk` from its own process,
alternating contenders, and writes a Markdown table to bench/results/http_overhead.md.

    make bench            # or: .venv/bin/python bench/http_overhead.py --seconds 5 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent

UPSTREAM = """
import asyncio, sys, uvloop
from aiohttp import web
BODY = b'{"id": "42", "name": "Grace"}'
async def handle(request):
    return web.Response(body=BODY, content_type="application/json")
async def main():
    runner = web.ServerRunner(web.Server(handle), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", int(sys.argv[1])).start()
    await asyncio.Event().wait()
uvloop.run(main())
"""

POLICY = """
default: deny
rules:
  - id: read-employees
    agents: [hr-bot, "role:hr"]
    actions: ["http:GET /v1/employees/{id}"]
    when: 'resource.id != "13" && principal.claims.dept == "hr"'
    effect: allow
  - id: no-salaries
    agents: ["*"]
    actions: ["http:* /v1/employees/{id}/salary"]
    effect: deny
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open")


def wrk(url: str, token: str | None, seconds: int, connections: int) -> tuple[float, float, float]:
    """Requests/s, p50 and p99 latency in ms."""
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url]
    if token:
        cmd[1:1] = ["-H", f"Authorization: Bearer {token}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        raise RuntimeError(
            f"{url}: {non2xx.group(1)} refused calls; the benchmark is misconfigured"
        )
    return rps, _latency(out, "50%"), _latency(out, "99%")


def _latency(out: str, pct: str) -> float:
    m = re.search(rf"{re.escape(pct)}\s+([\d.]+)(us|ms|s)", out)
    if not m:
        return float("nan")
    value, unit = float(m.group(1)), m.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is missing: apt-get install wrk", file=sys.stderr)
        return 1
    d = Path(tempfile.mkdtemp(prefix="ap-bench-"))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (d / "issuer.pem").write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    (d / "secret").write_text("bench-secret\n")
    (d / "policy.yaml").write_text(POLICY)
    up, px, adm = free_port(), free_port(), free_port()
    (d / "agentproxy.yaml").write_text(
        f"""
listen: {{http: "127.0.0.1:{px}", admin: "127.0.0.1:{adm}"}}
upstreams: [{{name: hr, url: "http://127.0.0.1:{up}", credentials: {{header: X-Api-Key, value_file: secret}}}}]
identity:
  issuers: [{{issuer: "https://idp.bench", audiences: [agentproxy], public_key_file: issuer.pem, algorithms: [RS256]}}]
policy_files: [policy.yaml]
decision_log: stdout
"""
    )
    now = int(time.time())
    token = jwt.encode(
        {
            "iss": "https://idp.bench",
            "aud": "agentproxy",
            "sub": "hr-bot",
            "iat": now,
            "exp": now + 3600,
            "roles": ["hr"],
            "dept": "hr",
        },
        key,
        algorithm="RS256",
    )
    devnull = open(os.devnull, "wb")  # noqa: SIM115
    procs = [
        subprocess.Popen([sys.executable, "-c", UPSTREAM, str(up)]),
        subprocess.Popen(
            [
                str(BIN / "agentproxy"),
                "run",
                "--config",
                str(d / "agentproxy.yaml"),
                "--log-level",
                "warning",
            ],
            stdout=devnull,
        ),
    ]
    try:
        wait_port(up)
        wait_port(px)
        path = "/v1/employees/42"
        contenders = {
            "direct to upstream": (f"http://127.0.0.1:{up}{path}", None),
            "agentproxy (JWT + CEL policy + context + metrics + decision log)": (
                f"http://127.0.0.1:{px}{path}",
                token,
            ),
        }
        wrk(contenders["direct to upstream"][0], None, 1, args.connections)  # warm up
        results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in contenders}
        for _ in range(args.rounds):
            for name, (url, tok) in contenders.items():
                results[name].append(wrk(url, tok, args.seconds, args.connections))
    finally:
        for p in reversed(procs):  # the proxy first: it would log the upstream going away
            p.terminate()
            p.wait(10)
    base = max(r[0] for r in results["direct to upstream"])
    base_p50 = min(r[1] for r in results["direct to upstream"])
    base_p99 = min(r[2] for r in results["direct to upstream"])
    lines = [
        f"# HTTP path overhead ({time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()})",
        "",
        f"wrk -t1 -c{args.connections} -d{args.seconds}s, best of {args.rounds} alternating rounds; "
        "the upstream, the proxy and wrk share the machine.",
        "",
        "| contender | requests/s | × direct | p50 ms | p99 ms | added p50 ms | added p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, runs in results.items():
        rps = max(r[0] for r in runs)
        p50 = min(r[1] for r in runs)
        p99 = min(r[2] for r in runs)
        lines.append(
            f"| {name} | {rps:,.0f} | {rps / base:.2f} | {p50:.2f} | {p99:.2f} | "
            f"{p50 - base_p50:+.2f} | {p99 - base_p99:+.2f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "http_overhead.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
