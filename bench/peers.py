"""agentproxy against the Python gateways, each on its own path, in one run.

- MCP `tools/call`: agentproxy's MCP path against IBM ContextForge (`mcp-contextforge-gateway`
  on PyPI), both in front of the same MCP server.
- OpenAI-compatible chat completion with spend tracking: agentproxy's LLM path (tokens read
  from the answer, priced, metered, decision log and audit) against the LiteLLM proxy (cost per
  call from its price map), both in front of the same fake OpenAI API.

The upstream is one aiohttp process on uvloop that speaks both (stateless Streamable HTTP
JSON answers for MCP; a chat.completion with `usage` for OpenAI). Each peer is installed in its
own venv under .cache/bench-venvs/ (created here when missing, never in .venv) and runs one
worker, like agentproxy. A peer that cannot be installed or started here is reported with the
reason instead of a number. Load: wrk (one thread, POST bodies from a Lua script), contenders
alternating round by round. Writes bench/results/peers.md.

    .venv/bin/python bench/peers.py [--seconds 8] [--rounds 3] [--only mcp|llm]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import (
    Closed,
    Issuer,
    Processes,
    agentproxy_config,
    best,
    free_port,
    machine,
    start_agentproxy,
    table,
    wait_port,
    write_result,
    wrk,
    wrk_script,
)

REPO = Path(__file__).resolve().parent.parent
VENVS = REPO / ".cache" / "bench-venvs"

# ContextForge 1.1 needs Python 3.12+. litellm 1.109+ moved its proxy into a `litellm-proxy`
# package and 1.108.14's `proxy` extra pins `litellm-proxy-extras==0.4.110.post1`; neither is
# on PyPI as seen from here, so LiteLLM 1.108.14 is installed with the proxy's own runtime
# dependencies listed instead of the extra (1.107.0 was the compromised release: skipped).
CONTEXTFORGE = ("mcp-contextforge-gateway==1.1.0",)
LITELLM = ("litellm==1.108.14",)
# The `proxy` extra of that release, as its own metadata lists it, minus the two pins PyPI
# cannot satisfy here (taken at their newest published version instead).
UNPINNED = ("litellm-proxy-extras", "litellm-enterprise")
# Run in the peer's venv: argv is the package, the extra, then the names to leave unpinned.
EXTRA_REQUIREMENTS = r"""
import importlib.metadata as m, sys
from pip._vendor.packaging.requirements import Requirement
package, extra, unpinned = sys.argv[1], sys.argv[2], set(sys.argv[3:])
for text in m.requires(package) or []:
    req = Requirement(text)
    if req.marker is not None and req.marker.evaluate({"extra": extra}):
        print(req.name if req.name in unpinned else f"{req.name}{req.specifier}")
"""

UPSTREAM = r"""
import asyncio, json, sys, uvloop
from aiohttp import web

TOOL = {"name": "echo", "description": "Echoes its text.",
        "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}},
                        "required": ["text"]}}

def rpc(request_id, result):
    return web.json_response({"jsonrpc": "2.0", "id": request_id, "result": result})

async def mcp(request):
    if request.method != "POST":
        return web.Response(status=405)
    message = await request.json()
    method, request_id = message.get("method"), message.get("id")
    if request_id is None:
        return web.Response(status=202)  # a notification
    if method == "initialize":
        return rpc(request_id, {"protocolVersion": message["params"]["protocolVersion"],
                                "capabilities": {"tools": {"listChanged": False}},
                                "serverInfo": {"name": "bench", "version": "1.0"}})
    if method == "tools/list":
        return rpc(request_id, {"tools": [TOOL]})
    if method == "tools/call":
        text = message["params"]["arguments"].get("text", "")
        return rpc(request_id, {"content": [{"type": "text", "text": text}], "isError": False})
    if method == "ping":
        return rpc(request_id, {})
    return web.json_response({"jsonrpc": "2.0", "id": request_id,
                              "error": {"code": -32601, "message": "method not found"}})

