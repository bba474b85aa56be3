"""Before and after a change, in one run: agentproxy from an older commit against the working
tree, on the same upstream, loaded alternately, so machine noise hits both alike.

The older source is taken with `git archive` into a temporary directory (the repository is
only read) and run with it first on PYTHONPATH; code generated at build time (agentproxy/v1)
is copied from the working tree. Both run bench/http_overhead.py's policy-only and full
pipeline; the in-process `decide()` of bench/scale.py is compared too. Writes
bench/results/tuning.md (or --name).

    .venv/bin/python bench/compare_versions.py --before 262eccb [--rounds 4 --seconds 6]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from common import (
    BIN,
    Closed,
    Issuer,
    Open,
    Processes,
    agentproxy_config,
    best,
    fixed_rate,
    free_port,
    machine,
    start_upstream,
    table,
    wait_port,
    write_result,
    wrk,
)
from http_overhead import PATH, POLICY, upstreams_yaml

REPO = Path(__file__).resolve().parent.parent

DECIDE = r"""
import sys, time, tempfile
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from scale import policy_yaml
from agentproxy.config.policies import read_policy_file
from agentproxy.core import Action, Facts, Principal
from agentproxy.policy import compile_policy, decide
d = Path(tempfile.mkdtemp())
out = []
for size in (10, 1000, 10000):
    (d / "p.yaml").write_text(policy_yaml(size))
    policy = compile_policy([read_policy_file(d / "p.yaml", [])])
    t = (size - 2) // 2 // 3 * 3
    action = Action("http", "GET", f"/v1/svc{t}/items/42")
    principal = Principal(agent=f"bot-{t % 50}", claims={"dept": f"d{t % 9}"})
    facts, now = Facts(), time.time()
    for _ in range(2000):
        decide(policy, action, principal, facts, now)
    samples = []
    for _ in range(int(sys.argv[2])):
        s = time.perf_counter_ns()
        decide(policy, action, principal, facts, now)
        samples.append(time.perf_counter_ns() - s)
    samples.sort()
    out.append(f"{size} {samples[len(samples) // 2] / 1000:.1f} {samples[int(len(samples) * 0.99)] / 1000:.1f}")
print(";".join(out))
"""


def source_at(revision: str, into: Path) -> Path:
    """src/ of `revision`, plus the working tree's generated code; returns the src path."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", revision, "src"],
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    generated = REPO / "src" / "agentproxy" / "v1"
    if generated.is_dir() and not (into / "src" / "agentproxy" / "v1").exists():
        shutil.copytree(generated, into / "src" / "agentproxy" / "v1")
    return into / "src"


