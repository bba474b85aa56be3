"""An agent's action against a pattern a backtracking regex would take minutes on, sent while
a second agent works: the attacker is answered, and the second agent is never held up."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from tests.conftest import Keys, ProxyFactory, Upstream

POLICY = """
default: deny
rules:
  - id: csv-exports
    agents: [exporter]
    actions: ["http:GET /files/*-*-*-*.csv", "http:GET /files/**/*-*.csv"]
    effect: allow
  - id: reads
    agents: [reader]
    actions: ["http:GET /v1/employees/{id}"]
    effect: allow
"""


async def test_an_almost_matching_action_does_not_stall_other_agents(
    make_proxy: ProxyFactory, upstream: Upstream, keys: Keys
) -> None:
    proxy = await make_proxy(policy=POLICY)
    attacker = {"Authorization": f"Bearer {keys.token('attacker')}"}
    reader = {"Authorization": f"Bearer {keys.token('reader')}"}
    # 6,000 characters in one segment: a backtracking matcher needs hours for the first
    # pattern (quartic) and ~30 s for the second (cubic); a linear one, microseconds.
    segment = "-" * 6000

    async with aiohttp.ClientSession() as s:

        async def attack() -> list[int]:
            statuses = []
            for _ in range(5):
                async with s.get(f"{proxy.base}/files/{segment}", headers=attacker) as r:
                    statuses.append(r.status)
                async with s.get(f"{proxy.base}/files/a/{segment}x", headers=attacker) as r:
                    statuses.append(r.status)
            return statuses

        slowest = 0.0

        async def read() -> list[int]:
            nonlocal slowest
            statuses = []
            for i in range(20):
                started = time.monotonic()
                async with s.get(f"{proxy.base}/v1/employees/{i}", headers=reader) as r:
                    statuses.append(r.status)
                slowest = max(slowest, time.monotonic() - started)
            return statuses

        # A hang detector, not a timing goal (bench/ has those): with a backtracking matcher
        # this takes minutes.
        attacked, read_back = await asyncio.wait_for(asyncio.gather(attack(), read()), 60)
    assert attacked == [403] * 10
    assert read_back == [200] * 20
    assert len(upstream.seen) == 20
    # Generous for a loaded 2-core machine; a backtracking matcher holds each call for seconds.
    assert slowest < 5, slowest
