"""agentproxy's MCP and LLM paths against a direct call, each with an official SDK on one end.

- MCP `tools/call`: the upstream is the official MCP Python SDK's own server (`MCPServer`, its
  Streamable HTTP app in stateless mode with JSON answers, served by uvicorn, one process, a
  trivial `add` tool). Load: wrk (one thread, closed loop), the same POST for both contenders
  (agentproxy's adds the bearer token).
- LLM chat completion: the upstream is the fake OpenAI API of bench/peers.py (a
  chat.completion with `usage`); agentproxy prices the tokens (spend metered). Load: the
  official `openai` SDK itself, bench/openai_load.py in its own process, N concurrent
  `AsyncOpenAI.chat.completions.create` loops, base_url at the fake provider or at agentproxy.

Before measuring, both contenders of each path must answer the call correctly (the tool's
sum, the completion with its usage), agentproxy must refuse a call without a token (401) and
must have metered the LLM call's cost. One worker per contender, contenders alternating round
by round; ratios against the direct call of the same run. Writes bench/results/sdk_paths.md.

    .venv/bin/python bench/sdk_paths.py [--seconds 8] [--rounds 3] [--only mcp|llm]
    .venv/bin/python bench/sdk_paths.py --quick --name sdk_paths_quick
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import (
    HERE,
    Closed,
    Issuer,
    Processes,
    agentproxy_config,
    best,
    cpu_seconds,
    free_port,
    machine,
    start_agentproxy,
    table,
    wait_port,
    write_result,
    wrk,
    wrk_script,
)
from peers import UPSTREAM as FAKE_OPENAI

# The official SDK's server, as its documentation writes one: stateless (no session, so one
# POST is a whole call) with JSON answers instead of an SSE stream.
MCP_SERVER = r"""
import sys, uvicorn
from mcp.server.mcpserver import MCPServer

server = MCPServer("bench-tools", log_level="WARNING")

@server.tool(description="Adds two integers.")
def add(a: int, b: int) -> int:
    return a + b

app = server.streamable_http_app(stateless_http=True, json_response=True)
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
"""

POLICY = """
default: deny
rules:
  - id: add
    agents: [tool-bot]
    actions: ["mcp:tools/call/add"]
    when: 'principal.claims.dept == "eng"'
    effect: allow
  - id: chat
    agents: [chat-bot]
    actions: ["llm:chat/gpt-4o-mini"]
    when: 'principal.claims.dept == "eng"'
    effect: allow
"""

MCP_CALL = {
    "jsonrpc": "2.0",
    "id": 7,
    "method": "tools/call",
    "params": {"name": "add", "arguments": {"a": 2, "b": 3}},
}
# What a Streamable HTTP client sends with every POST (MCP 2025-06-18, "Transports"): both
# media types accepted, and the negotiated protocol version.
MCP_HEADERS = {
    "Accept": "application/json, text/event-stream",
    "Content-Type": "application/json",
    "MCP-Protocol-Version": "2025-06-18",
}
UPSTREAM_KEY = "sk-upstream-bench"

MCP_DIRECT = "direct to the MCP SDK server"
MCP_PROXY = "agentproxy, MCP path"
LLM_DIRECT = "direct to the fake OpenAI API"
LLM_PROXY = "agentproxy, LLM path"
TARGET = 0.8


@dataclass
class Sdk:
    """One openai_load.py run: completed calls/s, latency, CPU per call (contender, load)."""

    rps: float
    p50: float
    p99: float
    cpu_us: float
    upstream_cpu_us: float
    load_busy: float  # the load process's share of one core during the run


def post_json(url: str, body: object, headers: dict[str, str]) -> tuple[int, Any]:
    """One POST; the status and the parsed JSON answer (an error status is returned too)."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    for name, value in headers.items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()[:300]


def check_mcp(url: str, headers: dict[str, str], what: str) -> None:
    """Raises RuntimeError unless `tools/call add(2, 3)` at `url` answers 5."""
    status, answer = post_json(url, MCP_CALL, headers)
    result = answer.get("result", {}) if isinstance(answer, dict) else {}
    texts = [c.get("text") for c in result.get("content", [])]
    if status != 200 or result.get("isError") or texts != ["5"]:
        raise RuntimeError(f"{what}: tools/call answered {status} {answer!r}; misconfigured")


