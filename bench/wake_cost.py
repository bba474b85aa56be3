"""What waking up costs on this machine: the same work back to back, and after the process slept;
and how often a running process is interrupted, and for how long.

bench/http_overhead.py's fixed-rate tables show every contender (nginx, Envoy, agentproxy)
spending more CPU per call when calls arrive one at a time than in a closed loop, which is
why half of a contender's max keeps it ~80% busy. This measures the machine's own part of
that, with no network and no other process: one unit of agentproxy's work (five `decide()`
calls on bench/scale.py's 1,000-rule policy, ~100 µs) timed back to back, and right after the
process slept (time.sleep: clock_nanosleep, as an idle event loop waits). Conditions
alternate in rounds; each keeps its best round (noise only ever makes a run slower).

The second table is why in-process p99s here sit well above their p50s (bench/scale.py's
`decide()`): a loop that only reads the clock sees every gap in its own running, each one
time the machine (kernel or hypervisor) took the CPU away.

    .venv/bin/python bench/wake_cost.py [--rounds 5 --seconds 0.5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common import machine, table, write_result
from scale import decide_call, policy_yaml

from agentproxy.config.policies import read_policy_file
from agentproxy.core import Facts
from agentproxy.policy import compile_policy, decide

IDLE_US = (0, 20, 100, 300, 1000, 5000)


def unit_of_work() -> tuple[object, ...]:
    """The arguments of one `decide()` on the 1,000-rule policy (one CEL rule evaluated)."""
    path = Path(tempfile.mkdtemp(prefix="ap-wake-")) / "policy.yaml"
    path.write_text(policy_yaml(1000))
    policy = compile_policy([read_policy_file(path, [])])
    action, principal = decide_call(1000)
    return policy, action, principal, Facts(), time.time()


def run(args: tuple[object, ...], idle_us: int, seconds: float) -> tuple[float, float, float]:
    """The work's p50 and mean wall time and the process CPU per iteration, in µs."""
    idle = idle_us / 1e6
    walls: list[int] = []
    cpu = time.process_time()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        if idle:
            time.sleep(idle)
        started = time.perf_counter_ns()
        for _ in range(5):
            decide(*args)  # type: ignore[arg-type]
        walls.append(time.perf_counter_ns() - started)
    used = (time.process_time() - cpu) / len(walls) * 1e6
    return statistics.median(walls) / 1000, statistics.fmean(walls) / 1000, used


def interruptions(seconds: float) -> list[int]:
    """The gaps longer than 5 µs in a loop that only reads the clock, in ns."""
    clock = time.perf_counter_ns
    gaps = []
    last = clock()
    end = last + int(seconds * 1e9)
    while last < end:
        now = clock()
        if now - last > 5000:
            gaps.append(now - last)
        last = now
    return sorted(gaps)


def _us(ordered_ns: list[int], q: float) -> str:
    if not ordered_ns:
        return "-"
    return f"{ordered_ns[min(len(ordered_ns) - 1, int(q * len(ordered_ns)))] / 1000:.0f}"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.5, help="per condition and round")
    parser.add_argument("--name", default="wake_cost")
    args = parser.parse_args()
    work = unit_of_work()
    run(work, 0, 0.5)  # warm: caches, the allocator, CEL's first evaluations
    runs: dict[int, list[tuple[float, float, float]]] = {idle: [] for idle in IDLE_US}
    for _ in range(args.rounds):
        for idle in IDLE_US:
            runs[idle].append(run(work, idle, args.seconds))
    p50 = {idle: min(r[0] for r in rs) for idle, rs in runs.items()}
    # CPU the process spent per iteration beyond the work itself: the sleep and the wake-up.
    wake = {idle: min(r[2] - r[1] for r in rs) for idle, rs in runs.items()}
    rows = [
        [
            "none (back to back)" if idle == 0 else f"{idle:,} µs",
            f"{p50[idle]:.0f}",
            f"{p50[idle] / p50[0]:.2f}",
            "" if idle == 0 else f"{max(0.0, wake[idle] - wake[0]):.0f}",
        ]
        for idle in IDLE_US
    ]
    text = (
        f"# What waking up and being interrupted cost ({machine()})\n\n"
        "One unit of agentproxy's work (five `decide()` calls on bench/scale.py's 1,000-rule "
        "policy) timed back to back, and right after the process slept (clock_nanosleep, as "
        f"an idle event loop waits); {args.rounds} alternating rounds of {args.seconds:g} s, "
        "best round each. *Work*: the unit's p50 wall time. *Sleep and wake-up*: the process's "
        "CPU per iteration beyond the work's own wall time, over back to back's: what "
        "sleeping and being woken cost the process itself.\n\n"
        + table(
            ["idle before the work", "work p50 µs", "× back to back", "sleep and wake-up µs CPU"],
            rows,
            "lrrr",
        )
        + "\n\nA proxy sleeps once or twice per call when calls arrive one at a time (waiting "
        "for the next call, for the upstream's answer) and never in a closed loop; this is "
        "the machine's share of bench/http_overhead.py's \"× closed-loop CPU\" column, which "
        "every contender shows.\n"
    )
    seconds = 2.0
    gaps = interruptions(seconds)
    text += (
        "\n## Interruptions of a running process\n\n"
        f"A loop that only reads the clock for {seconds:g} s; every gap longer than 5 µs is "
        "time the machine took the CPU away (timer ticks, other interrupts, the hypervisor).\n\n"
        + table(
            ["gaps per second", "p50 µs", "p90 µs", "max µs", "share of the time"],
            [
                [
                    f"{len(gaps) / seconds:,.0f}",
                    _us(gaps, 0.5),
                    _us(gaps, 0.9),
                    _us(gaps, 1.0),
                    f"{sum(gaps) / (seconds * 1e9):.1%}",
                ]
            ],
        )
        + "\n\nA timing of a short operation includes one of these when one falls inside it: "
        "for a ~20 µs `decide()` about 2% of the timings do, so its p99 is its p50 plus "
        "one interruption.\n"
    )
    write_result(args.name, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
