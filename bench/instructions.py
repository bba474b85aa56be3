"""Instructions per `decide()`, counted by callgrind: a before/after machine noise cannot move.

Timings here move ±8% from run to run and more with the hour (bench/wake_cost.py says why);
valgrind's callgrind counts the instructions the CPU executes, the same for the same code and
inputs whatever else the machine does. This runs `decide()` on bench/scale.py's 10-rule
policy for a token with ten claims, N and 3N times, each under callgrind, and reports the
difference per decision, so start-up (imports, compiling the policy) cancels out. With
`--before`, an older commit's source (taken as bench/compare_versions.py takes it) is counted
the same way beside the working tree's. Needs valgrind (Debian package `valgrind`).

    .venv/bin/python bench/instructions.py [--before <commit>] [--calls 1000]
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


def instructions(src: Path | None, policy: Path, calls: int) -> int:
    """Instructions callgrind counts for the driver making `calls` decisions."""
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
                DRIVER,
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


def per_decision(src: Path | None, policy: Path, calls: int) -> int:
    return (instructions(src, policy, 3 * calls) - instructions(src, policy, calls)) // (2 * calls)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", help="an older commit to count beside the working tree")
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--name", default="instructions")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        policy = Path(d) / "policy.yaml"
        policy.write_text(policy_yaml(10))
        rows = []
        if args.before:
            before = per_decision(source_at(args.before, Path(d) / "before"), policy, args.calls)
            rows.append([f"before ({args.before})", f"{before:,}", "1.00"])
        after = per_decision(None, policy, args.calls)
        rows.append(["working tree", f"{after:,}", f"{after / before:.2f}" if rows else ""])
    text = (
        f"# Instructions per `decide()` ({machine()})\n\n"
        "callgrind's count for bench/scale.py's 10-rule policy, one CEL rule evaluated, a "
        f"token with ten claims: ({args.calls * 3:,} decisions − {args.calls:,}) ÷ "
        f"{args.calls * 2:,}, so start-up cancels out.\n\n"
        + table(["source", "instructions per decision", "× before"], rows, "lrr")
        + "\n"
    )
    write_result(args.name, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