def check_llm(base_url: str, api_key: str, what: str) -> None:
    """Raises RuntimeError unless the SDK's chat completion at `base_url` succeeds with usage."""
    from openai import OpenAI

    with OpenAI(base_url=base_url, api_key=api_key, max_retries=0) as client:
        answer = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Say hello."}]
        )
    if answer.choices[0].message.content != "Hello there." or answer.usage is None:
        raise RuntimeError(f"{what}: unexpected completion {answer!r}; misconfigured")


def refuses_without_token_llm(base_url: str) -> bool:
    import openai

    with openai.OpenAI(base_url=base_url, api_key="not-a-token", max_retries=0) as client:
        try:
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "Say hello."}]
            )
        except openai.AuthenticationError:
            return True
    return False


def metered_cost(admin: int) -> float:
    """agentproxy_cost_total summed over its series, from the admin listener's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("agentproxy_cost_total{")
    )


def sdk_load(base_url: str, api_key: str, args: argparse.Namespace, pid: int, upstream: int) -> Sdk:
    """One bench/openai_load.py run, CPU counted for the contender `pid` and the `upstream`
    process; raises RuntimeError if any call failed."""
    cmd = [sys.executable, str(HERE / "openai_load.py"), base_url, "--api-key", api_key]
    cmd += ["--concurrency", str(args.concurrency), "--seconds", str(args.seconds)]
    cmd += ["--cpu-pid", str(pid), "--cpu-pid", str(upstream)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    data = json.loads(out.strip().splitlines()[-1])
    if data["errors"] or not data["calls"]:
        raise RuntimeError(f"{base_url}: {data['errors']} failed calls {data['error_kinds']}")
    return Sdk(
        data["rps"],
        data["p50"],
        data["p99"],
        data["cpu_s"][0] / data["calls"] * 1e6,
        data["cpu_s"][1] / data["calls"] * 1e6,
        data["load_cpu_s"] / data["seconds"],
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=8, help="per run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections (MCP)")
    parser.add_argument("--concurrency", type=int, default=16, help="SDK call loops (LLM)")
    parser.add_argument("--only", choices=("mcp", "llm"))
    parser.add_argument("--quick", action="store_true", help="2 s runs, 1 round")
    parser.add_argument("--name", default="sdk_paths", help="results file name")
    args = parser.parse_args()
    command = shlex.join([".venv/bin/python", "bench/sdk_paths.py", *sys.argv[1:]])
    if args.quick:
        args.seconds, args.rounds = 2, 1
    d = Path(tempfile.mkdtemp(prefix="ap-sdk-"))
    issuer = Issuer.create(d)
    mcp_port, llm_port, ap, aa = free_port(), free_port(), free_port(), free_port()
    (d / "secret").write_text(UPSTREAM_KEY + "\n")
    upstreams = (
        f'  - {{name: tools, url: "http://127.0.0.1:{mcp_port}", protocol: mcp,'
        " match: {path_prefix: /mcp}}\n"
        f'  - {{name: openai, url: "http://127.0.0.1:{llm_port}", protocol: llm,'
        " match: {path_prefix: /v1},"
        " credentials: {header: Authorization, value_file: secret, prefix: 'Bearer '}}"
    )
    # The full pipeline: decision log (stdout, to a file), audit file, and for the LLM path
    # the tokens read from each answer and priced.
    config = agentproxy_config(
        d,
        "agentproxy",
        port=ap,
        admin=aa,
        upstreams=upstreams,
        policy=POLICY,
        audit=True,
        extra=(
            "metering:\n  currency: USD\n  prices:\n"
            '    "gpt-4o-mini*": {input_per_mtok: 0.15, output_per_mtok: 0.6}\n'
        ),
    )
    # Each MCP run with the upstream's CPU µs per call during it.
    mcp_runs: dict[str, list[tuple[Closed, float]]] = {MCP_DIRECT: [], MCP_PROXY: []}
    llm_runs: dict[str, list[Sdk]] = {LLM_DIRECT: [], LLM_PROXY: []}
    with Processes() as procs:
        mcp_server = procs.start(
            [sys.executable, "-c", MCP_SERVER, str(mcp_port)], log=d / "mcp.log"
        )
        fake = procs.start([sys.executable, "-c", FAKE_OPENAI, str(llm_port)], log=d / "fake.log")
        proxy = start_agentproxy(procs, config, d / "agentproxy.log")
        for port, proc in ((mcp_port, mcp_server), (llm_port, fake), (ap, proxy)):
            wait_port(port, proc=proc)
        mcp_token = issuer.mint("tool-bot", dept="eng")
        llm_token = issuer.mint("chat-bot", dept="eng")
        mcp = {
            MCP_DIRECT: (f"http://127.0.0.1:{mcp_port}/mcp", MCP_HEADERS, mcp_server.pid),
            MCP_PROXY: (
                f"http://127.0.0.1:{ap}/mcp",
                {**MCP_HEADERS, "Authorization": f"Bearer {mcp_token}"},
                proxy.pid,
            ),
        }
        llm = {
            LLM_DIRECT: (f"http://127.0.0.1:{llm_port}/v1", UPSTREAM_KEY, fake.pid),
            LLM_PROXY: (f"http://127.0.0.1:{ap}/v1", llm_token, proxy.pid),
        }
        if args.only == "llm":
            mcp = {}
            mcp_runs = {}
        if args.only == "mcp":
            llm = {}
            llm_runs = {}
        scripts = {}
        for name, (url, headers, _) in mcp.items():
            check_mcp(url, headers, name)
            scripts[name] = wrk_script(d, "POST", json.dumps(MCP_CALL), headers)
        if mcp:
            status, _ = post_json(mcp[MCP_PROXY][0], MCP_CALL, MCP_HEADERS)
            if status != 401:
                raise RuntimeError(f"{MCP_PROXY}: answered {status} without a token, not 401")
        for name, (url, key, _) in llm.items():
            check_llm(url, key, name)
        if llm:
            if not refuses_without_token_llm(llm[LLM_PROXY][0]):
                raise RuntimeError(f"{LLM_PROXY}: a call without a valid token was served")
            if metered_cost(aa) <= 0:
                raise RuntimeError(f"{LLM_PROXY}: the checked call's cost was not metered")
        for name, (url, _, _) in mcp.items():  # warm up: connections, caches, the SDK's imports
            wrk(url, seconds=1, connections=args.connections, script=scripts[name])
        for _ in range(args.rounds):
            for name, (url, _, pid) in mcp.items():
                upstream_before = cpu_seconds(mcp_server.pid)
                run = wrk(
                    url,
                    seconds=args.seconds,
                    connections=args.connections,
                    script=scripts[name],
                    cpu_pid=pid,
                )
                # wrk reports no call count beside its rate: calls ≈ rate * duration.
                calls = run.rps * max(1, round(args.seconds))
                upstream_us = (cpu_seconds(mcp_server.pid) - upstream_before) / calls * 1e6
                mcp_runs[name].append((run, upstream_us))
                print(f"  {name}: {run.rps:,.0f}/s, {run.cpu_us or 0:.0f} µs CPU/call", flush=True)
            for name, (url, key, pid) in llm.items():
                sdk = sdk_load(url, key, args, pid, fake.pid)
                llm_runs[name].append(sdk)
                print(f"  {name}: {sdk.rps:,.0f}/s, {sdk.cpu_us:.0f} µs CPU/call", flush=True)
    write_result(args.name, report(args, command, mcp_runs, llm_runs))
    return 0


def _verdict(what: str, ratio: float) -> str:
    return f"- {what} ≥ {TARGET}× direct: {ratio:.2f}× — " + (
        "met" if ratio >= TARGET else "not met"
    )


def report(
    args: argparse.Namespace,
    command: str,
    mcp_runs: dict[str, list[tuple[Closed, float]]],
    llm_runs: dict[str, list[Sdk]],
) -> str:
    lines = [
        f"# The MCP and LLM paths with the official SDKs ({machine()})",
        "",
        f"Command: `{command}`",
        "",
        f"{args.seconds:g} s runs, best of {args.rounds} alternating rounds; one worker per "
        "contender; upstream, contender and load share the 2 cores. agentproxy runs the full "
        "pipeline on both paths: RS256 JWT, CEL policy, JSON decision log, hash-chained audit "
        "file; on the LLM path also the upstream credential and the tokens of every answer "
        "priced (spend metered, checked on /metrics before measuring). Checked before "
        "measuring: each contender answers the call correctly, agentproxy refuses it without "
        "a token. CPU µs/call: the contender process's user + system CPU during the run "
        "divided by the calls it served (for direct: the upstream's own); upstream CPU "
        "µs/call: the upstream's during the same run (with wrk, per call at its reported "
        "rate × duration).",
        "",
    ]
    verdicts = []
    if mcp_runs:
        direct = best(r.rps for r, _ in mcp_runs[MCP_DIRECT])
        rows = [
            [
                name,
                f"{best(r.rps for r, _ in runs):,.0f}",
                f"{best(r.rps for r, _ in runs) / direct:.2f}",
                f"{best((r.cpu_us for r, _ in runs if r.cpu_us is not None), high=False):,.0f}",
                f"{best((u for _, u in runs), high=False):,.0f}",
                f"{best((r.p50 for r, _ in runs), high=False):.2f}",
                f"{best((r.p99 for r, _ in runs), high=False):.2f}",
            ]
            for name, runs in mcp_runs.items()
        ]
        lines += [
            "## MCP tools/call to the official MCP SDK server",
            "",
            f"Upstream: `mcp` {_version('mcp')} `MCPServer` (Streamable HTTP, stateless, JSON "
            f"answers) on uvicorn {_version('uvicorn')} ({_uvicorn_stack()}), one process. "
            f"Load: wrk -t1 "
            f"-c{args.connections}, the same POST for both (MCP-Protocol-Version 2025-06-18; "
            "agentproxy's with the bearer token).",
            "",
            table(
                [
                    "contender",
                    "calls/s",
                    "× direct",
                    "CPU µs/call",
                    "upstream CPU µs/call",
                    "p50 ms",
                    "p99 ms",
                ],
                rows,
            ),
            "",
        ]
        verdicts.append(
            _verdict("agentproxy MCP path", best(r.rps for r, _ in mcp_runs[MCP_PROXY]) / direct)
        )
    if llm_runs:
        direct = best(r.rps for r in llm_runs[LLM_DIRECT])
        rows = [
            [
                name,
                f"{best(r.rps for r in runs):,.1f}",
                f"{best(r.rps for r in runs) / direct:.2f}",
                f"{best((r.cpu_us for r in runs), high=False):,.0f}",
                f"{best((r.upstream_cpu_us for r in runs), high=False):,.0f}",
                f"{best((r.p50 for r in runs), high=False):.2f}",
                f"{best((r.p99 for r in runs), high=False):.2f}",
                f"{max(r.load_busy for r in runs):.0%}",
            ]
            for name, runs in llm_runs.items()
        ]
        lines += [
            "## LLM chat completion at the OpenAI SDK's own request pattern",
            "",
            f"Upstream: the fake OpenAI API of bench/peers.py (aiohttp on uvloop, a "
            f"chat.completion with usage). Load: `openai` {_version('openai')} itself "
            f"(bench/openai_load.py, its own process), {args.concurrency} concurrent "
            "`AsyncOpenAI.chat.completions.create` loops on one client, no retries; "
            "base_url at the fake provider or at agentproxy. Load busy: the load process's "
            "share of one core (near 100%, the SDK client is the bottleneck and the ratio "
            "understates the difference).",
            "",
            table(
                [
                    "contender",
                    "calls/s",
                    "× direct",
                    "CPU µs/call",
                    "upstream CPU µs/call",
                    "p50 ms",
                    "p99 ms",
                    "load busy",
                ],
                rows,
            ),
            "",
        ]
        verdicts.append(
            _verdict("agentproxy LLM path", best(r.rps for r in llm_runs[LLM_PROXY]) / direct)
        )
    lines += ["## Targets (issue 30)", "", *verdicts, ""]
    return "\n".join(lines)


def _uvicorn_stack() -> str:
    """What uvicorn's defaults (loop and http "auto") pick in this venv."""
    from importlib.util import find_spec

    loop = "uvloop" if find_spec("uvloop") else "asyncio"
    http = "httptools" if find_spec("httptools") else "h11: httptools is not installed"
    return f"{loop}, {http}"


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    sys.exit(main())
