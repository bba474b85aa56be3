"""Instructions per `decide()` or per pipeline call, counted by callgrind: a before/after
machine noise cannot move.

Timings here move ±8% from run to run and more with the hour (bench/wake_cost.py says why);
valgrind's callgrind counts the instructions the CPU executes, the same for the same code and
inputs whatever else the machine does. This runs `decide()` on bench/scale.py's 10-rule
policy for a token with ten claims, N and 3N times, each under callgrind, and reports the
difference per decision, so start-up (imports, compiling the policy) cancels out. With
`--before`, an older commit's source (taken as bench/compare_versions.py takes it) is counted
the same way beside the working tree's. Needs valgrind (Debian package `valgrind`).

`--target pipeline` counts one call of the whole pipeline instead (bench/state_cost.py's
baseline: `assemble.build` from a real config, memory store, RS256 token cached, decision
log to /dev/null, the signed context headers of the forward; no sockets).

    .venv/bin/python bench/instructions.py [--before <commit>] [--calls 1000]
    .venv/bin/python bench/instructions.py --target pipeline --before <commit> --calls 300
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from common import machine, table, write_result
from compare_versions import source_at
from scale import policy_yaml

# scale.decide_call(10) with a token carrying ten claims, written out: the driver runs with
# an older commit's source first on the path, so it imports nothing from bench/.
DRIVER = r"""
import sys, time
from pathlib import Path
from agentproxy.config.policies import read_policy_file
from agentproxy.core import Action, Facts, Principal
from agentproxy.policy import compile_policy, decide
policy = compile_policy([read_policy_file(Path(sys.argv[1]), [])])
claims = {"iss": "https://idp.example", "sub": "bot-3", "aud": "agentproxy", "exp": 2000000000,
          "iat": 1700000000, "jti": "j-1", "scope": "read write", "dept": "d3",
          "email": "bot@example.com", "groups": ["hr", "staff"]}
action = Action("http", "GET", "/v1/svc3/items/42")
principal = Principal(agent="bot-3", claims=claims)
facts, now = Facts(), time.time()
assert decide(policy, action, principal, facts, now).rule_id == "read-svc3"
for _ in range(int(sys.argv[2])):
    decide(policy, action, principal, facts, now)
"""


# bench/state_cost.py's baseline, written out for the same reason: one call through the
# assembled pipeline, forwarded nowhere but with the headers (and signed token) it would send.
PIPELINE_DRIVER = r"""
import asyncio, sys
from pathlib import Path
from agentproxy.audit.decision_log import DecisionLog
from agentproxy.clock import SYSTEM
from agentproxy.metering.metrics import Metrics
from agentproxy.proxy import assemble
from agentproxy.proxy import runtime as runtime_module
from agentproxy.proxy.context import context_headers
from agentproxy.proxy.pipeline import start_call
from agentproxy.store import MemoryStore
d, calls = Path(sys.argv[1]).parent, int(sys.argv[2])
token = (d / "token").read_text()
class Exchange:
    def __init__(self, signer):
        self.signer, self.responded = signer, False
    async def describe(self, call):
        pass
    async def forward(self, call):
        context_headers(call, self.signer, method="GET", path="/v1/employees/42")
        call.status, self.responded = 200, True
    async def refuse(self, call):
        raise RuntimeError(call.refusal)
async def main():
    config = runtime_module.load_config(d / "agentproxy.yaml")
    runtime = await runtime_module.build(config)
    services = assemble.services(config, MemoryStore(), SYSTEM, metrics=Metrics(()),
                                 stopping=asyncio.Event())
    log = DecisionLog("stdout", stream=open("/dev/null", "wb"))
    pipeline = assemble.build(runtime, services, log)
    for _ in range(calls + 1):
        action, _, upstream = runtime.describe_http("GET", "/v1/employees/42")
        clock = pipeline.clock
        call = start_call(action, upstream.name, started=clock.monotonic(), now=clock.now(),
                          bearer=token, declared_task=None, refusal=None)
        await pipeline.run(call, Exchange(runtime.signer))
        if call.status != 200:
            raise RuntimeError(call.refusal)
    log.flush()