def decide_times(src: Path | None, calls: int) -> dict[int, tuple[float, float]]:
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = str(src)
    out = subprocess.run(
        [sys.executable, "-c", DECIDE, str(Path(__file__).parent), str(calls)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout.strip()
    result = {}
    for part in out.split(";"):
        size, p50, p99 = part.split()
        result[int(size)] = (float(p50), float(p99))
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", required=True, help="the commit to compare with")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=6)
    parser.add_argument("--calls", type=int, default=20_000, help="decisions per policy size")
    parser.add_argument("--rate-rounds", type=int, default=2, help="fixed-rate rounds (10 s)")
    parser.add_argument("--name", default="tuning", help="results file name")
    args = parser.parse_args()
    d = Path(tempfile.mkdtemp(prefix="ap-compare-"))
    before_src = source_at(args.before, d / "before")
    revision = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", args.before],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (d / "secret").write_text("bench-secret\n")
    issuer = Issuer.create(d)
    token = issuer.mint("hr-bot", roles=["hr"], dept="hr")
    headers = {"Authorization": f"Bearer {token}"}
    up = free_port()
    contenders: dict[str, tuple[str, int]] = {}
    with Processes() as procs:
        upstream, _ = start_upstream(procs, d, up)
        wait_port(up, proc=upstream)
        for version, src in (("before", before_src), ("after", None)):
            env = dict(os.environ)
            if src is not None:
                env["PYTHONPATH"] = str(src)
            for pipeline in ("policy only", "full pipeline"):
                full = pipeline == "full pipeline"
                port, admin = free_port(), free_port()
                name = f"{version}-{'full' if full else 'policy'}"
                config = agentproxy_config(
                    d,
                    name,
                    port=port,
                    admin=admin,
                    upstreams=upstreams_yaml(up, credential=full),
                    policy=POLICY,
                    decision_log="stdout" if full else "off",
                    audit=full,
                )
                cmd = [str(BIN / "agentproxy"), "run", "--config", str(config)]
                proc = procs.start([*cmd, "--log-level", "warning"], log=d / f"{name}.log", env=env)
                wait_port(port, proc=proc)
                contenders[f"{pipeline}, {version}"] = (f"http://127.0.0.1:{port}{PATH}", proc.pid)
        for url, _ in contenders.values():
            wrk(url, seconds=1, connections=16, headers=headers)
        runs: dict[str, list[Closed]] = {name: [] for name in contenders}
        for _ in range(args.rounds):
            for name, (url, pid) in contenders.items():
                runs[name].append(
                    wrk(url, seconds=args.seconds, connections=16, headers=headers, cpu_pid=pid)
                )
                print(f"  {name}: {runs[name][-1].rps:,.0f}/s", flush=True)
        rate = round(best(r.rps for r in runs["full pipeline, after"]) / 2, -1)
        opened: dict[str, list[Open]] = {name: [] for name in contenders}
        for _ in range(args.rate_rounds):
            for name, (url, _) in contenders.items():
                opened[name].append(fixed_rate(url, rate=rate, seconds=10, headers=headers))
    decide_before = decide_times(before_src, args.calls)
    decide_after = decide_times(None, args.calls)
    rows = []
    latency_rows = []
    for pipeline in ("policy only", "full pipeline"):
        before = runs[f"{pipeline}, before"]
        after = runs[f"{pipeline}, after"]
        rps_b, rps_a = best(r.rps for r in before), best(r.rps for r in after)
        cpu_b = best((r.cpu_us or 0.0 for r in before), high=False)
        cpu_a = best((r.cpu_us or 0.0 for r in after), high=False)
        p50_b = best((r.p50 for r in opened[f"{pipeline}, before"]), high=False)
        p50_a = best((r.p50 for r in opened[f"{pipeline}, after"]), high=False)
        p99_b = best((r.p99 for r in opened[f"{pipeline}, before"]), high=False)
        p99_a = best((r.p99 for r in opened[f"{pipeline}, after"]), high=False)
        latency_rows.append(
            [pipeline, f"{p50_b:.2f}", f"{p50_a:.2f}", f"{p99_b:.2f}", f"{p99_a:.2f}"]
        )
        rows.append(
            [
                pipeline,
                f"{rps_b:,.0f}",
                f"{rps_a:,.0f}",
                f"{rps_a / rps_b:.2f}",
                f"{cpu_b:.0f}",
                f"{cpu_a:.0f}",
                f"{cpu_a / cpu_b:.2f}",
            ]
        )
    decide_rows = [
        [
            f"{size:,}",
            f"{decide_before[size][0]:.1f}",
            f"{decide_after[size][0]:.1f}",
            f"{decide_before[size][1]:.1f}",
            f"{decide_after[size][1]:.1f}",
        ]
        for size in sorted(decide_after)
    ]
    text = "\n".join(
        [
            f"# Tuning: before ({revision}) and after (working tree), in one run ({machine()})",
            "",
            f"HTTP path: wrk -t1 -c16, {args.seconds:g} s runs, {args.rounds} rounds alternating "
            "the four proxies (best of each); CPU µs/call is the proxy process's CPU time over "
            "the calls it served. Same nginx upstream, same configs as bench/http_overhead.py.",
            "",
            table(
                [
                    "pipeline",
                    "requests/s before",
                    "after",
                    "× before",
                    "CPU µs/call before",
                    "after",
                    "× before",
                ],
                rows,
            ),
            "",
            f"Latency at a fixed {rate:,.0f} requests/s (bench/loadgen.py, open loop, 10 s runs, "
            f"best of {args.rate_rounds} alternating rounds), ms:",
            "",
            table(["pipeline", "p50 before", "after", "p99 before", "after"], latency_rows),
            "",
            f"`decide()` in process, bench/scale.py's policies, {args.calls:,} decisions each "
            "(one process per version, one after the other):",
            "",
            table(["rules", "p50 µs before", "after", "p99 µs before", "after"], decide_rows),
            "",
        ]
    )
    write_result(args.name, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
