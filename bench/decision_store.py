"""Decision latency with the store: memo hit, memo miss, and limit checks in memory and in
Redis, as ratios to the in-process `decide()` measured in the same run.

Starts a private redis-server on a free port (no persistence) and measures each operation
one call at a time on one event loop. Writes bench/results/decision_store.md.

    .venv/bin/python bench/decision_store.py [--calls 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from common import free_port, write_result

from agentproxy.config.model import RedisSettings
from agentproxy.config.policies import read_policy_file
from agentproxy.core import Action, Facts, Principal, Reservation
from agentproxy.policy import compile_policy, decide
from agentproxy.policy.memo import DecisionMemo, memo_key
from agentproxy.store import MemoryStore
from agentproxy.store.redis import RedisStore

HERE = Path(__file__).resolve().parent
POLICY = """
default: deny
rules:
  - id: read-employees
    agents: [hr-bot, "role:hr"]
    actions: ["http:GET /v1/employees/{id}"]
    when: 'resource.id != "13" && principal.claims.dept == "hr"'
    effect: allow
"""


def percentiles(samples: list[int]) -> tuple[float, float]:
    ordered = sorted(samples)
    return ordered[len(ordered) // 2] / 1000, ordered[int(len(ordered) * 0.99)] / 1000


def timed(fn: Callable[[], object], calls: int) -> list[int]:
    out = []
    for _ in range(calls):
        start = time.perf_counter_ns()
        fn()
        out.append(time.perf_counter_ns() - start)
    return out


async def timed_async(fn: Callable[[], Awaitable[object]], calls: int) -> list[int]:
    out = []
    for _ in range(calls):
        start = time.perf_counter_ns()
        await fn()
        out.append(time.perf_counter_ns() - start)
    return out


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--name", default="decision_store", help="results file name")
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        print("redis-server is missing: apt-get install redis-server", file=sys.stderr)
        return 1
    d = Path(tempfile.mkdtemp(prefix="ap-bench-"))
    (d / "p.yaml").write_text(POLICY)
    issues: list[object] = []
    policy = compile_policy([read_policy_file(d / "p.yaml", issues)])  # type: ignore[arg-type]
    principal = Principal(agent="hr-bot", claims={"dept": "hr"})
    action = Action("http", "GET", "/v1/employees/42")
    now = time.time()
    n = args.calls

    rows: dict[str, list[int]] = {}
    rows["decide() in process (baseline)"] = timed(
        lambda: decide(policy, action, principal, Facts(), now), n
    )
    memo = DecisionMemo()
    key = memo_key("token-bytes", action)
    memo.put(key, decide(policy, action, principal, Facts(), now))
    rows["memo hit (key + LRU lookup)"] = timed(
        lambda: memo.get(memo_key("token-bytes", action)), n
    )

    def miss() -> object:
        k = memo_key("token-bytes", action)
        if memo.get(("other", *k)) is None:
            return decide(policy, action, principal, Facts(), now)
        return None

    rows["memo miss (lookup + decide)"] = timed(miss, n)
    reservation = [Reservation("rate", "rate:agent=hr-bot", 1.0, 1e12, 3600.0)]
    memory = MemoryStore()
    rows["limit check, memory store"] = await timed_async(
        lambda: memory.reserve(reservation, now), n
    )

    port = free_port()
    redis = subprocess.Popen(  # noqa: ASYNC220 - started once, before anything is measured
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        store = RedisStore(RedisSettings(url=f"redis://127.0.0.1:{port}/0", timeout=1.0))
        for _ in range(100):
            try:
                await store.start()
                break
            except Exception:
                await asyncio.sleep(0.05)
        await store.reserve(reservation, now)
        rows["limit check, Redis store (Lua, loopback)"] = await timed_async(
            lambda: store.reserve(reservation, now), n // 4
        )
        await store.close()
    finally:
        redis.terminate()
        redis.wait(10)

    base_p50, base_p99 = percentiles(rows["decide() in process (baseline)"])
    lines = [
        f"# Decision latency with the store ({time.strftime('%Y-%m-%d')}, {platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()})",
        "",
        f"{n} sequential calls each (Redis: {n // 4}); one event loop; redis-server on loopback.",
        "",
        "| operation | p50 µs | p99 µs | p50 × baseline | p99 × baseline |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, samples in rows.items():
        p50, p99 = percentiles(samples)
        lines.append(
            f"| {name} | {p50:.1f} | {p99:.1f} | {p50 / base_p50:.2f} | {p99 / base_p99:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    write_result(args.name, text)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
