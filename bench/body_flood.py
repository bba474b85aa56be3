"""How much slower a well-behaved agent's calls get while other agents flood the proxy with
bodies that are costly to read (issue 21): gzip bombs (58 KB inflating to 60 MB), 30 MB JSON,
and bodies just under `max_body_bytes` packed with numbers, all for a denied MCP tool.

The proxy runs as its own process in front of an MCP upstream (a small aiohttp app here); the
attackers run in another process (tests/harness/body_flood.py, the same attack the test
runs); the good agent calls from this one, one call at a time. Quiet and flooded rounds
alternate, and each flooded round is compared with the quiet round before it: the result is
the good agent's p99 during the flood over its p99 without. Not part of the test suite.

    .venv/bin/python bench/body_flood.py [--seconds 10] [--rounds 3] [--attackers 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

from aiohttp import web
from common import (
    Issuer,
    Processes,
    agentproxy_config,
    free_port,
    machine,
    start_agentproxy,
    table,
    wait_port,
    write_result,
)

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # tests.harness is imported from the repo checkout

from tests.harness import body_flood  # noqa: E402

MAX_BODY_BYTES = 1 << 20  # the MCP default


async def upstream() -> tuple[web.AppRunner, int]:
    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"jsonrpc": "2.0", "id": 1, "result": {"content": []}})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


async def main(args: argparse.Namespace) -> None:
    runner, upstream_port = await upstream()
    procs = Processes()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            issuer = Issuer.create(d)
            port, admin = free_port(), free_port()
            config = agentproxy_config(
                d,
                "flood",
                port=port,
                admin=admin,
                upstreams=(
                    f'  - {{name: tools, url: "http://127.0.0.1:{upstream_port}", protocol: mcp}}'
                ),
                policy=body_flood.POLICY,
                decision_log="off",
            )
            proxy = start_agentproxy(procs, config, d / "proxy.log")
            await asyncio.to_thread(wait_port, port, 30.0, proxy)
            base = f"http://127.0.0.1:{port}"
            good = issuer.mint("good-agent")
            attackers = [issuer.mint(f"flood-{i}") for i in range(args.attackers)]
            await asyncio.to_thread(body_flood.attack_bodies, MAX_BODY_BYTES)
            rows, ratios = [], []
            for round_ in range(1, args.rounds + 1):
                quiet = await body_flood.measure(base, good, [], MAX_BODY_BYTES, args.seconds)
                flooded = await body_flood.measure(
                    base, good, attackers, MAX_BODY_BYTES, args.seconds
                )
                quiet_p99 = body_flood.percentile(quiet.latencies, 99)
                flood_p99 = body_flood.percentile(flooded.latencies, 99)
                ratios.append(flood_p99 / quiet_p99)
                for name, run in (("quiet", quiet), ("flooded", flooded)):
                    failed = sum(n for status, n in run.statuses.items() if status != 200)
                    rows.append(
                        [
                            str(round_),
                            name,
                            str(len(run.latencies)),
                            str(failed),
                            ms(body_flood.percentile(run.latencies, 50)),
                            ms(body_flood.percentile(run.latencies, 99)),
                            ms(max(run.latencies)),
                            ", ".join(f"{k}: {v}" for k, v in sorted(run.attacks.items())) or "-",
                        ]
                    )
    finally:
        procs.stop()
        await runner.cleanup()
    text = "\n".join(
        [
            "# A good agent's calls during a body flood",
            "",
            machine(),
            "",
            f"{args.attackers} attacker agents (one process), {args.seconds:g} s rounds, "
            f"MCP max_body_bytes {MAX_BODY_BYTES}.",
            "",
            table(
                ["round", "", "good calls", "failed", "p50 ms", "p99 ms", "max ms", "attacks"],
                rows,
                "llrrrrrl",
            ),
            "",
            f"**p99 during the flood / p99 without: {statistics.median(ratios):.1f}x** "
            f"(median of the rounds: {', '.join(f'{r:.1f}x' for r in ratios)})",
            "",
        ]
    )
    write_result(args.name, text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--attackers", type=int, default=3)
    parser.add_argument("--name", default="body_flood")
    asyncio.run(main(parser.parse_args()))