async def chat(request):
    body = await request.json()
    return web.json_response({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000,
        "model": body["model"],
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "Hello there."}}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}})

async def models(request):
    return web.json_response({"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model"}]})

app = web.Application()
app.router.add_route("*", "/mcp", mcp)
app.router.add_post("/v1/chat/completions", chat)
app.router.add_get("/v1/models", models)

async def main():
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", int(sys.argv[1])).start()
    await asyncio.Event().wait()
uvloop.run(main())
"""

MCP_POLICY = """
default: deny
rules:
  - id: echo
    agents: [tool-bot]
    actions: ["mcp:tools/call/echo", "mcp:tools/list", "mcp:initialize", "mcp:ping"]
    when: 'principal.claims.dept == "eng"'
    effect: allow
"""

LLM_POLICY = """
default: deny
rules:
  - id: chat
    agents: [chat-bot]
    actions: ["llm:chat/gpt-4o-mini"]
    when: 'principal.claims.dept == "eng"'
    effect: allow
"""

# The Python gateways answer in seconds under load; wrk's default 2 s timeout would count
# their slow answers as errors instead of measuring them.
SLOW = 60.0

MCP_CALL = {
    "jsonrpc": "2.0",
    "id": 7,
    "method": "tools/call",
    "params": {"name": "echo", "arguments": {"text": "hello"}},
}
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello."}]}


class PeerUnavailable(Exception):
    """A peer could not be installed or run here; the message says exactly why."""


@dataclass
class Target:
    """One contender on one path: where to POST what, and which process serves it."""

    url: str
    body: dict[str, Any]
    headers: dict[str, str]
    pid: int
    note: str = ""
    # A response header whose presence proves the work happened (LiteLLM's computed cost).
    proof: str | None = None


# --- venvs --------------------------------------------------------------------------------------


def python_at_least(minor: int) -> str | None:
    """An interpreter of Python 3.`minor` or newer on this machine (PATH, then pyenv)."""
    candidates = [sys.executable] + [
        shutil.which(f"python3.{m}") or "" for m in range(minor, minor + 4)
    ]
    candidates += sorted(
        (str(p) for p in Path.home().glob(".pyenv/versions/3.*/bin/python3")), reverse=True
    )
    for python in candidates:
        if not python:
            continue
        try:
            out = subprocess.run(
                [python, "-c", "import sys; print(sys.version_info[1])"],
                capture_output=True,
                text=True,
                timeout=20,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and out.stdout.strip().isdigit() and int(out.stdout) >= minor:
            return python
    return None


def ensure_venv(name: str, packages: tuple[str, ...], minor: int, *, extra: str = "") -> Path:
    """The venv .cache/bench-venvs/<name> with `packages`, created or updated when its recorded
    package list differs; then, if `extra` names one, that package's optional dependencies
    (an extra) as its installed metadata lists them. Raises PeerUnavailable with pip's own
    error when it cannot be had."""
    venv = VENVS / name
    marker = venv / ".bench-packages"
    wanted = "\n".join(packages) + (f"\n[{extra}]" if extra else "")
    if marker.exists() and marker.read_text() == wanted:
        return venv
    python = python_at_least(minor)
    if python is None:
        raise PeerUnavailable(f"no Python 3.{minor}+ interpreter on this machine")
    print(f"installing {name} into {venv} (once) …", flush=True)
    if not (venv / "bin" / "python").exists():
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
    pip = [
        str(venv / "bin" / "python"),
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
    ]
    done = subprocess.run([*pip, *packages], capture_output=True, text=True)
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR")]
        raise PeerUnavailable(
            f"pip install {' '.join(packages[:1])} failed: " + " / ".join(errors[-2:])
        )
    if extra:
        # The extra's requirements as the installed package declares them, with UNPINNED
        # taken at their newest version (see LITELLM above).
        package = packages[0].split("==")[0]
        listed = subprocess.run(
            [str(venv / "bin" / "python"), "-c", EXTRA_REQUIREMENTS, package, extra, *UNPINNED],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        if listed:
            _pip(pip, listed)
    marker.write_text(wanted)
    return venv


def _pip(pip: list[str], packages: list[str]) -> None:
    done = subprocess.run([*pip, *packages], capture_output=True, text=True)
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR")]
        raise PeerUnavailable(f"pip install {packages[0]} … failed: " + " / ".join(errors[-2:]))


def version_of(venv: Path, package: str) -> str:
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "show", package], capture_output=True, text=True
    ).stdout
    return next(
        (line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Version:")),
        "?",
    )


def http_json(method: str, url: str, body: object | None = None, token: str | None = None) -> Any:
    """One JSON request; raises PeerUnavailable with the status and answer when it fails."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    request.add_header("Accept", "application/json, text/event-stream")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            text = answer.read().decode()
    except urllib.error.HTTPError as exc:
        raise PeerUnavailable(f"{method} {url} answered {exc.code}: {exc.read()[:300]!r}") from None
    except OSError as exc:
        raise PeerUnavailable(f"{method} {url} failed: {exc}") from None
    if text.startswith("event:") or text.startswith("data:"):  # an SSE answer: its data line
        text = next(line[5:] for line in text.splitlines() if line.startswith("data:"))
    return json.loads(text) if text else None


