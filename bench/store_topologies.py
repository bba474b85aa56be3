"""The store's cost per limited call on one Redis, Valkey, through Sentinel and on a 3-master
Cluster, as ratios against the memory store in the same run; how fast a revocation and an
approval decision reach three replicas (three stores, each with its own subscription); and
how many limited calls a second one client process drives through each.

Starts private servers on free ports (tests/harness/redis.py: no persistence). Sequential
calls on one event loop, then `--concurrency` calls in flight for `--seconds`. Writes
bench/results/store_topologies.md.

    .venv/bin/python bench/store_topologies.py [--calls 5000] [--seconds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from common import write_result

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # tests.harness is imported from the repo checkout

from tests.harness.redis import (  # noqa: E402
    SENTINEL_SERVICE,
    ClusterSetup,
    RedisServer,
    SentinelSetup,
    valkey_server,
)

from agentproxy.approvals.lifecycle import Approval, Event, State  # noqa: E402
from agentproxy.config.model import RedisSettings, SentinelSettings  # noqa: E402
from agentproxy.store import MemoryStore, Reservation, Revocation, Store  # noqa: E402
from agentproxy.store.redis import RedisStore  # noqa: E402

NOW = 1_000_000.5


def limited(key: str = "agent:bench") -> list[Reservation]:
    return [Reservation("rate", key, 1.0, 1e12, 3600.0)]


async def timed(fn: Callable[[], Awaitable[object]], calls: int) -> list[int]:
    out = []
    for _ in range(calls):
        start = time.perf_counter_ns()
        await fn()
        out.append(time.perf_counter_ns() - start)
    return out


async def throughput(store: Store, concurrency: int, seconds: float) -> float:
    """Limited calls a second with `concurrency` in flight, spread over 1,000 agents."""
    done = 0
    stop = time.monotonic() + seconds

    async def worker(i: int) -> None:
        nonlocal done
        n = 0
        while time.monotonic() < stop:
            await store.reserve(limited(f"agent:{(i * 7919 + n) % 1000}"), NOW)
            n += 1
            done += 1

    started = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return done / (time.monotonic() - started)


def approval(fingerprint: str) -> Approval:
    return Approval(
        id=uuid.uuid4().hex,
        fingerprint=fingerprint,
        state=State.PENDING,
        rule="r",
        reason="",
        agent="a",
        user=None,
        chain=(),
        action="POST /x",
        summary={},
        approvers=("user:carol",),
        created=NOW,
        expires=NOW + 600,
    )


async def propagation(replicas: list[RedisStore], rounds: int) -> tuple[float, float]:
    """Median ms until all of `replicas[1:]` hear a revocation written on `replicas[0]`, and
    until their waiters see an approval decided there."""
    writer, readers = replicas[0], replicas[1:]
    for r in readers:
        await r.wait_revocations(0.2)  # subscribed
    revocation_ms, approval_ms = [], []
    for i in range(rounds):
        waits = [asyncio.create_task(r.wait_revocations(5)) for r in readers]
        await asyncio.sleep(0.02)
        start = time.perf_counter()
        await writer.revoke(Revocation("agent", f"bench-{i}"))
        await asyncio.gather(*waits)
        revocation_ms.append((time.perf_counter() - start) * 1000)
        opened = await writer.open_approval(
            approval(f"fp-{uuid.uuid4().hex}"), NOW, max_pending=10**6, max_pending_per_agent=10**6
        )
        assert opened is not None
        held = [asyncio.create_task(r.wait_approval(opened[0].id, 5)) for r in readers]
        await asyncio.sleep(0.02)
        start = time.perf_counter()
        await writer.decide_approval(opened[0].id, Event.APPROVE, "carol", "", NOW)
        results = await asyncio.gather(*held)
        assert all(a is not None and a.state is State.APPROVED for a in results)
        approval_ms.append((time.perf_counter() - start) * 1000)
    return statistics.median(revocation_ms), statistics.median(approval_ms)


async def during_failover(setup: SentinelSetup) -> tuple[float, float, int]:
    """Three stores on the Sentinel; a SENTINEL FAILOVER starts, and a revocation is written
    (retried while refused) every 100 ms until the new master serves. Returns the worst ms
    from a revocation's first attempt until both other stores listed it, the worst ms for an
    approval decided right after the failover to wake a waiter on another store, and how
    many writes were refused meanwhile."""
    make = RedisSettings(sentinel=SentinelSettings(SENTINEL_SERVICE, (setup.node,)), timeout=0.2)
    replicas = [RedisStore(make) for _ in range(3)]
    for store in replicas:
        await store.start()
    writer, readers = replicas[0], replicas[1:]
    try:
        failing = asyncio.create_task(asyncio.to_thread(setup.failover))
        worst, refused, i = 0.0, 0, 0
        while not failing.done() or i < 5:
            first = time.perf_counter()
            while True:
                try:
                    await writer.revoke(Revocation("agent", f"fo-{i}"))
                    break
                except Exception:
                    refused += 1
                    await asyncio.sleep(0.05)
            for reader in readers:
                while True:
                    try:
                        subjects = {r.subject for r in await reader.revocations(NOW)}
                    except Exception:
                        subjects = set()
                    if f"fo-{i}" in subjects:
                        break
                    await reader.wait_revocations(0.5)
            worst = max(worst, (time.perf_counter() - first) * 1000)
            i += 1
            await asyncio.sleep(0.1)
        await failing
        opened = await writer.open_approval(
            approval(f"fp-{uuid.uuid4().hex}"), NOW, max_pending=10**6, max_pending_per_agent=10**6
        )
        assert opened is not None
        held = [asyncio.create_task(r.wait_approval(opened[0].id, 10)) for r in readers]
        await asyncio.sleep(0.05)
        start = time.perf_counter()
        await writer.decide_approval(opened[0].id, Event.APPROVE, "carol", "", NOW)
        await asyncio.gather(*held)
        return worst, (time.perf_counter() - start) * 1000, refused
    finally:
        for store in replicas:
            await store.close()


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--name", default="store_topologies", help="results file name")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ap-bench-topologies-"))
    (work / "redis").mkdir()
    single = RedisServer(work / "redis")
    single.start()
    valkey = None
    binary = valkey_server()
    if binary is not None:
        (work / "valkey").mkdir()
        valkey = RedisServer(work / "valkey", binary=binary)
        valkey.start()
    sentinel = SentinelSetup(work / "sentinel")
    (work / "sentinel").mkdir()
    sentinel.start()
    cluster = ClusterSetup(work / "cluster")
    (work / "cluster").mkdir()
    cluster.start()
    try:
        settings: dict[str, Callable[[], RedisSettings]] = {
            "Redis (one server)": lambda: RedisSettings(url=single.url, timeout=1.0),
            "Sentinel (master + replica)": lambda: RedisSettings(
                sentinel=SentinelSettings(SENTINEL_SERVICE, (sentinel.node,)), timeout=1.0
            ),
            "Cluster (3 masters)": lambda: RedisSettings(
                cluster_nodes=tuple(cluster.nodes), timeout=1.0
            ),
        }
        if valkey is not None:
            settings["Valkey (one server)"] = lambda: RedisSettings(url=valkey.url, timeout=1.0)
        memory = MemoryStore()
        rows: list[tuple[str, list[int], float, tuple[float, float] | None]] = []
        samples = await timed(lambda: memory.reserve(limited(), NOW), args.calls)
        rate = await throughput(memory, args.concurrency, args.seconds)
        rows.append(("memory store (baseline)", samples, rate, None))
        for name, make in settings.items():
            replicas = [RedisStore(make()) for _ in range(3)]
            for store in replicas:
                await store.start()
            try:
                store = replicas[0]
                await store.reserve(limited(), NOW)
                samples = await timed(lambda s=store: s.reserve(limited(), NOW), args.calls)
                rate = await throughput(store, args.concurrency, args.seconds)
                spread = await propagation(replicas, 20)
                rows.append((name, samples, rate, spread))
            finally:
                for store in replicas:
                    await store.close()
        failover = await during_failover(sentinel)
    finally:
        cluster.stop()
        sentinel.stop()
        if valkey is not None:
            valkey.stop()
        single.stop()

    def p(samples: list[int], q: float) -> float:
        ordered = sorted(samples)
        return ordered[min(len(ordered) - 1, int(len(ordered) * q))] / 1000

    base = rows[0]
    base_p50, base_rate = p(base[1], 0.5), base[2]
    lines = [
        f"# The store on one Redis, Sentinel and Cluster ({time.strftime('%Y-%m-%d')}, "
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()})",
        "",
        f"One limited call = one `reserve` (a Lua script). {args.calls} sequential calls each "
        f"on one event loop; then {args.concurrency} in flight for {args.seconds:g} s over "
        "1,000 agents (one client process: it, not the servers, is the limit). Propagation: "
        "median of 20 rounds, a revocation or an approval decision written through one store "
        "until both other stores (each with its own subscription) hear it. Servers on "
        "loopback, no persistence, on the same cores as the client.",
        "",
        "| store | p50 µs | p99 µs | p50 × memory | calls/s in flight | rate × memory "
        "| revocation → 2 replicas, ms | approval → 2 replicas, ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, samples, rate, spread in rows:
        pushed = ("–", "–") if spread is None else (f"{spread[0]:.2f}", f"{spread[1]:.2f}")
        lines.append(
            f"| {name} | {p(samples, 0.5):.1f} | {p(samples, 0.99):.1f} "
            f"| {p(samples, 0.5) / base_p50:.1f} | {rate:,.0f} | {rate / base_rate:.2f} "
            f"| {pushed[0]} | {pushed[1]} |"
        )
    lines += [
        "",
        f"During a SENTINEL FAILOVER ({failover[2]} revocation writes refused meanwhile, "
        "retried every 50 ms): the worst time from a revocation's first attempt until both "
        f"other stores list it was {failover[0]:,.0f} ms; an approval decided once the new "
        f"master served woke waiters on both other stores in {failover[1]:.1f} ms.",
    ]
    write_result(args.name, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