asyncio.run(main())
"""


def pipeline_files(d: Path) -> Path:
    """bench/state_cost.py's baseline config, its issuer key and a token, in `d`; returns
    the config's path (the driver finds the rest beside it)."""
    from common import Issuer
    from state_cost import config_text

    (d / "secret").write_text("bench-secret\n")
    issuer = Issuer.create(d)
    (d / "token").write_text(issuer.mint("hr-bot", roles=["hr"], dept="hr"))
    built = config_text(d, "baseline", "none (baseline)", None)
    path = d / "agentproxy.yaml"
    built.rename(path)
    return path


def instructions(src: Path | None, policy: Path, calls: int, driver: str = DRIVER) -> int:
    """Instructions callgrind counts for the driver making `calls` decisions (or calls)."""
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = str(src)
    with tempfile.TemporaryDirectory() as d:
        out = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={d}/callgrind.out",
                sys.executable,
                "-c",
                driver,
                str(policy),
                str(calls),
            ],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        ).stderr
    found = re.search(r"Collected : (\d+)", out)
    if found is None:
        raise RuntimeError(f"callgrind printed no count:\n{out}")
    return int(found.group(1))


def per_decision(src: Path | None, policy: Path, calls: int, driver: str = DRIVER) -> int:
    many = instructions(src, policy, 3 * calls, driver)
    return (many - instructions(src, policy, calls, driver)) // (2 * calls)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", help="an older commit to count beside the working tree")
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--target", choices=("decide", "pipeline"), default="decide")
    parser.add_argument("--name", default=None, help="default: instructions[_pipeline]")
    args = parser.parse_args()
    pipeline = args.target == "pipeline"
    driver = PIPELINE_DRIVER if pipeline else DRIVER
    with tempfile.TemporaryDirectory() as d:
        if pipeline:
            policy = pipeline_files(Path(d))
        else:
            policy = Path(d) / "policy.yaml"
            policy.write_text(policy_yaml(10))
        rows = []
        if args.before:
            src = source_at(args.before, Path(d) / "before")
            before = per_decision(src, policy, args.calls, driver)
            rows.append([f"before ({args.before})", f"{before:,}", "1.00"])
        after = per_decision(None, policy, args.calls, driver)
        rows.append(["working tree", f"{after:,}", f"{after / before:.2f}" if rows else ""])
    if pipeline:
        write_result(args.name or "instructions_pipeline", pipeline_report(args, rows))
        return 0
    text = (
        f"# Instructions per `decide()` ({machine()})\n\n"
        "callgrind's count for bench/scale.py's 10-rule policy, one CEL rule evaluated, a "
        f"token with ten claims: ({args.calls * 3:,} decisions − {args.calls:,}) ÷ "
        f"{args.calls * 2:,}, so start-up cancels out.\n\n"
        + table(["source", "instructions per decision", "× before"], rows, "lrr")
        + "\n"
    )
    write_result(args.name or "instructions", text)
    return 0


def pipeline_report(args: argparse.Namespace, rows: list[list[str]]) -> str:
    return (
        f"# Instructions per pipeline call ({machine()})\n\n"
        f"`bench/instructions.py --target pipeline --calls {args.calls}"
        + (f" --before {args.before}" if args.before else "")
        + "`: callgrind's count for "
        "one call through the assembled pipeline (bench/state_cost.py's baseline: RS256 token "
        "cached, the CEL rule memoized, decision log, metrics, the signed context headers), "
        f"({args.calls * 3:,} calls − {args.calls:,}) ÷ {args.calls * 2:,}, so start-up "
        "cancels out.\n\n"
        + table(["source", "instructions per call", "× before"], rows, "lrr")
        + "\n"
    )


if __name__ == "__main__":
    raise SystemExit(main())
