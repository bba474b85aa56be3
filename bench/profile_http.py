"""Where the full HTTP pipeline spends its time under load: py-spy samples agentproxy while
wrk drives it, and the hottest functions (self and inclusive) are printed.

Starts nginx and agentproxy with the full pipeline of bench/http_overhead.py; writes the
collapsed stacks to a temporary file and the hottest functions to bench/results/profile_http.md.

    .venv/bin/python bench/profile_http.py [--seconds 15] [--top 40]
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from common import (
    BIN,
    Issuer,
    Processes,
    agentproxy_config,
    free_port,
    machine,
    start_agentproxy,
    start_upstream,
    wait_port,
    write_result,
    wrk,
)
from http_overhead import PATH, POLICY, upstreams_yaml


def hottest(collapsed: Path, top: int) -> str:
    """Self and inclusive sample shares per function, from py-spy's raw (collapsed) output."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        frames = [
            f.split(" (")[0] + " " + f.rsplit("/", 1)[-1].rstrip(")") for f in stack.split(";")
        ]
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    lines = [f"{total} samples", "", "self %  function"]
    lines += [f"{100 * n / total:6.1f}  {f}" for f, n in own.most_common(top)]
    lines += ["", "incl %  function"]
    lines += [f"{100 * n / total:6.1f}  {f}" for f, n in inclusive.most_common(top)]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--name", default="profile_http", help="results file name")
    parser.add_argument(
        "--pipeline",
        choices=("full", "policy-only"),
        default="full",
        help="bench/http_overhead.py's full pipeline or its policy-only proxy",
    )
    args = parser.parse_args()
    spy = shutil.which("py-spy") or str(BIN / "py-spy")
    if not Path(spy).exists():
        print("py-spy is missing: .venv/bin/pip install -e '.[bench]'", file=sys.stderr)
        return 1
    d = Path(tempfile.mkdtemp(prefix="ap-profile-"))
    (d / "secret").write_text("bench-secret\n")
    issuer = Issuer.create(d)
    up, port, admin = free_port(), free_port(), free_port()
    config = agentproxy_config(
        d,
        "full",
        port=port,
        admin=admin,
        upstreams=upstreams_yaml(up, credential=args.pipeline == "full"),
        policy=POLICY,
        decision_log="stdout" if args.pipeline == "full" else "off",
        audit=args.pipeline == "full",
    )
    token = issuer.mint("hr-bot", roles=["hr"], dept="hr")
    headers = {"Authorization": f"Bearer {token}"}
    url = f"http://127.0.0.1:{port}{PATH}"
    out = d / "profile.txt"
    with Processes() as procs:
        upstream, _ = start_upstream(procs, d, up)
        wait_port(up, proc=upstream)
        proxy = start_agentproxy(procs, config, d / "proxy.log")
        wait_port(port, proc=proxy)
        wrk(url, seconds=2, connections=args.connections, headers=headers)
        load = threading.Thread(
            target=wrk,
            args=(url,),
            kwargs={
                "seconds": args.seconds + 2,
                "connections": args.connections,
                "headers": headers,
            },
        )
        load.start()
        subprocess.run(
            [
                *(spy, "record", "--pid", str(proxy.pid), "--duration", str(args.seconds)),
                *("--rate", "500", "--format", "raw", "--output", str(out)),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        load.join()
    write_result(
        args.name,
        f"# Where the HTTP pipeline ({args.pipeline}) spends its time ({machine()})\n\n"
        f"py-spy, 500 samples/s for {args.seconds} s of agentproxy under wrk -c"
        f"{args.connections} (bench/http_overhead.py's {args.pipeline} pipeline). Self: samples in the "
        "function itself; incl: with what it calls. C code (uvloop, orjson, cel-cpp) counts "
        "toward the Python function that called it.\n\n```\n" + hottest(out, args.top) + "\n```\n",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
