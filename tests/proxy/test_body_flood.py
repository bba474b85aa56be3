"""Bodies never freeze the loop (issue 21): while attackers send gzip bombs, oversized JSON and
bodies packed with numbers just under the cap, another agent's ordinary calls go on.

The proxy and the attackers each run as their own process (the attack must cost the proxy, not
the test's loop); the good agent's calls are counted against its calls with no attack,
measured first in the same run. Loose ratios, never absolute timings: the machine is shared.
Before the caps and the worker thread, the good agent made ~1% of its calls during the flood
and waited over a second for one; now ~25%, the slowest ~20 ms.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp

from tests.conftest import Keys, Upstream, write_config
from tests.harness import body_flood
from tests.harness.processes import pin_ports, spawn_proxy, wait_ready

SECONDS = 3.0


async def test_a_body_flood_does_not_starve_another_agent(
    tmp_path: Path, keys: Keys, upstream: Upstream
) -> None:
    config = write_config(
        tmp_path,
        keys,
        upstream.url,
        policy=body_flood.POLICY,
        upstream_extra="    protocol: mcp",
        decision_log="off",
    )
    http, admin = pin_ports(config)
    process = await spawn_proxy(config, tmp_path / "proxy.log")
    try:
        async with aiohttp.ClientSession() as s:
            await wait_ready(s, admin, process, tmp_path / "proxy.log")
        base = f"http://127.0.0.1:{http}"
        good = keys.token("good-agent")
        attackers = [keys.token(f"flood-{i}") for i in range(3)]
        # 1 MiB: the MCP default max_body_bytes, which the packed body just fits.
        quiet = await body_flood.measure(base, good, [], 1 << 20, SECONDS)
        flooded = await body_flood.measure(base, good, attackers, 1 << 20, SECONDS)
    finally:
        process.terminate()
        await process.wait()

    # The attack ran: every attack body was answered with a refusal, none was forwarded.
    assert sum(flooded.attacks.values()) >= 6, flooded.attacks
    assert set(flooded.attacks) <= {"413", "400", "429", "closed"}, flooded.attacks
    assert all(seen.body_bytes < 1000 for seen in upstream.seen)
    # Every good call succeeded, and the good agent still made a good share of its calls.
    assert set(quiet.statuses) == set(flooded.statuses) == {200}
    assert len(flooded.latencies) * 10 >= len(quiet.latencies), (
        len(flooded.latencies),
        len(quiet.latencies),
    )
    # No call waited behind a whole parse of the flood (a frozen loop made one wait seconds).
    worst = max(flooded.latencies)
    typical = body_flood.percentile(quiet.latencies, 50)
    assert worst < 200 * typical + 0.5, (worst, typical)