# --- the peers ----------------------------------------------------------------------------------


def start_contextforge(procs: Processes, d: Path, upstream: int) -> Target:
    """ContextForge with auth on (its HS256 JWT), SQLite, the fake MCP server registered as a
    gateway and exposed through a virtual server; `tools/call` on that server's MCP endpoint."""
    venv = ensure_venv("contextforge", CONTEXTFORGE, 12)
    port = free_port()
    # Fresh strong secrets: ContextForge refuses to start on weak or placeholder ones.
    secret = secrets.token_hex(32)
    env = {
        **os.environ,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "DATABASE_URL": f"sqlite:///{d}/contextforge.db",
        "JWT_SECRET_KEY": secret,
        "AUTH_ENCRYPTION_SECRET": secrets.token_hex(32),
        "BASIC_AUTH_PASSWORD": "Bb1!" + secrets.token_hex(12),
        "PLATFORM_ADMIN_PASSWORD": "Pp1!" + secrets.token_hex(12),
        "DEFAULT_USER_PASSWORD": "Dd1!" + secrets.token_hex(12),
        "PLATFORM_ADMIN_EMAIL": "admin@example.com",
        "AUTH_REQUIRED": "true",
        "MCPGATEWAY_UI_ENABLED": "false",
        "MCPGATEWAY_ADMIN_API_ENABLED": "true",
        "SSRF_ALLOW_LOCALHOST": "true",
        "SSRF_ALLOW_PRIVATE_NETWORKS": "true",
        "LOG_LEVEL": "ERROR",
        # Its default per-user limits (100 MCP calls a minute) would turn a throughput test
        # into a rate-limit test; agentproxy runs with no limit either.
        "RATE_LIMITING_ENABLED": "false",
        "RATE_LIMIT_LOCKOUT_ENABLED": "false",
        "CACHE_TYPE": "memory",
        "PLUGINS_ENABLED": "false",
        "SECURE_COOKIES": "false",
        "ENVIRONMENT": "development",
    }
    env.pop("VIRTUAL_ENV", None)
    proc = procs.start(
        [
            str(venv / "bin" / "mcpgateway"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        log=d / "contextforge.log",
        env=env,
        cwd=d,
    )
    try:
        wait_port(port, timeout=180, proc=proc)
    except RuntimeError as exc:
        raise PeerUnavailable(f"{exc}; log: {_tail(d / 'contextforge.log')}") from None
    token = (
        subprocess.run(
            [
                str(venv / "bin" / "python"),
                "-m",
                "mcpgateway.utils.create_jwt_token",
                *("--username", "admin@example.com", "--admin", "--exp", "240"),
                *("--secret", secret),
            ],
            capture_output=True,
            text=True,
            env=env,
            cwd=d,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    base = f"http://127.0.0.1:{port}"
    _wait_ready(f"{base}/health", proc, d / "contextforge.log")
    gateway = http_json(
        "POST",
        f"{base}/gateways",
        {"name": "bench", "url": f"http://127.0.0.1:{upstream}/mcp", "transport": "STREAMABLEHTTP"},
        token,
    )
    tools = http_json("GET", f"{base}/tools", None, token)
    tools = tools.get("items", tools) if isinstance(tools, dict) else tools
    echo = next((t for t in tools if t.get("gatewayId") == gateway.get("id")), None)
    if echo is None:
        raise PeerUnavailable(
            f"ContextForge discovered no tool from the MCP server: {tools!r:.300}"
        )
    server = http_json(
        "POST",
        f"{base}/servers",
        {"server": {"name": "bench", "associated_tools": [echo["id"]]}},
        token,
    )
    name = echo.get("name") or echo.get("originalName")
    call = {**MCP_CALL, "params": {"name": name, "arguments": {"text": "hello"}}}
    url = f"{base}/servers/{server['id']}/mcp"
    answer = http_json("POST", url, call, token)
    if "result" not in answer:
        raise PeerUnavailable(f"ContextForge tools/call did not succeed: {answer!r:.300}")
    return Target(
        url,
        call,
        {
            "Authorization": f"Bearer {token}",
            "Accept": "application/json, text/event-stream",
            "MCP-Protocol-Version": "2025-06-18",
        },
        proc.pid,
        f"mcp-contextforge-gateway {version_of(venv, 'mcp-contextforge-gateway')}",
    )


def start_litellm(procs: Processes, d: Path, upstream: int) -> Target:
    """The LiteLLM proxy with a master key (auth on), one model on the fake OpenAI API, cost
    per call from its price map (returned as `x-litellm-response-cost`). No database: its
    per-key spend ledger needs Prisma's engine binaries, which cannot be downloaded here."""
    venv = ensure_venv("litellm", LITELLM, 11, extra="proxy")
    port = free_port()
    config = d / "litellm.yaml"
    config.write_text(
        f"""
model_list:
  - model_name: gpt-4o-mini
    litellm_params:
      model: openai/gpt-4o-mini
      api_base: http://127.0.0.1:{upstream}/v1
      api_key: sk-upstream-bench
general_settings:
  master_key: sk-bench-master
litellm_settings:
  drop_params: true
  set_verbose: false
"""
    )
    env = {**os.environ, "LITELLM_LOG": "ERROR", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    env.pop("VIRTUAL_ENV", None)
    proc = procs.start(
        [
            str(venv / "bin" / "litellm"),
            *("--config", str(config), "--host", "127.0.0.1"),
            *("--port", str(port), "--num_workers", "1"),
        ],
        log=d / "litellm.log",
        env=env,
        cwd=d,
    )
    try:
        wait_port(port, timeout=180, proc=proc)
    except RuntimeError as exc:
        raise PeerUnavailable(f"{exc}; log: {_tail(d / 'litellm.log')}") from None
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    answer = http_json("POST", url, CHAT, "sk-bench-master")
    if not answer or "choices" not in answer:
        raise PeerUnavailable(f"LiteLLM chat completion did not succeed: {answer!r:.300}")
    return Target(
        url,
        CHAT,
        {"Authorization": "Bearer sk-bench-master", "Content-Type": "application/json"},
        proc.pid,
        f"litellm {version_of(venv, 'litellm')}",
        proof="x-litellm-response-cost",
    )


def _wait_ready(url: str, proc: Any, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise PeerUnavailable(f"exited with {proc.returncode}: {_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise PeerUnavailable(f"{url} never became healthy: {_tail(log)}")


def _tail(log: Path, lines: int = 6) -> str:
    try:
        return " | ".join(log.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- the run ------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--only", choices=("mcp", "llm"))
    parser.add_argument("--quick", action="store_true", help="2 s runs, 1 round")
    parser.add_argument("--name", default="peers", help="results file name")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.rounds = 2, 1
    d = Path(tempfile.mkdtemp(prefix="ap-peers-"))
    issuer = Issuer.create(d)
    up, ap, aa = free_port(), free_port(), free_port()
    upstreams = (
        f'  - {{name: tools, url: "http://127.0.0.1:{up}", protocol: mcp, match: {{path_prefix: /mcp}}}}\n'
        f'  - {{name: openai, url: "http://127.0.0.1:{up}", protocol: llm, match: {{path_prefix: /v1}},'
        " credentials: {header: Authorization, value_file: secret, prefix: 'Bearer '}}"
    )
    (d / "secret").write_text("sk-upstream-bench\n")
    policy = MCP_POLICY + LLM_POLICY.replace("default: deny\nrules:\n", "")
    config = agentproxy_config(
        d,
        "agentproxy",
        port=ap,
        admin=aa,
        upstreams=upstreams,
        policy=policy,
        audit=True,
        extra=(
            "metering:\n  currency: USD\n  prices:\n"
            '    "gpt-4o-mini*": {input_per_mtok: 0.15, output_per_mtok: 0.6}\n'
        ),
    )
    paths: dict[str, dict[str, Target | str]] = {}
    with Processes() as procs:
        upstream = procs.start([sys.executable, "-c", UPSTREAM, str(up)], log=d / "upstream.log")
        wait_port(up, proc=upstream)
        proxy = start_agentproxy(procs, config, d / "agentproxy.log")
        wait_port(ap, proc=proxy)
        mcp_token = issuer.mint("tool-bot", dept="eng")
        llm_token = issuer.mint("chat-bot", dept="eng")
        plans: list[tuple[str, str, Callable[[], Target]]] = []
        if args.only in (None, "mcp"):
            plans += [
                (
                    "MCP tools/call",
                    "direct to the MCP server",
                    lambda: Target(
                        f"http://127.0.0.1:{up}/mcp",
                        MCP_CALL,
                        {"Accept": "application/json, text/event-stream"},
                        upstream.pid,
                    ),
                ),
                (
                    "MCP tools/call",
                    "agentproxy, MCP path",
                    lambda: Target(
                        f"http://127.0.0.1:{ap}/mcp",
                        MCP_CALL,
                        {
                            "Authorization": f"Bearer {mcp_token}",
                            "Accept": "application/json, text/event-stream",
                        },
                        proxy.pid,
                    ),
                ),
                ("MCP tools/call", "ContextForge", lambda: start_contextforge(procs, d, up)),
            ]
        if args.only in (None, "llm"):
            plans += [
                (
                    "chat completion",
                    "direct to the fake OpenAI API",
                    lambda: Target(
                        f"http://127.0.0.1:{up}/v1/chat/completions",
                        CHAT,
                        {"Authorization": "Bearer sk-upstream-bench"},
                        upstream.pid,
                    ),
                ),
                (
                    "chat completion",
                    "agentproxy, LLM path",
                    lambda: Target(
                        f"http://127.0.0.1:{ap}/v1/chat/completions",
                        CHAT,
                        {"Authorization": f"Bearer {llm_token}"},
                        proxy.pid,
                    ),
                ),
                ("chat completion", "LiteLLM proxy", lambda: start_litellm(procs, d, up)),
            ]
        for path, name, start in plans:
            try:
                target = start()
                _check(target, name)
                paths.setdefault(path, {})[name] = target
            except PeerUnavailable as exc:
                print(f"{name}: unavailable: {exc}", file=sys.stderr)
                paths.setdefault(path, {})[name] = str(exc)
        runs: dict[str, list[Closed]] = {}
        scripts = {}
        for targets in paths.values():
            for name, target in targets.items():
                if isinstance(target, Target):
                    headers = {"Content-Type": "application/json", **target.headers}
                    scripts[name] = wrk_script(d, "POST", json.dumps(target.body), headers)
                    wrk(
                        target.url,
                        seconds=1,
                        connections=args.connections,
                        script=scripts[name],
                        timeout=SLOW,
                    )
        for _ in range(args.rounds):
            for targets in paths.values():
                for name, target in targets.items():
                    if isinstance(target, Target):
                        run = wrk(
                            target.url,
                            seconds=args.seconds,
                            connections=args.connections,
                            script=scripts[name],
                            cpu_pid=target.pid,
                            timeout=SLOW,
                            expect_ok=False,
                        )
                        runs.setdefault(name, []).append(run)
                        print(f"  {name}: {run.rps:,.0f}/s", flush=True)
    write_result(args.name, report(args, paths, runs))
    return 0


def _check(target: Target, name: str) -> None:
    request = urllib.request.Request(
        target.url, data=json.dumps(target.body).encode(), method="POST"
    )
    for key, value in {"Content-Type": "application/json", **target.headers}.items():
        request.add_header(key, value)
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            answer = reply.read()
            proof = reply.headers.get(target.proof) if target.proof else None
    except urllib.error.HTTPError as exc:
        raise PeerUnavailable(f"{name} answered {exc.code}: {exc.read()[:300]!r}") from None
    if b'"error"' in answer:
        raise PeerUnavailable(f"{name} answered an error: {answer[:300]!r}")
    if target.proof and not proof:
        raise PeerUnavailable(f"{name} answered without {target.proof}")
    if proof:
        target.note += f", {target.proof}: {proof}"


def report(
    args: argparse.Namespace,
    paths: dict[str, dict[str, Target | str]],
    runs: dict[str, list[Closed]],
) -> str:
    lines = [
        f"# agentproxy and the Python gateways, each on its own path ({machine()})",
        "",
        f"wrk -t1 -c{args.connections}, {args.seconds:g} s POST runs, best of {args.rounds} "
        "alternating rounds; one worker per contender; upstream, contender and wrk share the 2 "
        "cores. Every contender authenticates the caller (agentproxy: RS256 JWT + CEL policy, "
        "decision log, audit file; ContextForge: its HS256 JWT with RBAC; LiteLLM: its master "
        "key). agentproxy's LLM path reads the usage and prices it (spend metered); LiteLLM "
        "computes each call's cost from its price map. Target: agentproxy ≥ 3× each peer.",
        "",
    ]
    unavailable = []
    for path, targets in paths.items():
        measured = {n: runs[n] for n, t in targets.items() if isinstance(t, Target) and n in runs}
        if not measured:
            continue
        direct_name = next(iter(measured))
        direct = best(r.rps for r in measured[direct_name])
        ours = best(r.rps for n, rs in measured.items() if n.startswith("agentproxy") for r in rs)
        rows = []
        for name, rs in measured.items():
            rps = best(r.rps for r in rs)
            cpu = best((r.cpu_us for r in rs if r.cpu_us is not None), high=False)
            target = targets[name]
            note = target.note if isinstance(target, Target) else ""
            rows.append(
                [
                    name + (f" ({note})" if note else ""),
                    f"{rps:,.0f}",
                    f"{rps / direct:.2f}",
                    f"{ours / rps:.1f}×" if not name.startswith(("agentproxy", "direct")) else "",
                    f"{cpu:,.0f}",
                    f"{best((r.p50 for r in rs), high=False):.2f}",
                    f"{best((r.p99 for r in rs), high=False):.2f}",
                    f"{sum(r.failed for r in rs):,}",
                ]
            )
        lines += [
            f"## {path}",
            "",
            table(
                [
                    "contender",
                    "calls/s",
                    "× direct",
                    "agentproxy ÷ it",
                    "CPU µs/call",
                    "p50 ms",
                    "p99 ms",
                    "failed calls",
                ],
                rows,
            ),
            "",
        ]
    for targets in paths.values():
        unavailable += [(n, t) for n, t in targets.items() if isinstance(t, str)]
    if unavailable:
        lines += ["## Not measured", ""]
        lines += [f"- {name}: {why}" for name, why in unavailable]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
